// Hodei dashboard: a small single-page app over /api/v1. No build step, no
// dependencies. Every value from the server is put into the page as text
// (never as HTML), so job names and log lines cannot inject markup.
"use strict";

const STATES = ["PENDING", "SCHEDULED", "ASSIGNED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"];
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"]);
const EVENT_TYPES = [
  "JobCreated", "JobQueued", "JobScheduled", "JobAssigned", "JobStarted", "JobSucceeded", "JobFailed",
  "JobCancelled", "JobTimedOut", "JobRetryScheduled", "JobRetryExhausted", "JobDispatchFailed",
  "WorkerProvisioningRequested", "WorkerProvisioned", "WorkerProvisioningFailed", "WorkerRegistered",
  "WorkerReady", "WorkerDisconnected", "WorkerReconnected", "WorkerDraining", "WorkerTerminated",
  "WorkerRegistrationRejected", "ProviderRegistered", "ProviderUpdated", "ProviderHealthChanged",
  "AutoScalingTriggered", "SecretAccessed",
];
const POLL_MS = 2000;

// ------------------------------------------------------------ plumbing

/** Builds an element; string children become text nodes. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function token() { return localStorage.getItem("hodei.token") || ""; }

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch("/api/v1" + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, "unavailable", "the server cannot be reached (" + e.message + ")");
  }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const err = data && data.error ? data.error : { code: "http_" + r.status, message: text || r.statusText };
    if (r.status === 401) banner("Authentication needed: enter an API token above. (" + err.message + ")", true);
    throw new ApiError(r.status, err.code, err.message);
  }
  return data;
}

function banner(message, isError) {
  const b = document.getElementById("banner");
  if (!message) { b.hidden = true; b.textContent = ""; return; }
  b.hidden = false;
  b.className = "banner" + (isError ? " error" : "");
  b.textContent = message;
}

function badge(state) { return h("span", { class: "badge " + state, text: state }); }
function when(ts) { return ts ? new Date(ts).toLocaleString() : ""; }
function short(id) { return id ? id.slice(0, 8) : ""; }
function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? "?" + s : "";
}

// Per-view resources (timers, event sources), released on navigation.
let cleanups = [];
function onLeave(fn) { cleanups.push(fn); }
function every(ms, fn) { const t = setInterval(fn, ms); onLeave(() => clearInterval(t)); }

function view() { return document.getElementById("view"); }
function show(...nodes) { view().replaceChildren(...nodes); }

// ------------------------------------------------------------ routing

const routes = [
  [/^#\/jobs\/([0-9a-fA-F-]{36})$/, (m) => jobPage(m[1])],
  [/^#\/jobs$/, () => jobsPage()],
  [/^#\/submit$/, () => submitPage()],
  [/^#\/workers$/, () => workersPage()],
  [/^#\/providers$/, () => providersPage()],
  [/^#\/audit$/, () => auditPage()],
  [/^#\/audit\?(.*)$/, (m) => auditPage(new URLSearchParams(m[1]))],
];

function navigate() {
  for (const fn of cleanups) { try { fn(); } catch (_) { /* ignore */ } }
  cleanups = [];
  banner(null);
  const hash = location.hash || "#/jobs";
  const section = hash.split(/[/?]/)[1] || "jobs";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === section);
  for (const [re, page] of routes) {
    const m = hash.match(re);
    if (m) { page(m); return; }
  }
  show(h("h1", { text: "Not found" }), h("p", {}, "No page ", h("code", { text: hash }), "."));
}

// ------------------------------------------------------------ jobs list

function jobsPage() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const filter = h("select", { id: "state-filter", "aria-label": "State filter" },
    h("option", { value: "", text: "All states" }),
    STATES.map((s) => h("option", { value: s, text: s })));
  filter.value = sessionStorage.getItem("hodei.filter") || params.get("state") || "";
  const live = h("input", { type: "checkbox", id: "live-refresh", checked: true });
  const status = h("span", { class: "muted", id: "jobs-status" });
  const tbody = h("tbody");
  const more = h("button", { id: "next-page", hidden: true, text: "Next page" });
  let cursor = null;

  async function load(append) {
    try {
      const page = await api("GET", "/jobs" + query({ state: filter.value, limit: 50, cursor: append ? cursor : "" }));
      cursor = page.next_cursor || null;
      more.hidden = !cursor;
      const rows = page.jobs.map(jobRow);
      if (append) tbody.append(...rows); else tbody.replaceChildren(...rows);
      if (!page.jobs.length && !append) tbody.append(h("tr", {}, h("td", { colspan: 7, class: "muted", text: "No jobs." })));
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      status.textContent = e.message;
    }
  }
  filter.addEventListener("change", () => { sessionStorage.setItem("hodei.filter", filter.value); load(false); });
  more.addEventListener("click", () => load(true));
  // Live refresh re-reads the first page only, so as not to lose the place
  // of someone paging.
  every(POLL_MS, () => { if (live.checked && !cursor) load(false); });
  load(false);

  show(
    h("h1", {}, "Jobs"),
    h("div", { class: "toolbar" },
      filter,
      h("label", { class: "row" }, live, "Live refresh"),
      status,
      h("span", { class: "spacer" }),
      h("a", { class: "button", href: "#/submit", text: "Submit a job" })),
    h("table", { id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["Job", "Name", "State", "Attempt", "Submitted by", "Created", "Updated"].map((t) => h("th", { text: t })))),
      tbody),
    h("p", {}, more));
}

function jobRow(job) {
  return h("tr", { "data-job-id": job.id },
    h("td", { class: "mono" }, h("a", { href: "#/jobs/" + job.id, text: short(job.id) })),
    h("td", { class: "name", text: job.name }),
    h("td", { class: "state" }, badge(job.state)),
    h("td", { text: job.attempt + " / " + job.max_attempts }),
    h("td", { text: job.submitted_by }),
    h("td", { text: when(job.created_at) }),
    h("td", { text: when(job.updated_at) }));
}

// ------------------------------------------------------------ one job

function jobPage(id) {
  const title = h("span", { id: "job-name", text: short(id) });
  const state = h("span", { id: "job-state" });
  const cancel = h("button", { id: "cancel-button", class: "danger", hidden: true, text: "Cancel job" });
  const error = h("div", { class: "error-text", id: "job-error" });
  const details = h("dl", { class: "details", id: "job-details" });
  const spec = h("pre", { class: "spec", id: "job-spec" });
  const attempts = h("tbody");
  const events = h("ol", { class: "timeline", id: "events" });
  const logs = h("pre", { class: "logs", id: "logs" });
  const logStatus = h("span", { class: "muted", id: "logs-status", text: "connecting…" });
  let terminal = false;

  function render(job) {
    terminal = TERMINAL.has(job.state);
    title.textContent = job.name;
    state.replaceChildren(badge(job.state));
    cancel.hidden = terminal;
    const rows = [
      ["Id", job.id],
      ["State", job.state],
      ["Attempt", job.attempt + " of " + job.max_attempts],
      ["Submitted by", job.submitted_by],
      ["Created", when(job.created_at)],
      ["Updated", when(job.updated_at)],
      ["Correlation id", h("a", { href: "#/audit?" + new URLSearchParams({ correlation_id: job.correlation_id }), text: job.correlation_id })],
      ["Provider", job.provider],
      ["Worker", job.worker_id],
      ["Started", when(job.started_at)],
      ["Deadline", when(job.deadline)],
      ["Not before", when(job.not_before)],
      ["Exit code", job.exit_code],
      ["Failure", job.failure ? job.failure.kind + ": " + job.failure.message : null],
      ["Cancel reason", job.cancel_reason],
      ["Timed out during", job.timed_out_during],
    ].filter(([, v]) => v !== undefined && v !== null && v !== "");
    details.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]));
    spec.textContent = JSON.stringify(job.spec, null, 2);
    attempts.replaceChildren(...(job.attempts.length
      ? job.attempts.map((a) => h("tr", {},
        h("td", { text: a.number }),
        h("td", {}, badge(a.outcome.toUpperCase())),
        h("td", { class: "mono", text: short(a.worker_id) }),
        h("td", { text: when(a.started_at) }),
        h("td", { text: when(a.finished_at) }),
        h("td", { text: a.failure ? a.failure.kind + ": " + a.failure.message : "" })))
      : [h("tr", {}, h("td", { colspan: 6, class: "muted", text: "No finished attempt yet." }))]));
  }

  async function refresh() {
    try {
      const [job, ev] = await Promise.all([api("GET", "/jobs/" + id), api("GET", "/jobs/" + id + "/events")]);
      render(job);
      events.replaceChildren(...ev.events.map(eventItem));
      error.textContent = "";
    } catch (e) {
      error.textContent = e.message;
    }
  }

  cancel.addEventListener("click", async () => {
    if (!confirm("Cancel this job?")) return;
    cancel.disabled = true;
    try {
      render(await api("POST", "/jobs/" + id + "/cancel"));
      refresh();
    } catch (e) {
      error.textContent = e.message;
    } finally {
      cancel.disabled = false;
    }
  });

  // Live logs. EventSource resumes on its own after a network error (it
  // sends Last-Event-ID); the server ends the stream with `end` once the
  // job is terminal, and then it must be closed or it would reconnect.
  const url = "/api/v1/jobs/" + id + "/logs" + query({ access_token: token() });
  const es = new EventSource(url);
  onLeave(() => es.close());
  let seen = 0;
  es.addEventListener("open", () => { logStatus.textContent = "live"; });
  es.addEventListener("log", (e) => {
    const line = JSON.parse(e.data);
    if (line.seq <= seen) return;
    seen = line.seq;
    const stick = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 8;
    logs.append(h("span", { class: "line " + line.stream, "data-seq": line.seq },
      h("span", { class: "seq", text: line.seq }), line.text));
    if (stick) logs.scrollTop = logs.scrollHeight;
  });
  es.addEventListener("end", (e) => {
    es.close();
    logStatus.textContent = "complete";
    if (!seen) logs.append(h("span", { class: "status", text: "(no output)" }));
    try { render(JSON.parse(e.data)); } catch (_) { /* keep the page */ }
    refresh();
  });
  es.addEventListener("error", (e) => {
    if (e.data) {
      // A server-sent error event: the stream ends here.
      try { logStatus.textContent = JSON.parse(e.data).error.message; } catch (_) { logStatus.textContent = "error"; }
      es.close();
    } else if (es.readyState === EventSource.CONNECTING) {
      logStatus.textContent = "reconnecting…";
    } else {
      logStatus.textContent = "disconnected";
    }
  });

  every(POLL_MS, () => { if (!terminal) refresh(); });
  refresh();

  show(
    h("h1", {}, h("a", { href: "#/jobs", text: "Jobs" }), "/", title, state, h("span", { class: "spacer" }), cancel),
    error,
    h("div", { class: "columns" },
      h("div", {},
        h("h2", {}, "Logs ", logStatus),
        logs,
        h("h2", { text: "Attempts" }),
        h("table", { id: "attempts" },
          h("thead", {}, h("tr", {}, ["#", "Outcome", "Worker", "Started", "Finished", "Failure"].map((t) => h("th", { text: t })))),
          attempts),
        h("h2", { text: "Spec" }),
        spec),
      h("div", {},
        h("h2", { text: "Details" }),
        h("div", { class: "panel" }, details),
        h("h2", { text: "Events" }),
        h("div", { class: "panel" }, events))));
}

function eventItem(e) {
  return h("li", { "data-event-type": e.event_type },
    h("div", {}, h("span", { class: "type", text: e.event_type }), " ", h("span", { class: "when", text: when(e.occurred_at) })),
    h("div", { class: "who", text: "by " + e.actor }),
    Object.keys(e.payload || {}).length
      ? h("details", {}, h("summary", { text: "payload" }), h("pre", { class: "spec", text: JSON.stringify(e.payload, null, 2) }))
      : null);
}

// ------------------------------------------------------------ submit

/** Splits a command line like a shell: quotes and backslashes, no expansion. */
function splitArgs(line) {
  const args = [];
  let cur = "", inArg = false, quote = null;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quote) {
      if (c === quote) quote = null;
      else if (c === "\\" && quote === '"' && i + 1 < line.length) cur += line[++i];
      else cur += c;
    } else if (c === "'" || c === '"') { quote = c; inArg = true; }
    else if (c === "\\" && i + 1 < line.length) { cur += line[++i]; inArg = true; }
    else if (/\s/.test(c)) { if (inArg) { args.push(cur); cur = ""; inArg = false; } }
    else { cur += c; inArg = true; }
  }
  if (quote) throw new Error("unclosed " + quote + " in the command");
  if (inArg) args.push(cur);
  return args;
}

function pairs(text, what) {
  const out = {};
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line) continue;
    const i = line.indexOf("=");
    if (i <= 0) throw new Error(what + ": \"" + line + "\" is not KEY=VALUE");
    out[line.slice(0, i).trim()] = line.slice(i + 1);
  }
  return out;
}

function submitPage() {
  const name = h("input", { id: "spec-name", placeholder: "defaults to the program name" });
  const modeCommand = h("input", { type: "radio", name: "mode", id: "mode-command", value: "command", checked: true });
  const modeScript = h("input", { type: "radio", name: "mode", id: "mode-script", value: "script" });
  const command = h("input", { id: "spec-command", class: "mono full", placeholder: "sh -c 'echo hello'" });
  const script = h("textarea", { id: "spec-script", rows: 8, placeholder: "#!/bin/sh\necho hello" });
  const env = h("textarea", { id: "spec-env", rows: 3, placeholder: "KEY=value (one per line)" });
  const labels = h("textarea", { id: "spec-labels", rows: 2, placeholder: "team=ci (one per line)" });
  const secrets = h("input", { id: "spec-secrets", placeholder: "DEPLOY_KEY, OTHER (names)" });
  const timeout = h("input", { id: "spec-timeout", type: "number", min: 1, placeholder: "3600" });
  const attempts = h("input", { id: "spec-max-attempts", type: "number", min: 1, max: 100, placeholder: "1" });
  const priority = h("input", { id: "spec-priority", type: "number", min: -1000, max: 1000, placeholder: "0" });
  const provider = h("input", { id: "spec-provider", placeholder: "any healthy provider" });
  const image = h("input", { id: "spec-image", placeholder: "for providers that run images" });
  const workdir = h("input", { id: "spec-workdir", placeholder: "/work" });
  const error = h("div", { class: "error-text wide", id: "submit-error" });
  const button = h("button", { type: "submit", class: "primary", id: "submit-button", text: "Submit" });
  const commandRow = h("div", { class: "wide-cell" }, command, h("div", { class: "hint", text: "Split like a shell line (quotes work); nothing is expanded." }));
  const scriptRow = h("div", { class: "wide-cell", hidden: true }, script, h("div", { class: "hint", text: "Run by its shebang, or sh." }));
  const toggle = () => { commandRow.hidden = !modeCommand.checked; scriptRow.hidden = modeCommand.checked; };
  modeCommand.addEventListener("change", toggle);
  modeScript.addEventListener("change", toggle);

  const form = h("form", { class: "grid", id: "submit-form" },
    h("label", { for: "spec-name", text: "Name" }), name,
    h("label", { text: "Runs" }), h("div", { class: "row" },
      h("label", { class: "row" }, modeCommand, "Command"),
      h("label", { class: "row" }, modeScript, "Script")),
    h("label", { text: "Program" }), h("div", {}, commandRow, scriptRow),
    h("label", { for: "spec-env", text: "Environment" }), env,
    h("label", { for: "spec-secrets", text: "Secrets" }), secrets,
    h("label", { for: "spec-labels", text: "Labels" }), labels,
    h("label", { for: "spec-timeout", text: "Timeout (seconds)" }), timeout,
    h("label", { for: "spec-max-attempts", text: "Max attempts" }), attempts,
    h("label", { for: "spec-priority", text: "Priority" }), priority,
    h("label", { for: "spec-provider", text: "Provider" }), provider,
    h("label", { for: "spec-image", text: "Image" }), image,
    h("label", { for: "spec-workdir", text: "Working directory" }), workdir,
    error,
    h("div", { class: "wide" }, button));

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    const spec = {};
    try {
      if (name.value.trim()) spec.name = name.value.trim();
      if (modeCommand.checked) spec.command = splitArgs(command.value);
      else spec.script = script.value;
      const e = pairs(env.value, "Environment");
      if (Object.keys(e).length) spec.env = e;
      const l = pairs(labels.value, "Labels");
      if (Object.keys(l).length) spec.labels = l;
      const s = secrets.value.split(/[\s,]+/).filter(Boolean);
      if (s.length) spec.secrets = s;
      for (const [input, key] of [[timeout, "timeout_secs"], [attempts, "max_attempts"], [priority, "priority"]]) {
        if (input.value !== "") spec[key] = Number(input.value);
      }
      for (const [input, key] of [[provider, "provider"], [image, "image"], [workdir, "working_dir"]]) {
        if (input.value.trim()) spec[key] = input.value.trim();
      }
    } catch (e) {
      error.textContent = e.message;
      return;
    }
    button.disabled = true;
    try {
      const job = await api("POST", "/jobs", spec);
      location.hash = "#/jobs/" + job.id;
    } catch (e) {
      error.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  });

  show(h("h1", { text: "Submit a job" }), h("div", { class: "panel" }, form));
  command.focus();
}

// ------------------------------------------------------------ workers, providers

function workersPage() {
  const tbody = h("tbody");
  const status = h("span", { class: "muted" });
  async function load() {
    try {
      const { workers } = await api("GET", "/workers");
      tbody.replaceChildren(...(workers.length ? workers.map(workerRow) :
        [h("tr", {}, h("td", { colspan: 8, class: "muted", text: "No workers." }))]));
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) { status.textContent = e.message; }
  }
  function workerRow(w) {
    const drainable = !["DRAINING", "TERMINATING", "TERMINATED"].includes(w.state);
    const drain = h("button", { class: "danger", text: "Drain", "data-worker-id": w.id });
    drain.addEventListener("click", async () => {
      if (!confirm("Drain worker " + short(w.id) + "? It finishes its jobs, then goes away.")) return;
      try { await api("POST", "/workers/" + w.id + "/drain"); load(); } catch (e) { status.textContent = e.message; }
    });
    return h("tr", { "data-worker-id": w.id },
      h("td", { class: "mono", text: short(w.id), title: w.id }),
      h("td", { text: w.provider }),
      h("td", {}, badge(w.state)),
      h("td", { text: w.connected ? "yes" : "no" }),
      h("td", {}, w.jobs.map((j) => h("a", { class: "mono", href: "#/jobs/" + j, text: short(j) + " " }))),
      h("td", { text: w.jobs.length + " / " + w.capacity + (w.ephemeral ? " (ephemeral)" : "") }),
      h("td", { text: when(w.last_seen) }),
      h("td", {}, drainable ? drain : null));
  }
  every(POLL_MS, load);
  load();
  show(h("h1", {}, "Workers"), h("div", { class: "toolbar" }, status),
    h("table", { id: "workers-table" },
      h("thead", {}, h("tr", {}, ["Worker", "Provider", "State", "Connected", "Jobs", "Load", "Last seen", ""].map((t) => h("th", { text: t })))),
      tbody));
}

function providersPage() {
  const tbody = h("tbody");
  const status = h("span", { class: "muted" });
  async function load() {
    try {
      const { providers } = await api("GET", "/providers");
      tbody.replaceChildren(...(providers.length ? providers.map((p) => h("tr", { "data-provider": p.id },
        h("td", { text: p.id }),
        h("td", { text: p.kind }),
        h("td", {}, badge(p.healthy ? "healthy" : "unhealthy")),
        h("td", { text: p.health_message }),
        h("td", { text: when(p.updated_at) }),
        h("td", {}, h("details", {}, h("summary", { text: "config" }), h("pre", { class: "spec", text: JSON.stringify(p.config, null, 2) })))))
        : [h("tr", {}, h("td", { colspan: 6, class: "muted", text: "No providers configured." }))]));
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) { status.textContent = e.message; }
  }
  every(POLL_MS * 2, load);
  load();
  show(h("h1", {}, "Providers"), h("div", { class: "toolbar" }, status),
    h("table", { id: "providers-table" },
      h("thead", {}, h("tr", {}, ["Provider", "Kind", "Health", "Detail", "Updated", ""].map((t) => h("th", { text: t })))),
      tbody));
}

// ------------------------------------------------------------ audit

function auditPage(initial) {
  initial = initial || new URLSearchParams();
  const field = (id, ph) => h("input", { id, placeholder: ph, value: initial.get(id.replace("audit-", "").replace("-", "_")) || "" });
  const corr = field("audit-correlation-id", "correlation id");
  const type = h("select", { id: "audit-event-type" }, h("option", { value: "", text: "any event type" }),
    EVENT_TYPES.map((t) => h("option", { value: t, text: t })));
  type.value = initial.get("event_type") || "";
  const actor = field("audit-actor", "actor, e.g. system:dispatcher");
  const since = field("audit-since", "since (RFC 3339)");
  const until = field("audit-until", "until (RFC 3339)");
  const error = h("div", { class: "error-text", id: "audit-error" });
  const total = h("span", { class: "muted", id: "audit-total" });
  const tbody = h("tbody");
  const prev = h("button", { text: "Previous", disabled: true });
  const next = h("button", { text: "Next", disabled: true });
  const limit = 50;
  let offset = 0;

  async function search() {
    error.textContent = "";
    try {
      const page = await api("GET", "/audit" + query({
        correlation_id: corr.value.trim(), event_type: type.value, actor: actor.value.trim(),
        since: since.value.trim(), until: until.value.trim(), limit, offset,
      }));
      total.textContent = page.total + " matching event(s)" + (page.total ? ", showing " + (offset + 1) + "–" + (offset + page.events.length) : "");
      prev.disabled = offset === 0;
      next.disabled = offset + page.events.length >= page.total;
      tbody.replaceChildren(...page.events.map((e) => h("tr", { "data-seq": e.sequence },
        h("td", { text: e.sequence }),
        h("td", { text: when(e.occurred_at) }),
        h("td", { text: e.event_type }),
        h("td", {}, e.aggregate_type === "job"
          ? h("a", { class: "mono", href: "#/jobs/" + e.aggregate_id, text: "job " + short(e.aggregate_id) })
          : h("span", { class: "mono", text: e.aggregate_type + " " + (e.aggregate_type === "worker" ? short(e.aggregate_id) : e.aggregate_id) })),
        h("td", { text: e.actor }),
        h("td", { class: "mono", text: e.correlation_id }),
        h("td", {}, h("details", {}, h("summary", { text: "payload" }), h("pre", { class: "spec", text: JSON.stringify(e.payload, null, 2) }))))));
    } catch (e) {
      error.textContent = e.message;
    }
  }
  const form = h("form", { class: "toolbar", id: "audit-form" }, corr, type, actor, since, until,
    h("button", { type: "submit", class: "primary", id: "audit-search", text: "Search" }));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); offset = 0; search(); });
  prev.addEventListener("click", () => { offset = Math.max(0, offset - limit); search(); });
  next.addEventListener("click", () => { offset += limit; search(); });
  search();
  show(h("h1", { text: "Audit trail" }), form, error,
    h("div", { class: "toolbar" }, total, h("span", { class: "spacer" }), prev, next),
    h("table", { id: "audit-table" },
      h("thead", {}, h("tr", {}, ["Seq", "When", "Type", "Aggregate", "Actor", "Correlation", ""].map((t) => h("th", { text: t })))),
      tbody));
}

// ------------------------------------------------------------ start

function start() {
  const input = document.getElementById("token-input");
  input.value = token();
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (input.value) localStorage.setItem("hodei.token", input.value);
    else localStorage.removeItem("hodei.token");
    navigate();
  });
  window.addEventListener("hashchange", navigate);
  navigate();
}

document.addEventListener("DOMContentLoaded", start);
