// The monitor page: machines → workers → connector badges, the fleet services card and the jobs,
// live from the snapshot plus the sequenced event stream. Events only change the state and mark
// what they touched; the page is redrawn at most once per animation frame, only the parts marked.

import {
  Live, TERMINAL, api, askToken, duration, esc, imagesOf, isUtc, preview, serverNow, setUtc, time, whoami,
} from "./api.js";

/** Rows drawn per job list; the rest is counted. */
const MAX_ROWS = 300;

const $ = (id) => document.getElementById(id);
const state = {
  tab: "pending",
  filters: {},
  finished: [],
  finishedNext: null,
  newFinished: 0,
  gone: new Map(), // worker id → { worker, reason, at }: shown offline until the page reloads
  bulkRunning: false, // a bulk action is under way (its button stays disabled)
  services: null,
};
const dirty = new Set();
let frame = 0;
/**
 * How the page keeps up, for `fleetq`'s own page benchmark and for anyone curious (console:
 * `fleetqStats`): when the first full picture was drawn (ms after navigation), for recent events
 * the time from the broker's `at` to the frame that drew them (same-host clocks), and how long
 * each frame's drawing took.
 */
const stats = { firstRenderMs: null, lagMs: [], drawMs: [] };
window.fleetqStats = stats;
let drawnAts = [];

function mark(...parts) {
  for (const p of parts) dirty.add(p);
  if (!frame) frame = requestAnimationFrame(draw);
}

/** When the page last had the stream (the data shown is as of then when it has not now). */
let liveSince = null;

const live = new Live({
  onState: (s) => {
    const pill = $("conn");
    pill.dataset.state = s;
    document.body.dataset.conn = s;
    if (s === "live") liveSince = null;
    else if (liveSince === null && pill.textContent.startsWith("live")) liveSince = Date.now();
    const asOf = liveSince !== null ? ` · data as of ${time(liveSince)}` : "";
    pill.textContent = s === "unauthorized" ? "needs a token" : `${s}${asOf}`;
    pill.title = s === "unauthorized" ? "The API asks for a token: use Token…" : "";
  },
  onChange: (kind) => {
    if (kind === "snapshot") mark("machines", "jobs", "seq");
    else if (kind.startsWith("job_") || kind === "partition_workability") mark("jobs", "machines", "seq");
    else if (kind === "service_paused") { mark("jobs", "seq"); refreshServicesSoon(); }
    else mark("machines", "seq");
    if (kind === "connector_status" || kind === "worker_registered" || kind === "worker_removed") refreshServicesSoon();
    // The queue's true depth moves with submissions, claims and ends.
    if (kind === "job_submitted" || kind === "job_claimed" || kind === "job_cancelled" || kind === "job_requeued") refreshServicesSoon(2000);
  },
  onEvent: (e) => {
    if (typeof e.at === "number") drawnAts.push(e.at);
    if (e.type === "worker_removed") {
      const w = live.snapshot.workersGone?.[e.worker_id];
      state.gone.set(e.worker_id, { worker: w, reason: e.reason, at: e.at });
    } else if (e.type === "worker_registered") {
      state.gone.delete(e.worker.worker_id);
    }
    if (e.job && TERMINAL.has(e.job.status) && matchesFilters(e.job)) {
      state.newFinished += 1;
      mark("jobs");
    }
    if (e.job && e.job.id === openJobId()) followOpenJob(TERMINAL.has(e.job.status));
  },
});

/** The id of the job whose detail is open, if one is. */
function openJobId() {
  return $("job-dialog").open ? $("job-dialog").dataset.jobId : null;
}

/**
 * The open detail follows its job: an event of it redraws the detail from the API (at most every
 * second; at once when the job ended, so its outcome shows), keeping which sections are expanded.
 */
let followTimer = null;
function followOpenJob(now) {
  if (followTimer && !now) return;
  clearTimeout(followTimer);
  followTimer = setTimeout(() => {
    followTimer = null;
    const id = openJobId();
    if (id) openJob(id, { quiet: true });
  }, now ? 0 : 1000);
}

// Keep a removed worker's last picture for its offline card (the fold deletes it).
const fold = live.fold.bind(live);
live.fold = (message) => {
  const s = live.snapshot;
  if (s) {
    try {
      const e = JSON.parse(message.data);
      if (e.type === "worker_removed" && s.workers[e.worker_id]) {
        s.workersGone = { ...(s.workersGone || {}), [e.worker_id]: s.workers[e.worker_id] };
      }
    } catch { /* fold ignores it too */ }
  }
  fold(message);
};

// ----- filters (kept in the URL so a view can be shared) ---------------------------------------

function readFilters() {
  const q = new URLSearchParams(location.search);
  state.filters = {};
  for (const k of ["service", "status", "worker", "workflow", "customer"]) {
    const v = q.get(k);
    if (v) state.filters[k] = v;
  }
  state.tab = ["pending", "active", "finished"].includes(q.get("tab")) ? q.get("tab") : state.tab;
  const form = $("filters");
  for (const k of ["service", "status", "worker", "workflow", "customer"]) form.elements[k].value = state.filters[k] || "";
}

function writeUrl() {
  const q = new URLSearchParams(state.filters);
  if (state.tab !== "pending") q.set("tab", state.tab);
  const job = new URLSearchParams(location.search).get("job");
  if (job) q.set("job", job);
  history.replaceState(null, "", `${location.pathname}${q.toString() ? `?${q}` : ""}`);
}

function matchesFilters(j) {
  const f = state.filters;
  return (!f.service || j.service === f.service) && (!f.status || j.status === f.status) &&
    (!f.worker || j.worker_id === f.worker) && (!f.workflow || j.workflow_id === f.workflow) &&
    (!f.customer || j.customer_id === f.customer);
}

// ----- drawing ---------------------------------------------------------------------------------

function draw() {
  const began = performance.now();
  try { drawParts(); } finally { stats.drawMs.push(performance.now() - began); if (stats.drawMs.length > 20_000) stats.drawMs.splice(0, 10_000); }
}

function drawParts() {
  frame = 0;
  const parts = new Set(dirty);
  dirty.clear();
  if (!live.snapshot) return;
  if (parts.has("seq")) {
    // When the picture last changed; the event's number is for whoever needs it (hover).
    $("seq").textContent = `updated ${time(serverNow())}`;
    $("seq").title = `as of event ${live.snapshot.seq}`;
  }
  if (parts.has("machines")) drawMachines();
  if (parts.has("jobs")) drawJobs();
  if (parts.has("services")) drawServices();
  const now = Date.now();
  for (const at of drawnAts) stats.lagMs.push(now - at);
  drawnAts = [];
  if (stats.lagMs.length > 20_000) stats.lagMs.splice(0, stats.lagMs.length - 10_000);
  if (stats.firstRenderMs === null && parts.has("jobs")) stats.firstRenderMs = Math.round(performance.now());
}

function badge(service, report) {
  // The API's threshold (--stale-after-s), sent with the snapshot.
  const stale = serverNow() - report.at > live.snapshot.stale_after_ms;
  const title = [`${service}: ${report.status}`, report.message, `last report ${time(report.at)}`]
    .filter(Boolean).join("\n");
  return `<span class="badge" tabindex="0" role="img" data-service="${esc(service)}" data-status="${esc(report.status)}"` +
    ` data-at="${esc(report.at)}" data-stale="${stale}" title="${esc(title)}" aria-label="${esc(title)}">${esc(service)} ${stale ? "" : esc(report.status)}</span>`;
}

/** How long a job has waited or run, to the second: the table's ages change once a second. */
function age(ms) {
  return ms < 60_000 ? `${Math.floor(Math.max(0, ms) / 1000)} s` : duration(ms);
}

/** An age that changes once a minute, so a worker's line is not redrawn every frame for its clock. */
function uptime(ms) {
  const m = Math.floor(Math.max(0, ms) / 60_000);
  if (m < 1) return "< 1 m";
  if (m < 60) return `${m} m`;
  if (m < 48 * 60) return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} m`;
  return `${Math.floor(m / 1440)} d`;
}

/** The jobs each worker holds, indexed once per drawing of the machines. */
let byWorker = new Map();

function running(workerId) {
  return byWorker.get(workerId) || [];
}

/**
 * A worker none of whose connectors has reported within the API's threshold (its health checks
 * report every few seconds, and open pages get their times): it died without a word (kill -9, a
 * power loss) and its presence has not expired yet. Every viewer judges it alike, from the data.
 */
function silentFor(w) {
  const reports = Object.values(w.connectors || {});
  if (!reports.length) return null;
  const last = Math.max(...reports.map((r) => r.at));
  const quiet = serverNow() - last;
  return quiet > live.snapshot.stale_after_ms ? quiet : null;
}

function drawWorker(w, offline) {
  const silent = offline ? null : silentFor(w);
  const jobs = offline ? [] : running(w.worker_id);
  const status = offline ? "offline" : silent !== null ? "silent" : jobs.length ? "busy" : "idle";
  const badges = Object.entries(w.connectors || {}).map(([s, r]) => badge(s, r)).join(" ");
  const current = jobs.map((j) => `
    <div class="row clickable" data-open="${esc(j.id)}">
      <span class="mono" title="${esc(j.id)}">…${esc(j.id.slice(-8))}</span>
      <div class="bar" role="progressbar" aria-valuenow="${Math.round(j.progress)}" aria-valuemin="0" aria-valuemax="100"><span style="width:${j.progress}%"></span></div>
      <span>${j.progress.toFixed(0)}%</span><span class="muted">${esc(j.message || "")}</span>
    </div>`).join("");
  const gone = offline ? `<span class="muted">${esc(offline.reason)} at ${esc(time(offline.at))}</span>`
    : silent !== null ? `<span class="muted">no report for ${esc(age(silent))}</span>` : "";
  return `<div class="worker" data-worker-id="${esc(w.worker_id)}" data-status="${status}">
    <div class="head"><strong>${esc(w.worker_id)}</strong>
      <span class="status" data-status="${status}">${status}</span> ${badges}
      <span class="muted">up ${uptime(serverNow() - w.registered_at)} · ${w.completed || 0} done</span> ${gone}</div>
    ${current}</div>`;
}

/**
 * Puts `items` ([key, html] in order) into `container`, touching only what changed. When the keys
 * kept from the last drawing are still in the same order — the usual case: a few rows leave (a job
 * claimed), a few arrive, some change — the rows that left are removed, the new ones inserted and
 * only the rows whose HTML differs are re-parsed; otherwise the container is drawn whole. A
 * progress event on one worker of a hundred re-parses that worker's few lines, not the fleet.
 * `onRedrawn(key)` is called for each child drawn anew, so caches nested inside it can be reset.
 */
function patch(container, items, cache, onRedrawn = () => {}) {
  const keys = items.map(([k]) => k);
  const wanted = new Set(keys);
  const kept = cache.keys.filter((k) => wanted.has(k));
  const keptSet = new Set(kept);
  const inOrder = container.children.length === cache.keys.length &&
    keys.filter((k) => keptSet.has(k)).every((k, i) => k === kept[i]);
  if (!inOrder) {
    container.innerHTML = items.map(([, h]) => h).join("");
    cache.keys = keys;
    cache.html = new Map(items);
    for (const k of keys) onRedrawn(k);
    return;
  }
  // Remove the children whose keys left, from the end so the indexes hold.
  for (let i = cache.keys.length - 1; i >= 0; i -= 1) {
    if (!wanted.has(cache.keys[i])) {
      container.children[i].remove();
      cache.html.delete(cache.keys[i]);
    }
  }
  items.forEach(([k, h], i) => {
    if (!keptSet.has(k)) {
      const before = container.children[i];
      if (before) before.insertAdjacentHTML("beforebegin", h);
      else container.insertAdjacentHTML("beforeend", h);
    } else if (cache.html.get(k) !== h) {
      container.children[i].outerHTML = h;
    } else {
      return;
    }
    cache.html.set(k, h);
    onRedrawn(k);
  });
  cache.keys = keys;
}

const machineCache = { keys: [], html: new Map() };
const workerCaches = new Map(); // machine id → the cache of its workers' list

function drawMachines() {
  const s = live.snapshot;
  const byMachine = new Map();
  const add = (id) => { if (!byMachine.has(id)) byMachine.set(id, { workers: [], gone: [] }); return byMachine.get(id); };
  for (const id of Object.keys(s.machines)) add(id);
  for (const w of Object.values(s.workers)) add(w.machine_id).workers.push(w);
  for (const [id, g] of state.gone) if (g.worker) add(g.worker.machine_id).gone.push([g.worker, { ...g, id }]);
  byWorker = new Map();
  for (const j of Object.values(s.jobs)) {
    if (j.worker_id && j.status !== "pending") {
      if (!byWorker.has(j.worker_id)) byWorker.set(j.worker_id, []);
      byWorker.get(j.worker_id).push(j);
    }
  }
  const machines = [...byMachine.entries()].sort(([a], [b]) => a.localeCompare(b));
  const root = $("machines");
  const plural = (n, one) => `${n} ${one}${n === 1 ? "" : "s"}`;
  $("machines-count").textContent = `${plural(byMachine.size, "machine")} · ${plural(Object.keys(s.workers).length, "worker")}`;
  if (!machines.length) {
    root.innerHTML = `<p class="muted">No machine has registered.</p>`;
    machineCache.keys = [];
    return;
  }
  const cards = machines.map(([id, m]) => {
    const ms = s.machines[id];
    // A machine that vanished without a word (kill -9, power loss) never says `stopped`: it is
    // `lost` once it was ready and none of its workers is heard any more — their presence expired
    // (a page opened afterwards sees no worker at all) or they are silent — for every viewer.
    const heard = m.workers.filter((w) => silentFor(w) === null);
    const lost = (ms ? ms.phase === "ready" : m.workers.length > 0) && !heard.length;
    const phase = lost ? "lost" : ms ? ms.phase : m.workers.length ? "ready" : "offline";
    const lastHeard = lost ? Math.max((ms && ms.updated_at) || 0, ...m.workers.flatMap((w) =>
      Object.values(w.connectors || {}).map((r) => r.at))) : 0;
    const steps = ms && ms.steps && ms.steps.length
      ? `<ol class="steps">${ms.steps.map((st) => `<li>${esc(st)}</li>`).join("")}</ol>` : "";
    const many = m.workers.length + m.gone.length > 4;
    // The card's shell; its workers are patched into `.workers` below.
    return [id, `<article class="machine" data-machine-id="${esc(id)}" data-phase="${esc(phase)}" data-many="${many}">
      <h3>${esc(id)} <span class="status" data-status="${esc(phase)}">${esc(phase)}</span>${lost
        ? ` <span class="muted">last heard ${esc(age(serverNow() - lastHeard))} ago</span>` : ""}</h3>
      ${ms && ms.message ? `<p class="muted">${esc(ms.message)}</p>` : ""}${steps}<div class="workers"></div></article>`];
  });
  patch(root, cards, machineCache, (id) => workerCaches.set(id, { keys: [], html: new Map() }));
  machines.forEach(([id, m], i) => {
    const workers = m.workers.sort((a, b) => a.worker_id.localeCompare(b.worker_id, undefined, { numeric: true }))
      .map((w) => [w.worker_id, drawWorker(w, null)])
      .concat(m.gone.map(([w, g]) => [`gone:${w.worker_id}`, drawWorker(w, g)]));
    patch(root.children[i].querySelector(".workers"), workers, workerCaches.get(id));
  });
}

function jobRow(j) {
  const prio = j.workflow_priority ?? j.priority;
  const unworkable = j.status === "pending" && j.unworkable;
  // A paused service's jobs wait for its resume, not for a worker: no ETA.
  const paused = j.status === "pending" && (live.snapshot.paused || []).includes(j.service);
  const cells = {
    pending: () => `<td>${esc(j.service)}</td><td class="num">${prio}</td>
      <td><span class="status" data-status="${paused ? "paused" : "pending"}" data-unworkable="${unworkable}"${unworkable ? ` title="no registered worker can serve it: open the job to see why"` : ""}>${paused ? "paused" : unworkable ? "unworkable" : j.run_at ? `retry at ${esc(time(j.run_at))}` : "pending"}</span></td>
      <td class="num">${esc(estimates.get(j.id)?.position ?? "")}</td><td>${paused ? "—" : estimates.get(j.id)?.eta != null ? duration(estimates.get(j.id).eta) : ""}</td>
      <td>${esc(j.attempt)}/${esc(j.max_attempts)}</td><td>${esc(time(j.created_at))}</td><td data-since="${j.created_at}"></td>`,
    active: () => `<td>${esc(j.service)}</td><td>${esc(j.worker_id || "")}</td>
      <td><div class="bar" role="progressbar" aria-valuenow="${Math.round(j.progress)}" aria-valuemin="0" aria-valuemax="100"><span style="width:${j.progress}%"></span></div></td>
      <td class="num">${j.progress.toFixed(0)}%</td><td class="muted">${esc(j.message || "")}</td><td data-since="${j.started_at || j.updated_at}"></td>`,
    finished: () => `<td>${esc(j.service)}</td><td><span class="status" data-status="${esc(j.status)}">${esc(j.status)}</span></td>
      <td>${esc(j.error ? j.error.category : "")}</td><td>${esc(j.worker_id || "")}</td>
      <td>${duration((j.finished_at || 0) - (j.started_at || j.created_at))}</td><td>${esc(time(j.finished_at))}</td>`,
  };
  return `<tr class="clickable" tabindex="0" data-job-id="${esc(j.id)}" data-status="${esc(j.status)}" data-open="${esc(j.id)}">
    <td class="mono">${esc(j.id)}</td>${cells[state.tab]()}</tr>`;
}

const HEADS = {
  pending: ["id", "service", "priority", "state", "position", "ETA", "attempt", "submitted", "waiting"],
  active: ["id", "service", "worker", "progress", "", "step", "elapsed"],
  finished: ["id", "service", "status", "category", "worker", "ran", "finished"],
};

let jobsShell = "";
let jobsFoot = "";
const rowCache = { keys: [], html: new Map() };

function drawJobs() {
  const jobs = Object.values(live.snapshot.jobs).filter(matchesFilters);
  const pending = jobs.filter((j) => j.status === "pending").sort((a, b) =>
    (b.workflow_priority ?? b.priority) - (a.workflow_priority ?? a.priority) ||
    (a.workflow_datetime ?? a.created_at) - (b.workflow_datetime ?? b.created_at));
  const active = jobs.filter((j) => j.status === "assigned" || j.status === "in_progress")
    .sort((a, b) => (a.started_at || 0) - (b.started_at || 0));
  const waiting = pendingTotal(pending.length);
  const counts = { pending: waiting.text, active: active.length, finished: state.finished.length };
  for (const b of document.querySelectorAll(".tabs button")) {
    b.setAttribute("aria-selected", String(b.dataset.tab === state.tab));
    b.querySelector(".count").textContent = b.dataset.tab === "finished" ? "" : `(${counts[b.dataset.tab]})`;
  }
  const list = state.tab === "pending" ? pending : state.tab === "active" ? active : state.finished;
  if (state.tab === "pending") refreshEstimates(pending.map((j) => j.id));
  const head = `<tr>${HEADS[state.tab].map((h) => `<th scope="col">${h}</th>`).join("")}</tr>`;
  const rows = list.slice(0, MAX_ROWS).map((j) => [j.id, jobRow(j)]);
  const beyond = state.tab === "pending" && waiting.total !== null ? waiting.total - rows.length : list.length - rows.length;
  let foot = beyond > 0 ? `<p class="muted">and ${beyond} more${state.tab === "pending" ? " in the queue" : ""}</p>` : "";
  let banner = "";
  if (state.tab === "finished") {
    if (state.newFinished) banner = `<button type="button" class="banner" id="show-new">${state.newFinished} new — show</button>`;
    if (state.finishedNext) foot += `<button type="button" id="more">Load more</button>`;
  }
  // The shell (banner, head, footer) is redrawn only when it changes; the rows are patched.
  const shell = `${banner}<table><thead>${head}</thead><tbody></tbody></table><div class="foot"></div>` +
    (list.length ? "" : `<p class="muted">No ${state.tab} jobs${Object.keys(state.filters).length ? " match the filter" : ""}.</p>`);
  const root = $("jobs");
  if (shell !== jobsShell || !root.querySelector("tbody")) {
    root.innerHTML = shell;
    jobsShell = shell;
    rowCache.keys = [];
    jobsFoot = "";
  }
  patch(root.querySelector("tbody"), rows, rowCache);
  // Ages are text set in place (whole seconds), so a row's HTML changes only with its job.
  const now = serverNow();
  for (const cell of root.querySelectorAll("[data-since]")) {
    const text = age(now - Number(cell.dataset.since));
    if (cell.textContent !== text) cell.textContent = text;
  }
  // The footer's count changes with every claim; it is drawn apart so the shell stays.
  if (foot !== jobsFoot) {
    root.querySelector(".foot").innerHTML = foot;
    jobsFoot = foot;
  }
  drawBulk(list);
  drawKnown((text) => {
    const note = $("filter-note");
    if (note && note.textContent !== text) note.textContent = text;
  });
}

/**
 * How many jobs wait, as the broker counts them (`/api/services`: pending and delayed per service),
 * not as many as the snapshot carries (it holds the first 1,000 in claim order). With filters the
 * broker does not count by, the page's own count, marked `+` when the snapshot may hold fewer than
 * there are. `total` is the broker's number when it applies, else null.
 */
function pendingTotal(shown) {
  const svc = state.services && state.services.services;
  if (!svc) return { text: `${shown}`, total: null };
  const f = state.filters;
  const waiting = (names) => names.reduce((t, n) => t + (svc[n] ? svc[n].queue.pending + svc[n].queue.delayed : 0), 0);
  const byService = !f.worker && !f.workflow && !f.customer && (!f.status || f.status === "pending");
  if (byService) {
    const total = Math.max(shown, waiting(f.service ? [f.service] : Object.keys(svc)));
    return { text: `${total}`, total };
  }
  const carried = Object.values(live.snapshot.jobs).filter((j) => j.status === "pending").length;
  const more = carried < waiting(Object.keys(svc));
  return { text: `${shown}${more ? "+" : ""}`, total: null };
}

/**
 * The values the filters can take, as the fleet knows them now (services of the fleet table,
 * registered workers, workflows and customers of unfinished jobs), offered as the inputs'
 * suggestions; a filter naming none of them says so instead of silently matching nothing.
 */
function drawKnown(filterNote) {
  const s = live.snapshot;
  const jobs = Object.values(s.jobs);
  const known = {
    services: Object.keys((state.services && state.services.services) || {}),
    workers: Object.keys(s.workers),
    workflows: [...new Set(jobs.map((j) => j.workflow_id).filter(Boolean))],
    customers: [...new Set(jobs.map((j) => j.customer_id).filter(Boolean))],
  };
  for (const [k, values] of Object.entries(known)) {
    const html = values.sort().slice(0, 200).map((v) => `<option value="${esc(v)}"></option>`).join("");
    const list = $(`known-${k}`);
    if (list && list.innerHTML !== html) list.innerHTML = html;
  }
  const service = state.filters.service;
  const unknown = service && state.services && !known.services.includes(service);
  filterNote(unknown ? `no service is named "${service}" (known: ${known.services.join(", ") || "none"})` : "");
}

function drawBulk(list) {
  const actionable = state.tab === "finished" ? list.filter((j) => j.status !== "completed") : list;
  const verb = state.tab === "finished" ? "Retry" : "Cancel";
  $("bulk").innerHTML = actionable.length
    ? `<button type="button" class="${verb === "Cancel" ? "danger" : ""}" id="bulk-action" data-admin${state.bulkRunning ? " disabled" : ""}>${state.bulkRunning ? `${verb} running…` : `${verb} every ${state.tab} job matching the filter…`}</button>`
    : "";
}

function drawServices() {
  const svc = state.services;
  if (!svc) return;
  const rows = Object.entries(svc.services).map(([name, s]) => `<tr data-service="${esc(name)}">
    <td>${esc(name)}${s.paused ? ` <span class="status" data-status="paused">paused</span>` : ""}
      <button type="button" data-admin data-pause="${esc(name)}" data-paused="${s.paused}">${s.paused ? "Resume" : "Pause"}</button></td><td class="num">${s.total}</td>
    <td>${["starting", "idle", "active", "error", "offline"].filter((k) => s[k]).map((k) => `<span class="badge" data-status="${k}">${s[k]} ${k}</span>`).join(" ")}
      ${s.stale ? `<span class="badge" data-stale="true">${s.stale} </span>` : ""}</td>
    <td class="num">${s.queue.pending}</td><td class="num">${s.queue.running}</td><td class="num">${s.queue.delayed}</td>
    <td class="num">${s.durations ? duration(s.durations.p50_ms) : ""}</td><td class="num">${s.durations ? duration(s.durations.p90_ms) : ""}</td></tr>`);
  $("services").innerHTML = rows.length
    ? `<table><thead><tr><th>service</th><th class="num">connectors</th><th>by status</th><th class="num">pending</th>
       <th class="num">running</th><th class="num">delayed</th><th class="num">p50</th><th class="num">p90</th></tr></thead><tbody>${rows.join("")}</tbody></table>`
    : `<p class="muted">No service is configured or queued yet.</p>`;
}

// ----- data that is fetched, not folded ------------------------------------------------------

/**
 * Queue position and ETA of the first pending rows, as the API estimates them (`GET /api/jobs/{id}`:
 * the broker's exact position, the API's run-time statistics), refreshed at most every 3 s.
 */
let estimates = new Map();
let estimating = false;
let estimatedAt = 0;
async function refreshEstimates(ids) {
  if (estimating || Date.now() - estimatedAt < 3000 || !ids.length) return;
  estimating = true;
  const next = new Map();
  try {
    for (const id of ids.slice(0, 20)) {
      try {
        const j = await api(`/api/jobs/${encodeURIComponent(id)}`);
        next.set(id, { position: j.queue_position, eta: j.eta_ms });
      } catch { /* that row shows none */ }
    }
  } finally {
    estimates = next;
    estimating = false;
    estimatedAt = Date.now();
  }
  mark("jobs");
}

let servicesTimer = 0;
/** Reads `/api/services` again within `ms` (once, however many changes ask meanwhile). */
function refreshServicesSoon(ms = 250) {
  if (servicesTimer) return;
  servicesTimer = setTimeout(refreshServices, ms);
}
async function refreshServices() {
  servicesTimer = 0;
  try {
    state.services = await api("/api/services");
    mark("services", "jobs");
  } catch { /* shown by the connection pill */ }
}

async function loadFinished(more) {
  const q = new URLSearchParams();
  for (const k of ["service", "worker", "workflow", "customer"]) if (state.filters[k]) q.set(k, state.filters[k]);
  const statuses = state.filters.status && TERMINAL.has(state.filters.status) ? [state.filters.status] : ["completed", "failed", "cancelled"];
  // The latest to finish first (the broker orders them by end time).
  q.set("order", "finished");
  q.set("limit", "50");
  if (statuses.length === 1) q.set("status", statuses[0]);
  if (more && state.finishedNext) q.set("cursor", state.finishedNext);
  try {
    const page = await api(`/api/jobs?${q}`);
    const got = page.jobs.filter((j) => TERMINAL.has(j.status));
    state.finished = more ? state.finished.concat(got) : got;
    state.finishedNext = page.next || null;
    if (!more) state.newFinished = 0;
    mark("jobs");
  } catch { /* shown by the connection pill */ }
}

// ----- the job detail -------------------------------------------------------------------------

async function openJob(id, { quiet = false } = {}) {
  const dialog = $("job-dialog");
  dialog.dataset.jobId = id;
  $("job-title").textContent = `Job ${id}`;
  // A redraw of the open detail keeps what is shown until the new picture is ready.
  const expanded = new Set([...$("job-body").querySelectorAll("details[open] > summary")].map((s) => s.textContent));
  if (!quiet) $("job-body").innerHTML = `<p class="muted">Loading…</p>`;
  if (!dialog.open) dialog.showModal();
  const q = new URLSearchParams(location.search);
  q.set("job", id);
  history.replaceState(null, "", `${location.pathname}?${q}`);
  let job;
  try {
    job = await api(`/api/jobs/${encodeURIComponent(id)}`);
  } catch (e) {
    $("job-body").innerHTML = `<p class="error">${esc(e.message)}</p>`;
    return;
  }
  let why = "";
  if (!TERMINAL.has(job.status)) {
    try {
      const m = await api(`/api/jobs/${encodeURIComponent(id)}/matching-workers`);
      const counts = {};
      for (const w of m.workers) counts[w.verdict] = (counts[w.verdict] || 0) + 1;
      const reasons = {};
      for (const w of m.workers) for (const r of w.reasons) reasons[r] = (reasons[r] || 0) + 1;
      const summary = `${m.workers.length} workers: ` +
        ["matches", "busy", "incompatible"].map((v) => `${counts[v] || 0} ${v}`).join(", ") +
        (Object.keys(reasons).length ? "; " + Object.entries(reasons).map(([r, n]) => `${n} ${r}`).join("; ") : "");
      why = `<h3>Why it is${job.status === "pending" ? " not yet" : ""} running</h3><p id="why-summary">${esc(summary)}</p>
        <table><thead><tr><th>worker</th><th>verdict</th><th>reasons</th></tr></thead><tbody>${m.workers.map((w) =>
          `<tr><td>${esc(w.worker_id)}</td><td>${esc(w.verdict)}</td><td>${esc(w.reasons.join("; "))}</td></tr>`).join("")}</tbody></table>`;
    } catch { /* the rest of the detail still shows */ }
  }
  // Another job was opened meanwhile: this answer is not what the dialog shows any more.
  if (dialog.dataset.jobId !== id) return;
  const outcome = job.outcome || null;
  const ends = (job.history || []).map((h) => `<tr data-attempt="${esc(h.attempt)}" data-end="${esc(h.end)}">
      <td class="num">${esc(h.attempt)}</td><td>${esc(h.worker_id || "")}</td><td>${esc(time(h.started_at))}</td>
      <td>${duration(h.ended_at - (h.started_at ?? h.ended_at))}</td>
      <td><span class="status" data-status="${esc(h.end)}">${h.end === "pending" ? "given back" : esc(h.end)}</span></td>
      <td>${esc(h.reason || "")}</td><td>${h.error ? esc(`${h.error.category}: ${h.error.message}`) : ""}</td></tr>`).join("");
  const now = !TERMINAL.has(job.status) && job.started_at && job.status !== "pending"
    ? `<tr><td class="num">${esc(job.attempt)}</td><td>${esc(job.worker_id || "")}</td><td>${esc(time(job.started_at))}</td>
      <td>${duration(serverNow() - job.started_at)}</td><td><span class="status" data-status="${esc(job.status)}">running</span></td><td></td><td>${esc(job.message || "")}</td></tr>` : "";
  const timeline = `<h3>Timeline</h3><p class="muted">submitted ${esc(time(job.created_at))}</p>${ends || now
    ? `<table id="timeline"><thead><tr><th class="num">attempt</th><th>worker</th><th>started</th><th>ran</th><th>end</th><th>reason</th><th>error</th></tr></thead><tbody>${ends}${now}</tbody></table>`
    : `<p class="muted">No attempt yet.</p>`}`;
  const images = outcome && outcome.kind === "result" ? imagesOf(id, outcome.value) : [];
  const cancellable = !TERMINAL.has(job.status);
  const retryable = job.status === "failed" || job.status === "cancelled";
  $("job-body").innerHTML = `
    <p><span class="status" data-status="${esc(job.status)}" data-unworkable="${job.unworkable}">${esc(job.status)}${job.unworkable ? " · unworkable" : ""}</span>
      attempt ${esc(job.attempt)}/${esc(job.max_attempts)} · ${esc(job.service)} · priority ${esc(job.workflow_priority ?? job.priority)}
      ${job.queue_position ? ` · position ${esc(job.queue_position)}` : ""}${job.eta_ms != null ? ` · ETA ${duration(job.eta_ms)}` : ""}
      ${job.cancel_requested ? " · cancel requested" : ""}</p>
    <p class="muted">submitted ${esc(time(job.created_at))}${job.started_at ? ` · started ${esc(time(job.started_at))}` : ""}
      ${job.finished_at ? ` · finished ${esc(time(job.finished_at))}` : ""}${job.worker_id ? ` · worker ${esc(job.worker_id)}` : ""}
      ${job.customer_id ? ` · customer ${esc(job.customer_id)}` : ""}${job.workflow_id ? ` · workflow ${esc(job.workflow_id)}${job.step_number != null ? ` step ${esc(job.step_number)}` : ""}` : ""}</p>
    ${job.error ? `<p class="error">${esc(job.error.category)}: ${esc(job.error.message)}</p>` : ""}
    <div class="row">
      ${cancellable ? `<button type="button" class="danger" data-admin data-action="cancel" data-id="${esc(id)}">Cancel</button>` : ""}
      ${retryable ? `<button type="button" data-admin data-action="retry" data-id="${esc(id)}">Retry</button>` : ""}
      <span id="action-result" role="status">${actionNote && actionNote.id === id ? esc(actionNote.text) : ""}</span>
    </div>
    ${timeline}
    ${why}
    ${images.length ? `<h3>Outputs</h3><div class="images">${images.map((src) => `<img src="${esc(src)}" alt="output image" loading="lazy">`).join("")}</div>` : ""}
    <details><summary>Requirements</summary><pre>${esc(preview(job.spec.requirements ?? {}))}</pre></details>
    <details><summary>Payload</summary><pre>${esc(preview(job.spec.payload))}</pre></details>
    ${outcome ? `<details open><summary>Outcome</summary><pre>${esc(preview(outcome))}</pre></details>` : ""}`;
  if (quiet) {
    for (const d of $("job-body").querySelectorAll("details")) {
      if (expanded.has(d.querySelector("summary")?.textContent)) d.open = true;
    }
  }
}

/** What the last action on the open job answered: kept when its detail is redrawn. */
let actionNote = null;

async function act(action, id) {
  const say = (text) => {
    actionNote = { id, text };
    const out = $("action-result");
    if (out) out.textContent = text;
  };
  try {
    await api(`/api/jobs/${encodeURIComponent(id)}/${action}`, { method: "POST" });
    say(`${action} sent`);
    setTimeout(() => openJob(id, { quiet: true }), 300);
  } catch (e) {
    say(e.status === 403 ? "this token may not do that" : e.message);
  }
}

/** The statuses a tab's bulk action applies to, narrowed by the status filter. */
function bulkStatuses() {
  const of = { pending: ["pending"], active: ["assigned", "in_progress"], finished: ["failed", "cancelled"] }[state.tab];
  return state.filters.status ? of.filter((s) => s === state.filters.status) : of;
}

/** Every job id matching the filter in those statuses, paged from the API (at most 100,000). */
/** The server's bulk action over the filter, one status at a time (`dry_run` counts). */
async function bulkOnServer(action, statuses, dryRun) {
  const total = { matched: 0, done: 0, failed: 0 };
  for (const status of statuses) {
    const filter = { status };
    for (const k of ["service", "worker", "workflow", "customer"]) if (state.filters[k]) filter[k] = state.filters[k];
    const r = await api("/api/bulk", { method: "POST", body: { action, filter, dry_run: dryRun } });
    total.matched += r.matched;
    total.done += r.done + r.already_finished;
    total.failed += r.failed;
  }
  return total;
}

/**
 * Cancels (pending, active) or retries (finished) everything matching the filter, on the server,
 * after saying how many. The button stays disabled (through redraws) until it is over.
 */
async function bulk() {
  if (state.bulkRunning) return;
  const verb = state.tab === "finished" ? "retry" : "cancel";
  state.bulkRunning = true;
  mark("jobs");
  try {
    let count;
    try {
      count = await bulkOnServer(verb, bulkStatuses(), true);
    } catch (e) {
      alert(`could not count the jobs: ${e.message}`);
      return;
    }
    if (!count.matched || !confirm(`${verb} ${count.matched} jobs?`)) return;
    try {
      const done = await bulkOnServer(verb, bulkStatuses(), false);
      alert(`${verb}: ${done.done} of ${done.matched} done${done.failed ? `, ${done.failed} refused` : ""}`);
    } catch (e) {
      alert(`${verb} stopped: ${e.message}`);
    }
    if (state.tab === "finished") loadFinished(false);
  } finally {
    state.bulkRunning = false;
    mark("jobs");
  }
}

// ----- wiring ----------------------------------------------------------------------------------

function init() {
  readFilters();
  $("utc").checked = isUtc();
  $("utc").addEventListener("change", (e) => { setUtc(e.target.checked); mark("machines", "jobs"); });
  $("token-button").addEventListener("click", () => askToken("Kept in the fleetq_token cookie."));
  $("filters").addEventListener("submit", (e) => {
    e.preventDefault();
    const form = e.target;
    state.filters = {};
    for (const k of ["service", "status", "worker", "workflow", "customer"]) if (form.elements[k].value.trim()) state.filters[k] = form.elements[k].value.trim();
    // A finished status is found on the Finished tab, not as an empty Pending list.
    if (state.filters.status && TERMINAL.has(state.filters.status)) state.tab = "finished";
    else if (state.filters.status === "pending") state.tab = "pending";
    else if (["assigned", "in_progress"].includes(state.filters.status)) state.tab = "active";
    writeUrl();
    if (state.tab === "finished") loadFinished(false);
    mark("jobs");
  });
  $("find").addEventListener("click", () => {
    const id = $("filters").elements.id.value.trim();
    if (id) openJob(id);
  });
  for (const b of document.querySelectorAll(".tabs button")) {
    b.addEventListener("click", () => {
      state.tab = b.dataset.tab;
      writeUrl();
      if (state.tab === "finished") loadFinished(false);
      mark("jobs");
    });
  }
  document.body.addEventListener("click", (e) => {
    const t = e.target.closest("[data-action], [data-open], [data-pause], #more, #show-new, #bulk-action");
    if (!t) return;
    if (t.dataset.pause) {
      const toggle = t.dataset.paused === "true" ? "resume" : "pause";
      const service = t.dataset.pause;
      t.disabled = true;
      api(`/api/services/${encodeURIComponent(service)}/${toggle}`, { method: "POST" })
        .then(refreshServices)
        .catch((err) => alert(`${toggle} ${service}: ${err.message}`));
      return;
    }
    if (t.id === "more") loadFinished(true);
    else if (t.id === "show-new") loadFinished(false);
    else if (t.id === "bulk-action") bulk();
    else if (t.dataset.action) act(t.dataset.action, t.dataset.id);
    else if (t.dataset.open) openJob(t.dataset.open);
  });
  document.body.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.target.dataset && e.target.dataset.open) openJob(e.target.dataset.open);
  });
  $("job-dialog").addEventListener("close", () => {
    const q = new URLSearchParams(location.search);
    q.delete("job");
    history.replaceState(null, "", `${location.pathname}${q.toString() ? `?${q}` : ""}`);
  });
  // Ages and staleness move with time, not only with events.
  // A part holding the keyboard focus waits for a real change, so the tick never steals it.
  setInterval(() => {
    for (const part of ["machines", "jobs"]) if (!$(part).contains(document.activeElement)) mark(part);
  }, 1000);
  setInterval(refreshServices, 5000);
  refreshServices();
  whoami();
  live.start();
  if (state.tab === "finished") loadFinished(false);
  const job = new URLSearchParams(location.search).get("job");
  if (job) openJob(job);
}

init();
