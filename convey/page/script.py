"""The page's script (plain JavaScript, no library): polls /stats, computes rates from successive snapshots, updates
the tables in place (rows keyed by name, so a weight being typed is not lost) and calls the runtime API.

Data reaches the DOM only through ``textContent`` and ``className`` from fixed words: never ``innerHTML``.
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "convey-api-token";
const REFRESH_MS = Number(document.body.dataset.refresh) || 1500;
const SCOPE = ["total_connections", "current_connections", "bytes_tx", "bytes_rx", "refused", "failed"];
const FIXED = new Set([...SCOPE, "mode", "uptime_seconds", "total_bytes_tx", "total_bytes_rx", "reloads",
  "reload_failures", "reload_errors", "last_reload_error", "frontends", "backends"]);
let prev = null;          // the previous /stats document
let apiMode = "unknown";  // "none" (no API), "read-only", "writable"
let apiDoc = null;        // the last GET /api/backends
let failures = 0;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

// 1234567 -> "1.23 M"; with a unit: "1.23 MB/s". Below 1000: as is (two decimals for fractions).
function human(n, unit) {
  if (typeof n !== "number" || !isFinite(n)) return "\u2013";
  const prefixes = ["", "k", "M", "G", "T", "P"];
  let v = Math.abs(n), i = 0;
  while (v >= 1000 && i < prefixes.length - 1) { v /= 1000; i++; }
  let s;
  if (i === 0) s = Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0);
  else s = v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0);
  const suffix = prefixes[i] + (unit || "");
  return (n < 0 ? "-" : "") + s + (suffix ? " " + suffix : "");
}
const bytes = (n) => human(n, "B");
const byteRate = (r) => r === null ? "\u2013" : human(r, "B/s") + " \u00b7 " + human(r * 8, "bit/s");

function duration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m " + s % 60 + "s" : s + "s";
}

function dig(doc, path) {
  let node = doc;
  for (const key of path) {
    if (node === null || typeof node !== "object" || !(key in node)) return undefined;
    node = node[key];
  }
  return node;
}

// Per second between the previous snapshot and this one; null when unknown (first snapshot, restart, gauge down).
function rate(doc, path) {
  if (!prev) return null;
  const dt = doc.uptime_seconds - prev.uptime_seconds;
  const now = dig(doc, path), before = dig(prev, path);
  if (!(dt > 0) || typeof now !== "number" || typeof before !== "number" || now < before) return null;
  return (now - before) / dt;
}

// A cell: a string, or {text, cls, badge}. The row's last cells may be built once by `fixed` (the actions).
function setCell(td, cell) {
  const spec = typeof cell === "object" && cell !== null ? cell : {text: cell};
  td.className = spec.cls || "";
  if (spec.title !== undefined) td.title = spec.title;
  if (spec.badge) {
    let span = td.firstChild;
    if (!span || span.nodeName !== "SPAN") { td.textContent = ""; span = td.appendChild(el("span")); }
    span.className = "state state-" + spec.badge.replace(/[^a-z-]/g, "");
    if (span.textContent !== spec.text) span.textContent = spec.text;
  } else if (td.textContent !== String(spec.text)) {
    td.textContent = String(spec.text);
  }
}

// Rows keyed by `key`, updated in place; `fixed(row)` builds extra cells once, when the row is new, and puts
// them after the first `at` cells (the actions, kept in view next to the state).
function syncTable(table, headers, rows, fixed, at) {
  if (!table.tHead) {
    const tr = table.createTHead().insertRow();
    headers.forEach((h) => tr.appendChild(el("th", h.text || h, h.cls)));
  }
  const body = table.tBodies[0] || table.createTBody();
  const seen = new Set();
  rows.forEach((row, index) => {
    seen.add(row.key);
    let tr = [...body.rows].find((r) => r.dataset.key === row.key);
    if (!tr) {
      tr = el("tr");
      tr.dataset.key = row.key;
      row.cells.forEach(() => tr.appendChild(el("td")));
      if (fixed) fixed(row).forEach((td, i) => tr.insertBefore(td, tr.cells[at + i]));
    }
    if (body.rows[index] !== tr) body.insertBefore(tr, body.rows[index] || null);
    const extra = fixed ? tr.cells.length - row.cells.length : 0;
    row.cells.forEach((cell, i) => setCell(tr.cells[i < at ? i : i + extra], cell));
  });
  [...body.rows].filter((r) => !seen.has(r.dataset.key)).forEach((r) => r.remove());
}

const num = (n) => ({text: human(n), cls: "num", title: String(n)});
const perSec = (r, unit) => ({text: r === null ? "\u2013" : human(r, unit || "/s"), cls: "num"});

function summary(doc) {
  const cards = [
    ["open", "open connections", human(doc.current_connections)],
    ["conn-rate", "connections/s", human(rate(doc, ["total_connections"]))],
    ["tx-rate", "clients \u2192 servers", byteRate(rate(doc, ["bytes_tx"]))],
    ["rx-rate", "servers \u2192 clients", byteRate(rate(doc, ["bytes_rx"]))],
    ["total", "connections", human(doc.total_connections)],
    ["refused", "refused", human(doc.refused)],
    ["failed", "failed", human(doc.failed)],
    ["bytes", "bytes tx / rx", bytes(doc.bytes_tx) + " / " + bytes(doc.bytes_rx)],
    ["reloads", "reloads (rejected, errors)",
      doc.reloads + " (" + doc.reload_failures + ", " + doc.reload_errors + ")"],
    ["uptime", "up", duration(doc.uptime_seconds)],
  ];
  const box = $("summary");
  for (const [id, label, value] of cards) {
    let card = $("card-" + id);
    if (!card) {
      card = box.appendChild(el("div", null, "card"));
      card.id = "card-" + id;
      card.append(el("div", null, "v"), el("div", label, "k"));
    }
    if (card.firstChild.textContent !== value) card.firstChild.textContent = value;
  }
}

function frontends(doc) {
  const headers = ["frontend", "backend", "open", "conn/s", "total", "refused", "in/s", "out/s", "bytes in",
    "bytes out"];
  const rows = Object.entries(doc.frontends || {}).map(([name, f]) => ({key: name, cells: [
    name, f.backend, num(f.current_connections), perSec(rate(doc, ["frontends", name, "total_connections"])),
    num(f.total_connections), num(f.refused), perSec(rate(doc, ["frontends", name, "bytes_tx"]), "B/s"),
    perSec(rate(doc, ["frontends", name, "bytes_rx"]), "B/s"), bytes(f.bytes_tx), bytes(f.bytes_rx)]}));
  syncTable($("frontends"), headers, rows);
}

function servers(doc) {
  const headers = ["backend", "server", "state", {text: "actions", cls: "actions-col"}, "weight", "open", "conn/s",
    "total", "in/s", "out/s", "failed", "checks ok/failed", "address", "last check error"];
  const rows = [];
  for (const [backend, b] of Object.entries(doc.backends || {})) {
    for (const [server, s] of Object.entries(b.server_detail || {})) {
      const a = dig(apiDoc, ["backends", backend, "servers", server]) || {};
      const state = a.state || s.state;
      const file = a.configured_weight !== undefined ? a.configured_weight : s.configured_weight;
      const weight = file !== undefined && file !== s.weight ? s.weight + " (file " + file + ")" : String(s.weight);
      const path = ["backends", backend, "server_detail", server];
      rows.push({key: backend + "/" + server, backend, server, cells: [
        backend, server, {text: state, badge: state}, {text: weight, cls: "num"},
        num(s.current_connections), perSec(rate(doc, [...path, "total_connections"])), num(s.total_connections),
        perSec(rate(doc, [...path, "bytes_tx"]), "B/s"), perSec(rate(doc, [...path, "bytes_rx"]), "B/s"),
        num(s.failed), s.checks_ok + " / " + s.checks_failed, s.addr, {text: s.last_check_error || "", cls: "wrap"}]});
    }
  }
  syncTable($("servers"), headers, rows, actionCells, 3);
}

function actionCells(row) {
  const td = el("td", null, "actions-col");
  const box = td.appendChild(el("div", null, "actions"));
  for (const action of ["drain", "maintenance", "ready"]) {
    const button = box.appendChild(el("button", action));
    button.type = "button";
    button.dataset.action = action;
    button.addEventListener("click", () => act(row.backend, row.server, action, null));
  }
  const input = box.appendChild(el("input"));
  input.type = "number"; input.min = "0"; input.placeholder = "weight";
  input.setAttribute("aria-label", "weight for " + row.key);
  const set = box.appendChild(el("button", "set weight"));
  set.type = "button";
  set.dataset.action = "weight";
  set.addEventListener("click", () => act(row.backend, row.server, "weight", {weight: Number(input.value)}));
  return [td];
}

function value(key, v) {
  if (v === null || v === undefined) return "\u2013";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (typeof v === "number") return /bytes/.test(key) ? bytes(v) : human(v);
  if (Array.isArray(v)) return v.join(", ");
  return String(v);
}

const isRecord = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const isFlat = (v) => isRecord(v) && Object.values(v).every((x) => !isRecord(x) && !Array.isArray(x) || Array.isArray(x)
  && x.every((y) => !isRecord(y)));

// A table of records (a list of dicts, or a map of flat dicts): one row each, a column per key.
function recordTable(parent, id, label, records) {
  const entries = records.map(([key, r]) => [key, flatten(r, "", {})]);
  const columns = [...new Set(entries.flatMap(([, r]) => Object.keys(r)))];
  const table = tableIn(parent, id, label);
  const rows = entries.map(([key, r]) => ({key, cells: [key, ...columns.map((c) => ({
    text: value(c, r[c]), cls: typeof r[c] === "number" ? "num" : "wrap"}))]}));
  if (table.dataset.columns !== columns.join(",")) { table.textContent = ""; table.dataset.columns = columns.join(","); }
  syncTable(table, ["name", ...columns], rows);
}

function flatten(r, prefix, out) {
  for (const [k, v] of Object.entries(r)) {
    if (isRecord(v)) flatten(v, prefix + k + ".", out); else out[prefix + k] = v;
  }
  return out;
}

function tableIn(parent, id, title) {
  let table = document.getElementById(id);
  if (!table) {
    if (title.includes(".") || title.includes(" ")) parent.appendChild(el("h3", title));
    table = parent.appendChild(el("div", null, "scroll")).appendChild(el("table"));
    table.id = id;
  }
  return table;
}

// Any other section, by shape: scalars in a name/value/per-second table, nested dicts below it; records (a list of
// dicts, or a map of flat dicts with the same keys: per frontend, per server) one row each.
function section(doc, parent, path) {
  const node = dig(doc, path);
  const id = "sec-" + path.join("-").replace(/[^A-Za-z0-9_-]/g, "_");
  const title = path.join(".");
  if (Array.isArray(node) && node.every(isRecord)) {  // workers: their own figures, then their sections
    const names = node.map((r, i) => String(r.index !== undefined ? r.index : i));
    const scalars = (r) => Object.fromEntries(Object.entries(r).filter(([, v]) => !isRecord(v)));
    recordTable(parent, id, title, node.map((r, i) => [names[i], scalars(r)]));
    const nested = node.map((r) => flatten(Object.fromEntries(Object.entries(r).filter(([, v]) => isRecord(v))),
      "", {}));
    const keys = [...new Set(nested.flatMap((r) => Object.keys(r)))];
    if (keys.length) {  // one row per figure, one column per item
      const rows = keys.map((k) => ({key: k, cells: [k, ...nested.map((r) => ({text: value(k, r[k]),
        cls: typeof r[k] === "number" ? "num" : "wrap"}))]}));
      const table = tableIn(parent, id + "-sections", title + " (sections)");
      if (table.dataset.columns !== names.join(",")) { table.textContent = ""; table.dataset.columns = names.join(","); }
      syncTable(table, ["name", ...names.map((n) => title + " " + n)], rows);
    }
    return;
  }
  if (!isRecord(node)) return;
  const values = Object.values(node);
  const shape = (v) => isRecord(v) ? Object.keys(v).sort().join(",") : null;
  if (values.length && values.every(isFlat) && shape(values[0]) && values.every((v) => shape(v) === shape(values[0]))) {
    recordTable(parent, id, title, Object.entries(node));
    return;
  }
  const scalars = Object.entries(node).filter(([, v]) => !isRecord(v) && !(Array.isArray(v) && v.some(isRecord)));
  if (scalars.length || !values.length) {
    const rows = scalars.map(([k, v]) => ({key: k, cells: [k, {text: value(k, v), title: String(v),
      cls: typeof v === "number" ? "num" : "wrap"}, perSec(typeof v === "number" ? rate(doc, [...path, k]) : null)]}));
    if (!rows.length) rows.push({key: "", cells: ["(none)", "", ""]});
    syncTable(tableIn(parent, id, title), ["name", "value", "per second"], rows);
  }
  Object.entries(node).filter(([, v]) => isRecord(v) || Array.isArray(v) && v.some(isRecord))
    .forEach(([k]) => section(doc, parent, [...path, k]));
}

function sections(doc) {
  const box = $("sections");
  for (const key of Object.keys(doc).filter((k) => !FIXED.has(k))) {
    let div = document.getElementById("section-" + key);
    if (!div) {
      div = box.appendChild(el("section"));
      div.id = "section-" + key;
      div.appendChild(el("h2", key));
    }
    section(doc, div, [key]);
  }
}

function render(doc) {
  $("title").textContent = "convey (" + doc.mode + " mode)";
  summary(doc);
  frontends(doc);
  servers(doc);
  sections(doc);
  const err = doc.last_reload_error ? " \u00b7 last reload error: " + doc.last_reload_error : "";
  $("status-text").textContent = "updated " + new Date().toLocaleTimeString() + " \u00b7 every " +
    REFRESH_MS / 1000 + " s" + err;
  $("live").className = "dot ok";
  prev = doc;
}

function auth() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? {"Authorization": "Bearer " + token} : {};
}

function showApi() {
  const writable = apiMode === "writable", token = !!sessionStorage.getItem(TOKEN_KEY);
  $("api").hidden = apiMode === "none" || apiMode === "unknown";
  $("token-form").hidden = !writable || token;
  $("api-note").textContent = apiMode === "read-only" ? "The runtime API is read-only (no api_token configured)."
    : writable && !token ? "Enter the API token to drain servers, put them in maintenance or change weights."
    : writable ? "Runtime changes are an overlay on the config file: they are not written back." : "";
  document.body.classList.toggle("api-on", writable && token);
}

async function loadApi() {
  if (apiMode === "none") return;
  try {
    const r = await fetch("api/backends", {cache: "no-store", headers: auth()});
    if (r.status === 404) { apiMode = "none"; apiDoc = null; }
    else if (r.status === 401) { sessionStorage.removeItem(TOKEN_KEY); apiMode = "writable"; }
    else if (r.ok) { apiDoc = await r.json(); apiMode = apiDoc.read_only ? "read-only" : "writable"; }
  } catch (e) { /* the stats fetch reports the service unreachable */ }
  showApi();
}

function message(text, isError) {
  $("api-message").textContent = text;
  $("api-message").className = isError ? "note error" : "note";
}

async function act(backend, server, action, body) {
  const url = "api/servers/" + encodeURIComponent(backend) + "/" + encodeURIComponent(server) + "/" + action;
  const init = {method: action === "weight" ? "PUT" : "POST", headers: auth()};
  if (body) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  let r;
  try { r = await fetch(url, init); } catch (e) { message(action + " failed: " + e, true); return; }
  let answer = {};
  try { answer = await r.json(); } catch (e) { /* no JSON body */ }
  if (r.ok) message(action + " " + backend + "/" + server + ": state " + (answer.state || "?"), false);
  else if (r.status === 401) { sessionStorage.removeItem(TOKEN_KEY); message("the token was refused", true); }
  else if (r.status === 403) { apiMode = "read-only"; message("the API is read-only", true); }
  else message(action + " refused: " + (answer.error || r.status) + (answer.field ? " (" + answer.field + ")" : ""), true);
  showApi();
  await tick();
}

async function tick() {
  try {
    const r = await fetch("stats", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    const doc = await r.json();
    await loadApi();
    render(doc);
    failures = 0;
  } catch (e) {
    failures++;
    $("live").className = "dot stale";
    $("status-text").textContent = "stats unreachable (" + e.message + "), retrying";
  }
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  message("", false);
  loadApi();
});

render(JSON.parse($("initial").textContent));
loadApi().then(() => servers(prev));
setInterval(tick, REFRESH_MS);
"""
