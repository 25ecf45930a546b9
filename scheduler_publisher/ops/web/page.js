// The status page: polls /status for one page of entries and updates the DOM in place.
// All text from the service goes through textContent, never innerHTML: entry ids and topics
// are whatever the entries file says.
"use strict";

const POLL_MS = 2000;
const RATE_WINDOW_S = 300; // the chart shows the last five minutes
const COLUMNS = [
  // [label for narrow screens, class, how to render one entry]
  ["Id", "id", (id) => id],
  ["Topic", "topic", (id, e) => e.topic],
  ["Schedule", "", (id, e) => schedule(e)],
  ["QoS", "num", (id, e) => String(e.qos)],
  ["Retain", "", (id, e) => yesNo(e.retain)],
  ["LWT", "", (id, e) => yesNo(e.lwt)],
  ["Last published", "", (id, e) => ago(e.last_published_at)],
  ["Published", "num", (id, e) => count(e.published)],
  ["Errors", "num", (id, e) => count(e.errors)],
  ["Dropped", "num", (id, e) => count(e.dropped)],
  ["Missed", "num", (id, e) => count(e.missed)],
  ["Max late", "num", (id, e) => lateness(e)],
  ["Connection", "", (id, e, s) => linkState(id, e, s)],
];
const BAD_WHEN_NONZERO = new Set(["Errors", "Dropped", "Missed"]);

const state = {
  offset: 0, limit: 50, q: "", sort: "id", order: "asc",
  matched: 0, seq: 0, timer: null, samples: [],
  skewMs: 0, // the service's clock minus this browser's, from the Date header of each answer
};
const $ = (id) => document.getElementById(id);

function yesNo(value) { return value ? "yes" : "no"; }
function count(value) { return value === undefined || value === null ? "0" : value.toLocaleString("en"); }

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  if (d) return `${d}d ${h}h ${m}m`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

function schedule(e) {
  // A cron entry has no interval: its expression and the zone it is read in.
  if (e.cron) return `cron ${e.cron} (${e.timezone})`;
  if (e.interval < 60) return `every ${e.interval}s`;
  const units = [[86400, "d"], [3600, "h"], [60, "m"], [1, "s"]];
  let rest = e.interval;
  const parts = [];
  for (const [size, unit] of units) {
    const n = Math.floor(rest / size);
    if (n) parts.push(`${n}${unit}`);
    rest -= n * size;
  }
  return `every ${parts.join(" ")}`;
}

function ago(unixSeconds) {
  if (!unixSeconds) return "never";
  const seconds = Math.max(0, (Date.now() + state.skewMs) / 1000 - unixSeconds);
  return seconds < 1 ? "just now" : `${duration(seconds)} ago`;
}

function lateness(e) {
  return e.lateness ? `${Math.round(e.lateness.max_ms)} ms` : "–";
}

// /status has no per-entry connection state; an lwt entry's own connection is known to be up
// when every connection is, and named when the status lists it among those without one.
function linkState(id, e, status) {
  if (e.quarantined) return `quarantined: ${e.quarantined}`;
  if (!e.lwt) return status.connected ? "main" : "main: down";
  const c = status.connection || {};
  const down = own((c.entries_without_connection || {}).lwt_entries, id);
  if (down !== undefined) return `down: ${down}`;
  if (c.connections !== undefined && c.connections === c.connections_up) return "connected";
  return "unknown";
}

// An entry id is data, never a property name: `obj[id]` finds what every object inherits
// (`constructor`, `toString`, `__proto__`), so ids are looked up as own properties only.
function own(obj, key) {
  return obj && Object.prototype.hasOwnProperty.call(obj, key) ? obj[key] : undefined;
}

function setText(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

function query() {
  const p = new URLSearchParams({offset: state.offset, limit: state.limit, sort: state.sort,
                                 order: state.order});
  if (state.q) p.set("q", state.q);
  return `status?${p}`;
}

async function poll() {
  clearTimeout(state.timer);
  const seq = ++state.seq;
  try {
    const reply = await fetch(query(), {cache: "no-store"});
    const body = await reply.json();
    if (seq !== state.seq) return; // a newer request (filter, sort, page) went out meanwhile
    if (!reply.ok) throw new Error(body.error || `HTTP ${reply.status}`);
    const served = Date.parse(reply.headers.get("Date"));
    // The header has whole seconds: a skew under 2 s is noise, and "ago" would jitter.
    const skew = Number.isNaN(served) ? 0 : served - Date.now();
    state.skewMs = Math.abs(skew) > 2000 ? skew : 0;
    render(body);
    $("fetch-error").hidden = true;
  } catch (err) {
    if (seq !== state.seq) return;
    setText("fetch-error", `Cannot read /status: ${err.message}. Retrying.`);
    $("fetch-error").hidden = false;
  }
  // A background tab stops polling; it catches up when shown again (visibilitychange).
  if (seq === state.seq && !document.hidden) state.timer = setTimeout(poll, POLL_MS);
}

function render(status) {
  renderHeader(status);
  renderTotals(status.statistics || {}, status.active_configs);
  renderConfig(status.config || {}, status.shard);
  renderRows(status);
  renderPager(status.page);
  setText("updated", `updated ${new Date().toLocaleTimeString("en-GB")}`);
  document.body.dataset.ready = "yes"; // for tests and scripts: one poll has been rendered
}

function renderHeader(status) {
  const c = status.connection || {};
  const badge = $("conn-state");
  setText("conn-state", status.connected ? "Connected" : "Disconnected");
  badge.className = `badge ${status.connected ? "badge-up" : "badge-down"}`;
  const brokers = c.brokers || [];
  const which = brokers.length > 1 ? ` (${brokers.indexOf(c.broker) + 1} of ${brokers.length}: ${brokers.join(", ")})` : "";
  setText("broker", c.broker ? `${c.broker}${which}` : "–");
  setText("client-id", c.client_id || "–");
  const waiting = (status.descriptors || {}).links_waiting || 0;
  const short = waiting ? `, ${waiting} waiting for a file descriptor` : "";
  setText("connections", c.connections === undefined ? "–" : `${c.connections_up} of ${c.connections} up${short}`);
  const health = status.health || {};
  const problems = health.problems || [];
  $("health").hidden = problems.length === 0;
  setText("health", `Not healthy: ${problems.join("; ")}`);
}

function renderTotals(stats, active) {
  setText("uptime", duration(stats.uptime_seconds));
  setText("t-entries", count(active));
  setText("t-published", count(stats.total_published));
  setText("t-errors", count(stats.total_errors));
  setText("t-dropped", count(stats.total_dropped));
  setText("t-reconnects", count(stats.reconnects));
  setText("t-reloads", count(stats.reloads));
  addRateSample(stats.published_this_run, stats.uptime_seconds);
}

function renderConfig(config, shard) {
  setText("config-path", config.path || "–");
  // Only a sharded service (--shard K/N) has `shard`: it runs its share of the file's entries.
  $("config-shard-row").hidden = !shard;
  setText("config-shard", shard ? `${shard.k} of ${shard.n}` : "");
  setText("config-reload", config.last_reload_at ? ago(config.last_reload_at) : "at start");
  setText("config-watcher", config.watcher || "–");
  renderProblems(config);
}

// The banner: a file that cannot be used (its entries in force run on), or one whose entries
// do not all run as written: each error with its place, the invalid entries skipped, and
// those held back at their last good version.
function renderProblems(config) {
  const errors = config.errors || [];
  const total = config.errors_total || 0;
  $("problem").hidden = !config.last_error && total === 0;
  $("problem-kept").hidden = !config.last_error;
  setText("problem-text", config.last_error ||
    (total ? `${count(total)} invalid ${total === 1 ? "entry" : "entries"} in the file` : ""));
  renderErrorList(errors, total);
  const skipped = (config.skipped_entries || []).map(
    (s) => (s.id === null ? `entry ${s.entry}` : `${s.id} (entry ${s.entry})`));
  listed("problem-skipped", "Not running (invalid): ", skipped, config.skipped_total || 0);
  listed("problem-held", "Running their last good version: ", config.held_back_entries || [],
         config.held_back_total || 0);
}

function renderErrorList(errors, total) {
  const list = $("problem-errors");
  const lines = errors.map((e) => e.message + (e.line ? ` (line ${e.line})` : ""));
  if (total > errors.length) lines.push(`… and ${count(total - errors.length)} more`);
  list.hidden = lines.length === 0;
  const shown = Array.from(list.children, (li) => li.textContent);
  if (shown.join("\n") === lines.join("\n")) return;
  list.replaceChildren(...lines.map((line) => {
    const li = document.createElement("li");
    li.textContent = line;  // text, never HTML: messages quote the file
    return li;
  }));
}

function listed(id, label, names, total) {
  const more = total > names.length ? ` and ${count(total - names.length)} more` : "";
  $(id).hidden = names.length === 0;
  setText(id, names.length ? label + names.join(", ") + more : "");
}

// ---- the publish rate: differences of successive polls of the run's publish count ----
function addRateSample(published, uptime) {
  if (published === undefined || uptime === undefined) return;
  const samples = state.samples;
  const last = samples[samples.length - 1];
  if (last && (uptime <= last.t || published < last.n)) {
    if (uptime < last.t) samples.length = 0; // the service restarted
    else return;
  }
  samples.push({t: uptime, n: published});
  while (samples.length > 2 && uptime - samples[0].t > RATE_WINDOW_S) samples.shift();
  drawRate();
}

function drawRate() {
  const s = state.samples;
  const rates = [];
  for (let i = 1; i < s.length; i++) {
    rates.push({t: s[i].t, r: (s[i].n - s[i - 1].n) / (s[i].t - s[i - 1].t)});
  }
  const svg = $("rate-chart");
  if (!rates.length) return;
  const now = rates[rates.length - 1];
  setText("rate-now", now.r.toFixed(now.r < 10 ? 1 : 0));
  const top = Math.max(1, ...rates.map((p) => p.r)) * 1.1;
  // The x axis spans what has been seen, up to the window: a young page fills the chart too.
  const span = Math.max(now.t - rates[0].t, 1);
  const x = (t) => (300 * (1 - (now.t - t) / span)).toFixed(1);
  const y = (r) => (58 - 56 * r / top).toFixed(1);
  const points = rates.map((p) => `${x(p.t)},${y(p.r)}`).join(" ");
  let line = svg.querySelector(".line"), area = svg.querySelector(".area");
  if (!line) {
    area = svg.appendChild(document.createElementNS("http://www.w3.org/2000/svg", "polygon"));
    area.setAttribute("class", "area");
    line = svg.appendChild(document.createElementNS("http://www.w3.org/2000/svg", "polyline"));
    line.setAttribute("class", "line");
  }
  line.setAttribute("points", points);
  area.setAttribute("points", `${x(rates[0].t)},60 ${points} ${x(now.t)},60`);
  setText("rate-window", `last ${duration(Math.min(RATE_WINDOW_S, now.t - s[0].t))}, peak ${Math.max(...rates.map((p) => p.r)).toFixed(1)}/s`);
}

// ---- entry rows: one <tr> per visible entry, reused across polls so nothing flickers ----
function renderRows(status) {
  const entries = status.entries || {};
  const ids = status.page ? status.page.ids : Object.keys(entries);
  const body = $("rows");
  while (body.rows.length > ids.length) body.deleteRow(-1);
  ids.forEach((id, index) => {
    const row = body.rows[index] || makeRow(body);
    row.dataset.id = id;
    COLUMNS.forEach(([label, , show], col) => {
      const cell = row.cells[col];
      const text = show(id, own(entries, id), status);
      if (cell.textContent !== text) cell.textContent = text;
      if (BAD_WHEN_NONZERO.has(label)) cell.classList.toggle("bad", text !== "0");
    });
  });
}

function makeRow(body) {
  const row = body.insertRow(-1);
  for (const [label, cls] of COLUMNS) {
    const cell = row.insertCell(-1);
    cell.dataset.label = label;
    if (cls) cell.className = cls;
  }
  return row;
}

function renderPager(page) {
  if (!page) return;
  state.matched = page.matched;
  const first = page.matched ? page.offset + 1 : 0;
  const last = page.offset + page.ids.length;
  const of = page.matched === page.total ? `${count(page.total)}` :
    `${count(page.matched)} matching (of ${count(page.total)})`;
  setText("page-info", `${first}–${last} of ${of}`);
  $("prev").disabled = page.offset === 0;
  $("next").disabled = last >= page.matched;
  if (page.offset > 0 && page.ids.length === 0) { // the list shrank under this page
    state.offset = Math.max(0, page.matched - state.limit);
    poll();
  }
}

// ---- controls -------------------------------------------------------------------------
function setSort(th) {
  const key = th.dataset.sort;
  state.order = state.sort === key && state.order === "asc" ? "desc" : "asc";
  state.sort = key;
  state.offset = 0;
  for (const other of document.querySelectorAll("th[data-sort]")) {
    if (other === th) other.setAttribute("aria-sort", state.order === "asc" ? "ascending" : "descending");
    else other.removeAttribute("aria-sort");
  }
  poll();
}

let filterTimer = null;
function onFilter(event) {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => {
    state.q = event.target.value.trim();
    state.offset = 0;
    poll();
  }, 250);
}

async function reload(event) {
  event.preventDefault();
  const result = $("reload-result"), token = $("token");
  const headers = {};
  if (!$("token-row").hidden) {
    if (!token.value) { showResult("Enter the reload token first.", false); token.focus(); return; }
    headers.Authorization = `Bearer ${token.value}`;
  }
  $("reload").disabled = true;
  showResult("Reloading…", null);
  try {
    const reply = await fetch("reload", {method: "POST", headers, cache: "no-store"});
    const body = await reply.json();
    if (reply.status === 401) {
      $("token-row").hidden = false;
      showResult(token.value ? "Wrong token." : "This service needs a token to reload.", false);
      token.focus();
    } else if (body.success) {
      showResult(`Reloaded: ${count(body.active_configs)} entries active.`, true);
    } else {
      showResult(`Not applied: ${body.error || `HTTP ${reply.status}`}`, false);
    }
  } catch (err) {
    showResult(`Reload failed: ${err.message}`, false);
  } finally {
    $("reload").disabled = false;
    result.dataset.done = String(Date.now());
    poll();
  }
}

function showResult(text, ok) {
  const out = $("reload-result");
  out.textContent = text;
  out.className = ok === null ? "" : ok ? "ok" : "bad";
}

function init() {
  $("token-row").hidden = document.documentElement.dataset.tokenRequired !== "yes";
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.querySelector("button").addEventListener("click", () => setSort(th));
  }
  $("filter").addEventListener("input", onFilter);
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); poll(); });
  $("next").addEventListener("click", () => { state.offset += state.limit; poll(); });
  $("page-size").addEventListener("change", (e) => { state.limit = Number(e.target.value); state.offset = 0; poll(); });
  $("reload-form").addEventListener("submit", reload);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  poll();
}

document.addEventListener("DOMContentLoaded", init);
