// tether console: plain JavaScript, no dependencies, served by `tether serve` at /console.
// The API key lives in sessionStorage and goes to the server as a bearer token; every page reads
// the JSON routes of tether.server.routes_console (and the REST routes for checkpoint actions).
"use strict";

const KEY_STORE = "tether.apiKey";
const PREFS_STORE = "tether.consolePrefs";
const RUN_REFRESH_MS = 3000;
const LIST_REFRESH_MS = 5000;
const CHART_POINTS = 1000;
const SERIES_TITLES = {
  "server/loss:sum": "loss (sum over the step's tokens)",
  "server/loss:per_token": "loss per token",
  "server/grad_norm": "gradient norm",
  "server/learning_rate": "learning rate",
  "server/tokens_per_s": "tokens per second",
};
const SERVER_ORDER = Object.keys(SERIES_TITLES);
const CHECKPOINT_TYPES = { training: "training state", sampler: "sampler", external: "external (HF)",
  base: "base", delta: "delta" };

const main = document.getElementById("main");
const banner = document.getElementById("banner");
let refreshTimer = null;
let pageToken = 0;  // bumped on every navigation; stale async work checks it and stops

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// ---- small DOM helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) el.setAttribute(name, value);
  for (const child of children) el.append(child);
  return el;
}

function show(...nodes) { main.replaceChildren(...nodes); }

function note(message) {
  banner.hidden = !message;
  banner.textContent = message || "";
}

function prefs() {
  try { return { smoothing: 0.6, logScale: false, ...JSON.parse(localStorage.getItem(PREFS_STORE) || "{}") }; }
  catch { return { smoothing: 0.6, logScale: false }; }
}

function savePrefs(update) { localStorage.setItem(PREFS_STORE, JSON.stringify({ ...prefs(), ...update })); }

// ---- formatting

function ago(iso) {
  if (!iso) return "—";
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  if (seconds < 0) return "in " + duration(-seconds);
  return duration(seconds) + " ago";
}

function duration(seconds) {
  if (seconds < 60) return Math.round(seconds) + " s";
  if (seconds < 3600) return Math.round(seconds / 60) + " min";
  if (seconds < 86400 * 2) return (seconds / 3600).toFixed(1).replace(/\.0$/, "") + " h";
  return Math.round(seconds / 86400) + " d";
}

function when(iso) { return h("span", { title: iso ? new Date(iso).toLocaleString() : "" }, ago(iso)); }

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function num(v) {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}

// ---- API

function apiKey() { return sessionStorage.getItem(KEY_STORE); }

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + apiKey(), ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  if (response.status === 401) {
    signOut("The server no longer accepts this API key; sign in again.");
    throw new ApiError(401, "signed out");
  }
  let payload = null;
  try { payload = await response.json(); } catch { payload = null; }
  if (!response.ok) throw new ApiError(response.status, (payload && (payload.detail || payload.error)) || response.statusText);
  return payload;
}

function runPath(runId) { return "/api/v1/training_runs/" + encodeURIComponent(runId); }

function checkpointPath(runId, checkpointId) {
  return runPath(runId) + "/checkpoints/" + checkpointId.split("/").map(encodeURIComponent).join("/");
}

// ---- sign in

function signOut(message) {
  sessionStorage.removeItem(KEY_STORE);
  signInPage(message);
}

function signInPage(error) {
  clearTimeout(refreshTimer);
  pageToken += 1;
  document.getElementById("nav").hidden = true;
  document.getElementById("sign-out").hidden = true;
  note("");
  const input = h("input", { type: "password", id: "api-key", placeholder: "tml-…", autocomplete: "off",
    "aria-label": "API key" });
  const message = h("p", { id: "signin-error", class: "error", role: "alert" }, error || "");
  const form = h("form", { onsubmit: async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) { message.textContent = "Enter an API key."; return; }
    const response = await fetch("/api/v1/tether/console/whoami", { headers: { Authorization: "Bearer " + key } });
    if (!response.ok) {
      message.textContent = response.status === 401 ? "The server refused this API key." :
        "Could not sign in (HTTP " + response.status + ").";
      return;
    }
    sessionStorage.setItem(KEY_STORE, key);
    if (!location.hash || location.hash === "#/signin") location.hash = "#/runs";
    else route();
  } }, input, h("button", { class: "primary", type: "submit" }, "Sign in"));
  show(h("div", { class: "card signin" }, h("h1", {}, "Sign in to tether"),
    h("p", { class: "muted" }, "Use the API key your training scripts use. It stays in this browser tab."),
    form, message));
  input.focus();
}

// ---- routing

function route() {
  clearTimeout(refreshTimer);
  pageToken += 1;
  note("");
  if (!apiKey()) { signInPage(); return; }
  document.getElementById("nav").hidden = false;
  document.getElementById("sign-out").hidden = false;
  const parts = (location.hash.replace(/^#\/?/, "") || "runs").split("/").map(decodeURIComponent);
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === parts[0]);
  }
  const pages = { runs: parts[1] ? () => runPage(parts.slice(1).join("/")) : runsPage, sessions: sessionsPage,
    jobs: () => emptyFeaturePage("Trainer jobs", "jobs"),
    deployments: () => emptyFeaturePage("Deployments", "deployments") };
  const page = pages[parts[0]] || (() => notFoundPage("There is no page " + location.hash + "."));
  page().catch((error) => {
    if (error instanceof ApiError && error.status === 401) return;
    note("Could not load the page: " + error.message);
  });
}

function every(ms, token, fn) {
  const tick = async () => {
    if (token !== pageToken) return;
    if (!document.hidden) {
      try { await fn(); } catch (error) {
        if (token === pageToken && !(error instanceof ApiError && error.status === 401)) note("Refresh failed: " + error.message);
      }
    }
    if (token === pageToken) refreshTimer = setTimeout(tick, ms);
  };
  refreshTimer = setTimeout(tick, ms);
}

function notFoundPage(message) {
  show(h("div", { class: "empty", id: "not-found" }, h("h1", {}, "Not found"), h("p", {}, message),
    h("p", {}, h("a", { href: "#/runs" }, "Back to runs"))));
}

// ---- runs

async function runsPage() {
  const token = pageToken;
  const body = h("div", {});
  show(h("h1", {}, "Training runs"), h("p", { class: "muted" }, "Runs created with this key, newest first."), body);
  const render = async () => {
    const data = await api("/api/v1/tether/console/runs?limit=200");
    if (token !== pageToken) return;
    if (!data.runs.length) {
      body.replaceChildren(h("div", { class: "empty" }, h("p", {}, "No training runs yet. Start one with the SDK:"),
        h("pre", {}, 'import tether\nservice = tether.ServiceClient(base_url="' + location.origin + '")\n' +
          'trainer = service.create_lora_training_client(base_model="...", rank=8).result()')));
      return;
    }
    body.replaceChildren(h("table", { id: "runs-table" },
      h("thead", {}, h("tr", {}, ["Run", "Base model", "Weights", "Created", "Last activity", "Steps", "Checkpoints"]
        .map((t) => h("th", {}, t)))),
      h("tbody", {}, data.runs.map((run) => h("tr", { "data-run-id": run.run_id },
        h("td", {}, h("a", { href: "#/runs/" + encodeURIComponent(run.run_id), class: "mono" }, run.run_id), " ",
          run.live ? h("span", { class: "badge live" }, "live") : null),
        h("td", {}, run.base_model),
        h("td", {}, run.is_lora ? "LoRA rank " + run.lora_rank : "full"),
        h("td", {}, when(run.created)), h("td", {}, when(run.last_activity)),
        h("td", { class: "num" }, run.steps), h("td", { class: "num" }, run.checkpoints))))));
  };
  await render();
  every(LIST_REFRESH_MS, token, render);
}

async function runPage(runId) {
  const token = pageToken;
  let run;
  try {
    run = await api("/api/v1/tether/console/runs/" + encodeURIComponent(runId));
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      notFoundPage("No training run " + runId + " belongs to this API key.");
      return;
    }
    throw error;
  }
  if (token !== pageToken) return;
  const facts = h("div", { class: "facts" });
  const serverCharts = h("div", { class: "charts", id: "server-charts" });
  const clientCharts = h("div", { class: "charts", id: "client-charts" });
  const checkpoints = h("div", { id: "checkpoints" });
  const p = prefs();
  const smoothingValue = h("span", { class: "mono" }, p.smoothing.toFixed(2));
  const smoothing = h("input", { type: "range", min: "0", max: "0.99", step: "0.01", value: String(p.smoothing),
    id: "smoothing", oninput: () => { smoothingValue.textContent = Number(smoothing.value).toFixed(2);
      savePrefs({ smoothing: Number(smoothing.value) }); drawCharts(); } });
  const logScale = h("input", { type: "checkbox", id: "log-scale", checked: p.logScale,
    onchange: () => { savePrefs({ logScale: logScale.checked }); drawCharts(); } });
  show(h("p", {}, h("a", { href: "#/runs" }, "← Runs")), h("h1", { class: "mono", id: "run-title" }, run.run_id),
    facts,
    h("div", { class: "controls" }, h("label", {}, "Smoothing", smoothing, smoothingValue),
      h("label", {}, logScale, "Log scale"), h("span", { class: "muted" }, "Updates every few seconds.")),
    h("h2", {}, "Observed by the server"), serverCharts,
    h("h2", {}, "Logged by the client"), clientCharts,
    h("h2", {}, "Checkpoints"), checkpoints);

  let series = {};
  let seriesText = "";
  let checkpointText = "";
  function drawCharts() {
    const { smoothing: s, logScale: log } = prefs();
    const keys = Object.keys(series);
    const server = SERVER_ORDER.filter((k) => k in series);
    const client = keys.filter((k) => k.startsWith("client/")).sort();
    serverCharts.replaceChildren(...(server.length ? server.map((k) => chartCard(k, series[k], s, log)) :
      [h("div", { class: "empty" }, "No optimizer steps yet.")]));
    clientCharts.replaceChildren(...(client.length ? client.map((k) => chartCard(k, series[k], s, log)) :
      [h("div", { class: "empty" }, "Nothing logged yet. Call training_client.log_metrics({...}, step) to add curves here.")]));
  }
  function drawFacts() {
    facts.replaceChildren(
      h("span", {}, "Base model ", h("b", {}, run.base_model)),
      h("span", {}, "Weights ", h("b", {}, run.is_lora ? "LoRA rank " + run.lora_rank : "full")),
      h("span", {}, "Created ", h("b", {}, when(run.created))),
      h("span", {}, "Last activity ", h("b", {}, when(run.last_activity))),
      h("span", {}, "Steps ", h("b", { id: "run-steps" }, run.steps)),
      h("span", {}, "Session ", h("b", { class: "mono" }, run.session_id)),
      run.live ? h("span", { class: "badge live" }, "live") : h("span", { class: "badge" }, "not loaded"));
  }
  function drawCheckpoints() {
    if (checkpoints.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return;
    checkpoints.replaceChildren(checkpointTable(run, () => refresh()));
  }
  async function refresh() {
    const [fresh, metrics] = await Promise.all([
      api("/api/v1/tether/console/runs/" + encodeURIComponent(runId)),
      api("/api/v1/tether/runs/" + encodeURIComponent(runId) + "/metrics?max_points=" + CHART_POINTS)]);
    if (token !== pageToken) return;
    run = fresh;
    drawFacts();
    const text = JSON.stringify(metrics.series);
    if (text !== seriesText) { seriesText = text; series = metrics.series; drawCharts(); }
    const ckText = JSON.stringify(run.checkpoint_list);
    if (ckText !== checkpointText) { checkpointText = ckText; drawCheckpoints(); }
  }
  await refresh();
  every(RUN_REFRESH_MS, token, refresh);
}

function checkpointTable(run, changed) {
  if (!run.checkpoint_list.length) return h("div", { class: "empty" }, "No checkpoints saved for this run.");
  return h("table", { id: "checkpoints-table" },
    h("thead", {}, h("tr", {}, ["Checkpoint", "Type", "Size", "Created", "Expires", "Path", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, run.checkpoint_list.map((c) => {
      const ttl = h("input", { type: "number", min: "0", step: "any", placeholder: "hours", "aria-label": "TTL in hours" });
      const copied = h("span", { class: "muted" });
      return h("tr", { "data-checkpoint": c.checkpoint_id },
        h("td", { class: "mono" }, c.checkpoint_id),
        h("td", {}, CHECKPOINT_TYPES[c.checkpoint_type] || c.checkpoint_type),
        h("td", { class: "num" }, bytes(c.size_bytes)),
        h("td", {}, when(c.time)),
        h("td", {}, c.expires_at ? when(c.expires_at) : "never"),
        h("td", { class: "mono" }, c.tinker_path),
        h("td", {}, h("div", { class: "actions" },
          h("button", { class: "copy", title: "Copy the tinker:// path", onclick: () => copy(c.tinker_path, copied) }, "Copy path"),
          ttl,
          h("button", { class: "set-ttl", onclick: async () => {
            const hours = ttl.value.trim();
            const seconds = hours === "" ? null : Math.round(Number(hours) * 3600);
            if (seconds !== null && !(seconds > 0)) { note("A TTL is a positive number of hours (empty: never expires)."); return; }
            await act(() => api(checkpointPath(run.run_id, c.checkpoint_id) + "/ttl",
              { method: "PUT", body: { ttl_seconds: seconds } }), changed);
          } }, "Set TTL"),
          h("button", { class: "delete danger", onclick: async () => {
            if (!confirm("Delete " + c.tinker_path + "? Its files are removed.")) return;
            await act(() => api(checkpointPath(run.run_id, c.checkpoint_id), { method: "DELETE" }), changed);
          } }, "Delete"),
          copied)));
    })));
}

async function act(call, changed) {
  try { await call(); note(""); await changed(); } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) note(error.message);
  }
}

function copy(text, feedback) {
  const done = () => { feedback.textContent = "copied"; setTimeout(() => { feedback.textContent = ""; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => window.prompt("Copy the path:", text));
  } else {
    window.prompt("Copy the path:", text);
  }
}

// ---- charts (SVG, drawn here: no chart library to download)

function smooth(values, weight) {
  if (!weight) return values;
  let last = 0;
  let debias = 0;
  return values.map((v) => { last = last * weight + (1 - weight) * v; debias = debias * weight + (1 - weight); return last / debias; });
}

function chartCard(key, points, smoothing, logScale) {
  const name = key.replace(/^(server|client)\//, "");
  const readout = h("div", { class: "readout" });
  const last = points[points.length - 1];
  readout.textContent = last ? "step " + last[0] + ": " + num(last[1]) : "";
  return h("div", { class: "card chart-card", "data-series": key },
    h("h3", { title: key }, SERIES_TITLES[key] || name), chart(key, points, smoothing, logScale, readout), readout);
}

function chart(key, points, smoothing, logScale, readout) {
  const W = 480, H = 210, L = 54, R = 10, T = 8, B = 24;
  const steps = points.map((p) => p[0]);
  const raw = points.map((p) => p[1]);
  const smoothed = smooth(raw, smoothing);
  const usable = logScale ? raw.every((v) => v > 0) : true;
  const f = usable && logScale ? Math.log10 : (v) => v;
  const ys = raw.concat(smoothed).map(f);
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y1 - y0 <= 1e-9 * Math.max(Math.abs(y0), Math.abs(y1))) {  // flat (smoothing adds rounding noise)
    const mid = (y0 + y1) / 2;
    [y0, y1] = [mid - (Math.abs(mid) * 0.1 || 1), mid + (Math.abs(mid) * 0.1 || 1)];
  }
  let [x0, x1] = [steps[0], steps[steps.length - 1]];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const X = (s) => L + ((s - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => T + (1 - (f(v) - y0) / (y1 - y0)) * (H - T - B);
  const line = (values) => values.map((v, i) => X(steps[i]).toFixed(1) + "," + Y(v).toFixed(1)).join(" ");
  const el = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, "data-series": key, "data-points": String(points.length),
    "data-scale": usable && logScale ? "log" : "linear", role: "img", "aria-label": key + " over steps" });
  el.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  const unf = (y) => (usable && logScale ? 10 ** y : y);
  for (const frac of [0, 0.5, 1]) {
    const y = y0 + frac * (y1 - y0);
    const label = svg("text", { x: L - 6, y: (T + (1 - frac) * (H - T - B) + 3.5).toFixed(1), "text-anchor": "end" });
    label.textContent = num(unf(y));
    el.append(label);
  }
  for (const [s, anchor] of [[steps[0], "start"], [steps[steps.length - 1], "end"]]) {
    const label = svg("text", { x: X(s).toFixed(1), y: H - 7, "text-anchor": anchor });
    label.textContent = "step " + s;
    el.append(label);
  }
  if (points.length === 1) {
    el.append(svg("circle", { class: "dot", cx: X(steps[0]), cy: Y(raw[0]), r: 3 }));
  } else {
    if (smoothing) el.append(svg("polyline", { class: "raw", points: line(raw) }));
    el.append(svg("polyline", { class: "smooth", points: line(smoothed) }));
  }
  if (logScale && !usable) readout.textContent = "log scale needs positive values; drawn linear";
  const cursor = svg("line", { class: "cursor", y1: T, y2: H - B, x1: -10, x2: -10 });
  el.append(cursor);
  el.addEventListener("mousemove", (event) => {
    const box = el.getBoundingClientRect();
    const x = ((event.clientX - box.left) / box.width) * W;
    let best = 0;
    for (let i = 1; i < steps.length; i++) if (Math.abs(X(steps[i]) - x) < Math.abs(X(steps[best]) - x)) best = i;
    cursor.setAttribute("x1", X(steps[best])); cursor.setAttribute("x2", X(steps[best]));
    readout.textContent = "step " + steps[best] + ": " + num(raw[best]) + (smoothing ? " (smoothed " + num(smoothed[best]) + ")" : "");
  });
  return el;
}

// ---- sessions, samplers, jobs, deployments

async function sessionsPage() {
  const token = pageToken;
  const body = h("div", {});
  show(h("h1", {}, "Sessions & samplers"),
    h("p", { class: "muted" }, "A session is one client process; it stays active while it sends heartbeats."), body);
  const render = async () => {
    const data = await api("/api/v1/tether/console/sessions?limit=200");
    if (token !== pageToken) return;
    if (!data.sessions.length) {
      body.replaceChildren(h("div", { class: "empty" }, "No sessions yet. A ServiceClient opens one when it connects."));
      return;
    }
    body.replaceChildren(h("table", { id: "sessions-table" },
      h("thead", {}, h("tr", {}, ["Session", "Status", "Created", "Last heartbeat", "Training runs", "Samplers"]
        .map((t) => h("th", {}, t)))),
      h("tbody", {}, data.sessions.map((s) => h("tr", { "data-session-id": s.session_id },
        h("td", { class: "mono" }, s.session_id, s.display_name ? h("div", { class: "muted" }, s.display_name) : null),
        h("td", {}, h("span", { class: "badge" + (s.status === "active" ? " live" : "") }, s.status)),
        h("td", {}, when(s.created)), h("td", {}, when(s.last_heartbeat)),
        h("td", {}, s.training_run_ids.length ? s.training_run_ids.map((id) =>
          h("div", {}, h("a", { class: "mono", href: "#/runs/" + encodeURIComponent(id) }, id))) : "—"),
        h("td", {}, s.samplers.length ? s.samplers.map((sm) => h("div", {},
          h("span", { class: "mono" }, sm.sampler_id), " ", h("span", { class: "badge" + (sm.live ? " live" : "") },
            sm.live ? "live" : "stopped"), h("div", { class: "muted" }, sm.model_path || sm.base_model))) : "—"))))));
  };
  await render();
  every(LIST_REFRESH_MS, token, render);
}

// Trainer jobs and deployments: one row per item, one column per field, refreshed like the other lists.
async function emptyFeaturePage(title, kind) {
  const token = pageToken;
  const data = await api("/api/v1/tether/console/" + kind);
  if (token !== pageToken) return;
  const items = data[kind] || [];
  const columns = items.length ? Object.keys(items[0]) : [];
  const cell = (v) => v === null || v === undefined ? "" : Array.isArray(v) ? v.join("; ") :
    typeof v === "object" ? JSON.stringify(v) : String(v);
  show(h("h1", {}, title), items.length ?
    h("table", { id: kind + "-table" },
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c.replace(/_/g, " "))))),
      h("tbody", {}, items.map((item) => h("tr", {}, columns.map((c) => h("td", { class: "mono" }, cell(item[c]))))))) :
    h("div", { class: "empty", id: kind + "-empty" }, h("p", {}, "No " + title.toLowerCase() + " yet."),
      h("p", { class: "muted" }, data.note || "")));
}

// ---- start

document.getElementById("sign-out").addEventListener("click", () => signOut(""));
window.addEventListener("hashchange", route);
route();
