// Talking to the fleetq API from a page: requests with the token cookie, the live event stream
// folded over a snapshot, and the formatting both pages share. No dependencies, no build step.

/** The event kinds the broker emits (`EventKind::name`); the stream names each SSE event so. */
export const EVENT_KINDS = [
  "job_submitted", "job_claimed", "job_progress", "job_requeued", "job_completed", "job_failed",
  "job_cancel_requested", "job_cancelled", "job_retried", "partition_workability", "service_paused",
  "worker_registered", "worker_removed", "connector_status", "machine", "undecodable",
];

/** Terminal job statuses. */
export const TERMINAL = new Set(["completed", "failed", "cancelled"]);

/** An API error with the server's code, message and field. */
export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code;
    this.field = e.field;
  }
}

/**
 * Server time minus browser time (ms): first from the `Date` header (whole seconds), then from
 * events, which arrive within milliseconds of their `at` (the largest offset seen is the one with
 * the least delay in it).
 */
let skew = 0;
let skewFromEvents = false;
export const serverNow = () => Date.now() + skew;
function noteServerTime(at) {
  const offset = at - Date.now();
  if (!skewFromEvents || offset > skew) skew = offset;
  skewFromEvents = true;
}

/** A JSON request; asks for a token once when the API answers 401. */
export async function api(path, { method = "GET", body, headers = {} } = {}) {
  const init = { method, headers: { ...headers }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = typeof body === "string" ? body : JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const date = Date.parse(res.headers.get("date") || "");
  if (!Number.isNaN(date) && !skewFromEvents) skew = Math.round((date - Date.now()) / 1000) * 1000;
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  if (res.status === 401) {
    askToken("This fleetq asks for a token.");
    throw new ApiError(401, json);
  }
  if (!res.ok) throw new ApiError(res.status, json);
  return json;
}

/** Marks the page with the caller's role (`data-role` on `<body>`), which shows its actions. */
export async function whoami() {
  try {
    const me = await api("/api/me");
    document.body.dataset.role = me.role;
    const who = document.getElementById("me");
    if (who) who.textContent = me.name ? `${me.name} (${me.role})` : "";
    return me;
  } catch {
    return null;
  }
}

/** Shows the token dialog; the token is kept in the `fleetq_token` cookie the API accepts. */
export function askToken(why) {
  let dialog = document.getElementById("token-dialog");
  if (!dialog) {
    dialog = document.createElement("dialog");
    dialog.id = "token-dialog";
    dialog.setAttribute("aria-labelledby", "token-h");
    dialog.innerHTML = `<form>
      <h2 id="token-h" style="font-size:1rem;margin-top:0">API token</h2>
      <p class="why muted"></p>
      <label>Token <input name="token" type="password" autocomplete="off" size="40"></label>
      <button class="primary">Save</button>
    </form>`;
    document.body.append(dialog);
  }
  if (dialog.open) return;
  dialog.querySelector(".why").textContent = why || "";
  dialog.showModal();
  const form = dialog.querySelector("form");
  form.onsubmit = (e) => {
    e.preventDefault();
    const token = form.elements.token.value.trim();
    // Secure over https: the cookie must never travel in clear text.
    const secure = location.protocol === "https:" ? "; Secure" : "";
    document.cookie = `fleetq_token=${encodeURIComponent(token)}; path=/; SameSite=Strict${secure}`;
    dialog.close();
    location.reload();
  };
}

/**
 * The live picture: loads the snapshot, then folds every event after it, as `Snapshot::apply`
 * does on the server (events at or before the picture's `seq` are ignored, so a resumed stream
 * never counts one twice). The browser's EventSource reconnects by itself and resumes with
 * `Last-Event-ID`; a `resync` (the resume point left the log) reloads the snapshot.
 */
export class Live {
  constructor({ onChange, onEvent, onState }) {
    this.onChange = onChange;
    this.onEvent = onEvent || (() => {});
    this.onState = onState || (() => {});
    this.snapshot = null;
    this.source = null;
  }

  async start() {
    this.onState("connecting");
    try {
      this.snapshot = await api("/api/snapshot");
    } catch (e) {
      // Without a (valid) token the API answers, but says no: not the same as it being down.
      this.onState(e.status === 401 ? "unauthorized" : "offline");
      setTimeout(() => this.start(), 2000);
      return;
    }
    this.onChange("snapshot");
    this.open(this.snapshot.seq);
  }

  open(since) {
    if (this.source) this.source.close();
    const source = new EventSource(`/api/events?since=${encodeURIComponent(since)}`);
    this.source = source;
    source.onopen = () => this.onState("live");
    source.onerror = () => {
      // CLOSED: the browser gave up (e.g. a 401 or 503); start over after a pause.
      if (source.readyState === EventSource.CLOSED) {
        this.onState("offline");
        setTimeout(() => this.start(), 2000);
      } else {
        this.onState("reconnecting");
      }
    };
    for (const kind of EVENT_KINDS) {
      source.addEventListener(kind, (m) => this.fold(m));
    }
    source.addEventListener("resync", () => {
      source.close();
      this.start();
    });
    source.addEventListener("workers_seen", (m) => this.seen(m));
  }

  /**
   * The server's periodic `workers_seen`: each worker's last heartbeat and the time of each of its
   * connector reports (unchanged reports are not events), so what is alive never turns stale on a
   * page left open. Only times move forward here; statuses change by events.
   */
  seen(message) {
    let e;
    try { e = JSON.parse(message.data); } catch { return; }
    const s = this.snapshot;
    if (!s || !e.workers) return;
    if (typeof e.at === "number") noteServerTime(e.at);
    for (const [id, fresh] of Object.entries(e.workers)) {
      const w = s.workers[id];
      if (!w) continue;
      if (typeof fresh.last_seen === "number" && fresh.last_seen > (w.last_seen || 0)) w.last_seen = fresh.last_seen;
      for (const [service, at] of Object.entries(fresh.connectors || {})) {
        const report = w.connectors && w.connectors[service];
        if (report && typeof at === "number" && at > report.at) report.at = at;
      }
    }
    this.onChange("workers_seen");
  }

  fold(message) {
    let event;
    try { event = JSON.parse(message.data); } catch { return; }
    const s = this.snapshot;
    if (!s || typeof event.seq !== "number" || event.seq <= s.seq) return;
    s.seq = event.seq;
    if (typeof event.at === "number") noteServerTime(event.at);
    switch (event.type) {
      case "service_paused": {
        const paused = new Set(s.paused || []);
        if (event.paused) paused.add(event.service);
        else paused.delete(event.service);
        s.paused = [...paused].sort();
        break;
      }
      case "partition_workability":
        for (const j of Object.values(s.jobs)) {
          if (j.partition === event.partition && j.status === "pending") j.unworkable = event.unworkable;
        }
        break;
      case "worker_registered":
        s.workers[event.worker.worker_id] = event.worker;
        break;
      case "worker_removed":
        delete s.workers[event.worker_id];
        break;
      case "connector_status": {
        const w = s.workers[event.worker_id];
        if (w) w.connectors = { ...(w.connectors || {}), [event.report.service]: event.report };
        break;
      }
      case "machine": {
        const m = s.machines[event.event.machine_id] || { phase: "starting", steps: [] };
        applyMachine(m, event.event);
        s.machines[event.event.machine_id] = m;
        break;
      }
      default:
        if (event.job) {
          // The broker counts each worker's completions; folded here as `Snapshot::apply` does.
          const by = event.type === "job_completed" && event.job.worker_id && s.workers[event.job.worker_id];
          if (by) by.completed = (by.completed || 0) + 1;
          if (TERMINAL.has(event.job.status)) delete s.jobs[event.job.id];
          else s.jobs[event.job.id] = event.job;
        }
    }
    this.onEvent(event);
    this.onChange(event.type);
  }
}

/** `MachineState::apply`: a step is part of starting; a new start clears the steps. */
function applyMachine(m, e) {
  m.machine_id = e.machine_id;
  if (e.phase === "starting") m.steps = [];
  if (e.step) m.steps = [...(m.steps || []), e.step];
  if (e.phase !== "step") m.phase = e.phase;
  m.message = e.message ?? null;
  m.updated_at = e.at;
}

// ----- formatting ----------------------------------------------------------------------------

let utc = localStorage.getItem("fleetq_utc") === "1";
export const isUtc = () => utc;
export function setUtc(on) {
  utc = on;
  localStorage.setItem("fleetq_utc", on ? "1" : "0");
}

/** ISO 8601 time, local (with offset) or UTC. */
export function time(ms) {
  if (ms === null || ms === undefined) return "";
  const d = new Date(ms);
  if (utc) return d.toISOString().replace(/\.\d+Z$/, "Z");
  const pad = (n) => String(n).padStart(2, "0");
  const off = -d.getTimezoneOffset();
  const sign = off >= 0 ? "+" : "-";
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:` +
    `${pad(d.getMinutes())}:${pad(d.getSeconds())}${sign}${pad(Math.floor(Math.abs(off) / 60))}:${pad(Math.abs(off) % 60)}`;
}

/** A duration for people: 850 ms, 12.3 s, 4 m 05 s, 2 h 03 m. */
export function duration(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "";
  ms = Math.max(0, ms);
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const s = Math.floor(ms / 1000);
  if (s < 3600) return `${Math.floor(s / 60)} m ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} m`;
}

/** Escapes text for HTML. */
export function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

/** JSON shown in the page, cut at `max` characters so a multi-megabyte payload cannot freeze it. */
export function preview(value, max = 20_000) {
  const text = JSON.stringify(value, null, 2) ?? "null";
  return text.length > max ? `${text.slice(0, max)}\n… (${text.length - max} more characters)` : text;
}

/** The images a result names: artifacts (served by the API) and ComfyUI `/view` links. */
export function imagesOf(jobId, value) {
  const out = [];
  const visit = (v) => {
    if (out.length >= 24 || v === null || typeof v !== "object") return;
    if (Array.isArray(v)) { v.forEach(visit); return; }
    if (typeof v.artifact === "string") {
      const name = v.artifact.split("/").pop();
      out.push(`/api/jobs/${encodeURIComponent(jobId)}/artifacts/${encodeURIComponent(name)}`);
      return;
    }
    if (typeof v.url === "string" && /^https?:\/\//.test(v.url) && /\.(png|jpe?g|webp|gif)/i.test(v.url)) {
      out.push(v.url);
      return;
    }
    Object.values(v).forEach(visit);
  };
  visit(value);
  return out;
}
