// The client page: build and submit a job (payload templates, a requirements builder, workflow
// fields, batches), then follow the submitted jobs live to their results, with cancel.

import { EVENT_KINDS, TERMINAL, api, askToken, esc, imagesOf, whoami } from "./api.js";

const $ = (id) => document.getElementById(id);

/** Payload templates per service, each what that connector accepts. */
const TEMPLATES = {
  simulation: { steps: 10, step_ms: 300 },
  comfyui: {
    prompt: {
      "1": { class_type: "EmptyImage", inputs: { width: 512, height: 512, batch_size: 1, color: 3368601 } },
      "2": { class_type: "SaveImage", inputs: { images: ["1", 0], filename_prefix: "fleetq" } },
    },
  },
  a1111: { prompt: "a lighthouse at dusk", steps: 20, width: 512, height: 512, seed: 7 },
  openai: { model: "gpt-4o-mini", messages: [{ role: "user", content: "Say hello" }] },
};

/** Jobs submitted from this page: id → summary. Their ids outlive a reload (the newest 200). */
const mine = new Map();
const KEPT = "fleetq-client-jobs";

function keep() {
  try { localStorage.setItem(KEPT, JSON.stringify([...mine.keys()].slice(-200))); } catch { /* private mode */ }
}

/** The jobs of an earlier visit, read again (one another token may not read is dropped). */
function restore() {
  let ids = [];
  try { ids = JSON.parse(localStorage.getItem(KEPT) || "[]"); } catch { ids = []; }
  for (const id of Array.isArray(ids) ? ids : []) {
    if (typeof id !== "string") continue;
    mine.set(id, { id, status: "pending", progress: 0 });
    refresh(id, { dropMissing: true });
  }
  draw();
}

function useTemplate() {
  const form = $("submit");
  const name = form.elements.template.value;
  form.elements.payload.value = JSON.stringify(TEMPLATES[name], null, 2);
  if (name !== "simulation" || !form.elements.service.value) form.elements.service.value = name;
}

// ----- requirements builder: rows of (must | must not, path, value) → a requirements object ----

function addRequirement(kind = "must", path = "", value = "") {
  const row = document.createElement("div");
  row.className = "row req";
  row.innerHTML = `<select aria-label="kind"><option value="must">must have</option><option value="not">must not have</option></select>
    <input aria-label="path" placeholder="hardware.gpu_memory_gb" size="22" value="${esc(path)}">
    <input aria-label="value (JSON)" placeholder="16 or &quot;rtx4090&quot; or [&quot;sdxl&quot;]" size="22" value="${esc(value)}">
    <button type="button" aria-label="remove requirement">✕</button>`;
  row.querySelector("select").value = kind;
  row.querySelector("button").addEventListener("click", () => { row.remove(); showRequirements(); });
  row.addEventListener("input", showRequirements);
  $("req-rows").append(row);
  showRequirements();
}

/** The requirements object the rows describe; a value that is not JSON is taken as a string. */
function requirements() {
  const positive = {};
  const negative = {};
  for (const row of document.querySelectorAll("#req-rows .req")) {
    const [kind, path, raw] = [row.querySelector("select").value, ...[...row.querySelectorAll("input")].map((i) => i.value.trim())];
    if (!path) continue;
    let value;
    try { value = JSON.parse(raw); } catch { value = raw; }
    (kind === "not" ? negative : positive)[path] = value;
  }
  if (!Object.keys(negative).length) return Object.keys(positive).length ? positive : undefined;
  return { positive_requirements: positive, negative_requirements: negative };
}

function showRequirements() {
  const r = requirements();
  $("req-preview").textContent = r ? JSON.stringify(r) : "(none)";
}

// ----- submission --------------------------------------------------------------------------------

function spec() {
  const f = $("submit").elements;
  const payload = JSON.parse(f.payload.value || "null");
  const job = { service: f.service.value.trim(), payload };
  const r = requirements();
  if (r) job.requirements = r;
  const int = (name) => (f[name].value === "" ? undefined : Number(f[name].value));
  for (const k of ["priority", "workflow_priority", "workflow_datetime", "step_number"]) {
    const v = int(k);
    if (v !== undefined && !(k === "priority" && v === 0)) job[k] = v;
  }
  for (const k of ["customer_id", "workflow_id"]) if (f[k].value.trim()) job[k] = f[k].value.trim();
  return job;
}

async function submit(e) {
  e.preventDefault();
  $("submit-error").textContent = "";
  $("submit-result").textContent = "";
  let job;
  try {
    job = spec();
  } catch (err) {
    $("submit-error").textContent = `payload: not valid JSON (${err.message})`;
    return;
  }
  const count = Math.min(1000, Math.max(1, Number($("submit").elements.count.value) || 1));
  try {
    const reply = await api("/api/jobs", { method: "POST", body: count === 1 ? job : Array.from({ length: count }, () => job) });
    const ids = count === 1 ? [reply.id] : reply.jobs.map((j) => j.id);
    for (const id of ids) mine.set(id, { id, status: "pending", progress: 0 });
    keep();
    $("submit-result").textContent = `submitted ${ids.length}`;
    draw();
    for (const id of ids) refresh(id);
  } catch (err) {
    $("submit-error").textContent = err.field ? `${err.field}: ${err.message}` : err.message;
  }
}

async function refresh(id, { dropMissing = false } = {}) {
  try {
    const job = await api(`/api/jobs/${encodeURIComponent(id)}`);
    mine.set(id, job);
    draw();
  } catch (e) {
    // Gone (retention) or not this token's: not shown again.
    if (dropMissing && e.status === 404) {
      mine.delete(id);
      keep();
      draw();
    }
    /* otherwise the stream brings it */
  }
}

function draw() {
  const rows = [...mine.values()].reverse().map((j) => {
    // No registered worker can serve it: say so, not a plain `pending` that never moves.
    const shown = j.status === "pending" && j.unworkable ? "unworkable" : j.status;
    return `<tr data-job-id="${esc(j.id)}" data-status="${esc(j.status)}">
    <td class="mono"><a href="/?job=${encodeURIComponent(j.id)}" title="open in the monitor">${esc(j.id)}</a></td>
    <td><span class="status" data-status="${esc(shown)}"${shown === "unworkable" ? ` data-unworkable="true" title="no registered worker can serve it: the monitor's job detail says why"` : ""}>${esc(shown)}</span>${j.error ? ` <span class="error">${esc(j.error.message)}</span>` : ""}</td>
    <td><div class="bar" role="progressbar" aria-valuenow="${Math.round(j.progress)}" aria-valuemin="0" aria-valuemax="100"><span style="width:${j.progress}%"></span></div> ${esc(j.message || "")}</td>
    <td>${TERMINAL.has(j.status) ? "" : `<button type="button" class="danger" data-submit data-cancel="${esc(j.id)}">Cancel</button>`}</td></tr>`;
  });
  $("mine").innerHTML = rows.join("");
  const results = [...mine.values()].filter((j) => j.outcome && j.outcome.kind === "result").slice(-12).reverse();
  $("results").innerHTML = results.map((j) => {
    const images = imagesOf(j.id, j.outcome.value);
    return `<h3 class="mono">${esc(j.id)}</h3>${images.length
      ? `<div class="images">${images.map((src) => `<img src="${esc(src)}" alt="output of ${esc(j.id)}">`).join("")}</div>`
      : `<pre>${esc(JSON.stringify(j.outcome.value, null, 2).slice(0, 4000))}</pre>`}`;
  }).join("");
}

/** Follows every job event and keeps those of this page's jobs; a finished one is read whole. */
function follow() {
  const source = new EventSource("/api/events?topics=jobs");
  source.onopen = () => { $("conn").dataset.state = "live"; $("conn").textContent = "live"; };
  source.onerror = () => {
    const closed = source.readyState === EventSource.CLOSED;
    $("conn").dataset.state = closed ? "offline" : "reconnecting";
    $("conn").textContent = closed ? "offline" : "reconnecting";
    if (closed) setTimeout(follow, 2000);
  };
  for (const kind of EVENT_KINDS) {
    source.addEventListener(kind, (m) => {
      let e;
      try { e = JSON.parse(m.data); } catch { return; }
      if (!e.job || !mine.has(e.job.id)) return;
      mine.set(e.job.id, { ...mine.get(e.job.id), ...e.job });
      if (TERMINAL.has(e.job.status)) refresh(e.job.id);
      else draw();
    });
  }
}

function init() {
  useTemplate();
  showRequirements();
  $("use-template").addEventListener("click", useTemplate);
  $("add-req").addEventListener("click", () => addRequirement());
  $("submit").addEventListener("submit", submit);
  $("token-button").addEventListener("click", () => askToken("Kept in the fleetq_token cookie."));
  $("mine").addEventListener("click", async (e) => {
    const id = e.target.dataset && e.target.dataset.cancel;
    if (!id) return;
    try {
      await api(`/api/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    } catch (err) {
      $("submit-error").textContent = err.status === 403 ? "this token may not cancel that job" : err.message;
    }
  });
  whoami();
  follow();
  restore();
}

init();
