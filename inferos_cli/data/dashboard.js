"use strict";
// The inferos dashboard: every second it reads /v1/metrics, /v1/policy, /v1/health and the new part of
// /v1/history, then draws the cards, the SVG charts, the active policy and the decisions. CHOICES (the
// policy schema's allowed values) is prepended by the server.

const REFRESH_MS = 1000;
const HISTORY_TAIL = 64;          // entries asked for on each refresh once the full history is loaded
const KEEP_S = 3600;              // longest chart window
const TOKEN_KEY = "inferos-agent-token";
const COLORS = ["#5aa9f0", "#4cc38a", "#f0a35a", "#c78bf0", "#f06a6a", "#9ad0d0"];
const FIELDS = [
  ["kv.mode", "KV mode"], ["kv.quant", "KV preset"], ["kv.recent_window", "recent window (tokens)"],
  ["kv.sink_tokens", "sink tokens"], ["kv.level_thresholds.L1_int8", "threshold L1 int8"],
  ["kv.level_thresholds.L2_int4", "threshold L2 int4"], ["kv.level_thresholds.L3_evict", "threshold L3 evict"],
  ["quality.max_delta_ppl", "max delta-PPL"], ["scheduler.mode", "scheduler mode"],
  ["scheduler.prefill_device", "prefill device"], ["scheduler.decode_device", "decode device"],
];

const state = {
  history: [], lastT: 0, needFull: true, offset: 0, kv: [], requests: new Map(), samples: [],
  metrics: null, policy: null, health: null, dirty: false, blocked: false, timer: null, refreshes: 0,
};

class Unauthorized extends Error {}

// ---------------------------------------------------------------------------------------- formatting
// The rules of inferos_cli/units.py: binary sizes, "n/a" for a value the server did not measure.
function fmtBytes(n) {
  if (n == null) return "n/a";
  let size = n;
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (Math.abs(size) < 1024 || unit === "TiB") return unit === "B" ? `${size.toFixed(0)} B` : `${size.toFixed(1)} ${unit}`;
    size /= 1024;
  }
}
const fmt = (v, digits, unit = "") => (v == null ? "n/a" : `${v.toFixed(digits)}${unit}`);
const gbBytes = (gb) => (gb == null ? null : gb * 1e9);
const mbBytes = (mb) => (mb == null ? null : mb * 1e6);
const clock = (t) => new Date(t * 1000).toLocaleTimeString();
const get = (obj, path) => path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);

function setText(key, text) {
  for (const el of document.querySelectorAll(`[data-key="${key}"]`)) el.textContent = text;
}

// ---------------------------------------------------------------------------------------------- HTTP
// The agent token (when the server asks for one) is sent as X-Inferos-Token, the header the API checks.
async function api(path, init = {}) {
  const headers = { Accept: "application/json" };
  if (init.body) headers["Content-Type"] = "application/json";
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["X-Inferos-Token"] = token;
  const resp = await fetch(path, { ...init, headers, cache: "no-store" });
  let body = null;
  try { body = await resp.json(); } catch (err) { body = null; }
  if (resp.status === 401) throw new Unauthorized(body && body.error ? body.error.message : "unauthorized");
  return { status: resp.status, body };
}

async function getJson(path) {
  const { status, body } = await api(path);
  if (status !== 200) throw new Error(`${path} answered ${status}: ${body && body.error ? body.error.message : ""}`);
  return body;
}

function askToken() {
  state.blocked = true;
  $("main").hidden = true;
  $("token-form").hidden = false;
  $("token-error").textContent = sessionStorage.getItem(TOKEN_KEY) ? "the server refused this token" : "";
  setStatus("the server needs its agent token", true);
}

// ------------------------------------------------------------------------------------------- refresh
function $(id) { return document.getElementById(id); }

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function refresh() {
  clearTimeout(state.timer);
  try {
    const [metrics, policy, health, history] = await Promise.all([
      getJson("/v1/metrics"), getJson("/v1/policy"), getJson("/v1/health"),
      getJson(`/v1/history?limit=${state.needFull ? 100000 : HISTORY_TAIL}`),
    ]);
    state.metrics = metrics; state.policy = policy; state.health = health;
    mergeHistory(history.items);
    observe(metrics);
    render();
    state.refreshes += 1;
    document.body.dataset.refreshes = String(state.refreshes);
    setStatus(`live · ${clock(Date.now() / 1000)} · policy v${policy.version}`);
  } catch (err) {
    if (err instanceof Unauthorized) { askToken(); return; }
    setStatus(`cannot read the server: ${err.message}`, true);
  }
  clearTimeout(state.timer);
  if (!state.blocked) state.timer = setTimeout(refresh, REFRESH_MS);
}

// History arrives whole once, then as a tail; a gap (more new entries than the tail holds) reloads it whole.
function mergeHistory(items) {
  if (state.needFull) {
    state.history = items.slice();
    state.needFull = false;
  } else {
    if (items.length >= HISTORY_TAIL && items[0].t > state.lastT) state.needFull = true;
    state.history.push(...items.filter((i) => i.t > state.lastT));
  }
  if (state.history.length) state.lastT = state.history[state.history.length - 1].t;
  state.offset = state.lastT ? state.lastT - Date.now() / 1000 : 0;
  const oldest = state.lastT - KEEP_S;
  while (state.history.length && state.history[0].t < oldest) state.history.shift();
}

const serverNow = () => Math.max(state.lastT, Date.now() / 1000 + state.offset);

// What the baseline comparison needs: each finished request this page saw (/v1/metrics' last_request, with
// its baseline flag and policy version) and each refresh's device readings.
function observe(m) {
  const r = m.last_request;
  if (r && r.error == null && !state.requests.has(r.id)) {
    state.requests.set(r.id, { baseline: r.baseline, version: r.policy_version, tps: r.decode_tps,
      ttft: r.ttft_s == null ? null : r.ttft_s * 1000, kv: r.kv ? r.kv.total_bytes : null });
    if (state.requests.size > 500) state.requests.delete(state.requests.keys().next().value);
  }
  state.samples.push({ baseline: m.baseline_mode, version: m.policy_version, ...m.util });
  if (state.samples.length > KEEP_S) state.samples.shift();
  state.kv.push({ t: serverNow(), bytes: (m.kv && m.kv.bytes) || {} });
  while (state.kv.length && state.kv[0].t < serverNow() - KEEP_S) state.kv.shift();
}

// ------------------------------------------------------------------------------- baseline comparison
function percentile(values, q) {
  if (!values.length) return null;
  const ordered = values.slice().sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((q / 100) * ordered.length));
  return ordered[Math.min(rank, ordered.length) - 1];
}
const max = (values) => (values.length ? Math.max(...values) : null);

// Baseline side: what ran in baseline mode on this server; current side: what ran with the current policy
// version outside baseline mode. Each side is reduced the same way (a median, a p95 or a peak).
function compare(items, key, reduce, unitName) {
  const m = state.metrics;
  const values = (pick) => items.filter(pick).map((i) => i[key]).filter((v) => v != null);
  const base = values((i) => i.baseline);
  const cur = values((i) => !i.baseline && i.version === m.policy_version);
  if (!base.length) return { text: "no baseline measured yet: turn baseline mode on and send requests" };
  if (m.baseline_mode) return { text: `baseline mode on: measuring the baseline (${base.length} ${unitName})` };
  if (!cur.length) return { text: `baseline measured; waiting for ${unitName} with policy v${m.policy_version}` };
  const b = reduce(base), c = reduce(cur);
  if (!b) return { text: "baseline value is 0: no ratio" };
  return { change: ((c - b) / b) * 100, cur: c, base: b, n: [cur.length, base.length] };
}

function showDelta(key, cmp, better, format, unitName) {
  const el = document.querySelector(`[data-key="${key}"]`);
  el.classList.remove("up", "down");
  if (cmp.text) { el.textContent = cmp.text; return; }
  const sign = cmp.change >= 0 ? "+" : "";
  el.textContent = `${sign}${cmp.change.toFixed(1)} % vs baseline (${format(cmp.cur)} vs ${format(cmp.base)}; `
    + `${cmp.n[0]} vs ${cmp.n[1]} ${unitName})`;
  if (Math.abs(cmp.change) >= 0.05) el.classList.add((cmp.change > 0) === (better === "higher") ? "up" : "down");
}

// --------------------------------------------------------------------------------------------- cards
function renderCards() {
  const m = state.metrics;
  const reqs = [...state.requests.values()];
  setText("tps", fmt(m.tps, 1, " tok/s"));
  setText("tps_aggregate", `all requests together: ${fmt(m.tps_aggregate, 1, " tok/s")} (last 10 s)`);
  showDelta("tps-delta", compare(reqs, "tps", (v) => percentile(v, 50), "requests"), "higher",
    (v) => fmt(v, 1), "requests seen");
  setText("ftl_ms", fmt(m.ftl_ms, 1, " ms"));
  setText("p95_ms", fmt(m.p95_ms, 1, " ms"));
  showDelta("ttft-delta", compare(reqs, "ttft", (v) => percentile(v, 50), "requests"), "lower",
    (v) => fmt(v, 1, " ms"), "requests seen, p50");
  setText("active", String(m.requests.active));
  setText("queued", String(m.requests.queued));
  setText("completed", `${m.requests.completed} completed, ${m.requests.failed} failed`);

  const t0 = serverNow() - windowS();
  const snaps = state.history.filter((i) => i.type === "metrics" && i.t >= t0);
  const rss = snaps.map((i) => i.rss_gb).concat([m.mem.rss_gb]).filter((v) => v != null);
  setText("rss_peak", fmtBytes(gbBytes(max(rss))));
  setText("rss_now", `now ${fmtBytes(gbBytes(m.mem.rss_gb))}; VRAM ${fmtBytes(gbBytes(m.mem.vram_gb))}`);
  const rssItems = state.history.filter((i) => i.type === "metrics")
    .map((i) => ({ baseline: i.baseline_mode, version: i.policy_version, rss: i.rss_gb }));
  showDelta("rss-delta", compare(rssItems, "rss", max, "samples"), "lower", (v) => fmtBytes(gbBytes(v)), "samples, peak");

  setText("kv_bytes", fmtBytes(mbBytes(m.mem.kv_mb)));
  const ratio = m.mem.kv_ratio_vs_fp16;
  setText("kv_ratio", ratio == null ? "vs fp16: n/a (no request yet)" : `${ratio.toFixed(3)} × the fp16 size`);
  showDelta("kv-delta", compare(reqs, "kv", (v) => percentile(v, 50), "requests"), "lower", fmtBytes, "requests seen");

  const q = m.quality;
  setText("delta_ppl", fmt(q.delta_ppl_est, 3));
  setText("quality_source", q.delta_ppl_est == null
    ? `n/a: no estimate (the auto-tuner, serve --auto-tune, measures it); budget ${q.max_delta_ppl}`
    : `${q.source || "auto-tuner"}; budget ${q.max_delta_ppl}`);
  setText("quality-delta", "delta-PPL is itself the change against the baseline cache");

  const utilItems = state.samples;
  for (const dev of ["cpu", "gpu", "npu"]) {
    const v = m.util[dev];
    setText(dev, fmt(v, 1, " %"));
    setText(`${dev}_reason`, v == null ? "not measured: the server read no counter for it" : "");
  }
  const cpu = compare(utilItems, "cpu", (v) => percentile(v, 50), "samples");
  showDelta("util-delta", cpu, "lower", (v) => fmt(v, 1, " %"), "samples, CPU median");
  $("baseline-note").textContent = "Changes compare the same reduction (median, p95 or peak) of what ran in "
    + "baseline mode on this server with what ran under the current policy version, as seen by this page.";
}

// -------------------------------------------------------------------------------------------- charts
const windowS = () => Number($("window").value) * 60;
const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text != null) el.textContent = text;
  return el;
}

function drawChart(svg, series, markers, yfmt) {
  const W = 600, H = 200, L = 62, R = 8, T = 18, B = 20;
  const t1 = serverNow(), t0 = t1 - windowS();
  svg.replaceChildren();
  const inWindow = (p) => p[0] >= t0 && p[1] != null;
  const values = series.flatMap((s) => s.points.filter(inWindow).map((p) => p[1]));
  const ymax = (Math.max(0, ...values) || 1) * 1.1;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => H - B - (v / ymax) * (H - T - B);
  for (const frac of [0, 0.5, 1]) {
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: y(ymax * frac), y2: y(ymax * frac), class: "grid" }));
    svg.append(svgEl("text", { x: L - 4, y: y(ymax * frac) + 4, "text-anchor": "end" }, yfmt(ymax * frac)));
  }
  const minutes = windowS() / 60;
  svg.append(svgEl("text", { x: L, y: H - 4 }, `-${minutes} min`));
  svg.append(svgEl("text", { x: W - R, y: H - 4, "text-anchor": "end" }, "now"));
  let count = 0;
  series.forEach((s, idx) => {
    let d = "", pen = "M";
    for (const p of s.points) {
      if (p[0] < t0) continue;
      if (p[1] == null) { pen = "M"; continue; }
      d += `${pen}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`;
      pen = "L";
      count += 1;
    }
    const color = COLORS[idx % COLORS.length];
    if (d) svg.append(svgEl("path", { d, fill: "none", stroke: color, "stroke-width": 1.5 }));
    svg.append(svgEl("rect", { x: L + 6 + idx * 120, y: 4, width: 10, height: 10, fill: color }));
    svg.append(svgEl("text", { x: L + 20 + idx * 120, y: 13 }, s.name));
  });
  markers.filter((mk) => mk.t >= t0).forEach((mk, idx) => {
    const g = svgEl("g", { class: "marker-group" });
    g.append(svgEl("line", { x1: x(mk.t), x2: x(mk.t), y1: T, y2: H - B, class: "marker" }));
    g.append(svgEl("text", { x: x(mk.t) + 3, y: T + 10 + (idx % 3) * 11, class: "marker-label" }, mk.kind));
    g.append(svgEl("title", {}, `${clock(mk.t)} ${mk.kind}: ${mk.reason}`));
    svg.append(g);
  });
  svg.dataset.points = String(count);
  svg.dataset.markers = String(markers.filter((mk) => mk.t >= t0).length);
}

function renderCharts() {
  const snaps = state.history.filter((i) => i.type === "metrics");
  const markers = state.history.filter((i) => i.type === "decision");
  const line = (key, scale = 1) => snaps.map((i) => [i.t, i[key] == null ? null : i[key] * scale]);
  drawChart($("chart-tps"), [{ name: "median/request", points: line("tps") },
    { name: "all (10 s)", points: line("tps_aggregate") }], markers, (v) => v.toFixed(0));
  drawChart($("chart-ttft"), [{ name: "p50", points: line("ftl_ms") }, { name: "p95", points: line("p95_ms") }],
    markers, (v) => `${v.toFixed(0)} ms`);
  drawChart($("chart-rss"), [{ name: "RSS", points: line("rss_gb", 1e9) }], markers, fmtBytes);
  const tiers = [...new Set(state.kv.flatMap((s) => Object.keys(s.bytes)))].sort();
  const kvSeries = [{ name: "total", points: line("kv_mb", 1e6) }].concat(tiers.map((tier) => ({
    name: tier, points: state.kv.map((s) => [s.t, s.bytes[tier] == null ? null : s.bytes[tier]]) })));
  drawChart($("chart-kv"), kvSeries, markers, fmtBytes);
}

// -------------------------------------------------------------------------------------------- policy
function renderPolicy() {
  const { policy, effective, baseline_mode: baseline, version } = state.policy;
  const m = state.metrics;
  const th = policy.kv.level_thresholds;
  const providers = Object.entries(m.provider || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
  const rows = [
    ["profile", state.health.profile || "(none: defaults)"], ["model", state.health.model],
    ["baseline mode", baseline ? `on (requests run with KV mode ${effective.kv.mode})` : "off"],
    ["KV mode", policy.kv.mode], ["KV preset", policy.kv.quant], ["recent window", `${policy.kv.recent_window} tokens`],
    ["sink tokens", policy.kv.sink_tokens], ["thresholds", `L1 int8 ${th.L1_int8} · L2 int4 ${th.L2_int4} · L3 evict ${th.L3_evict}`],
    ["KV caps", `${policy.kv.max_tokens ?? "no"} token cap · ${policy.kv.budget_bytes == null ? "no" : fmtBytes(policy.kv.budget_bytes)} byte budget`],
    ["max delta-PPL", policy.quality.max_delta_ppl], ["scheduler", policy.scheduler.mode],
    ["devices", `prefill ${policy.scheduler.prefill_device} · decode ${policy.scheduler.decode_device}`],
    ["providers in use", providers || "n/a (no request yet)"],
  ];
  const table = $("policy-table");
  table.replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr");
    for (const cell of [k, v]) { const td = document.createElement("td"); td.textContent = String(cell); tr.append(td); }
    return tr;
  }));
  $("policy-version").textContent = `version ${version}`;
  const button = $("baseline");
  button.textContent = `baseline mode: ${baseline ? "on" : "off"}`;
  button.setAttribute("aria-pressed", String(baseline));
  if (!state.dirty) fillForm(policy);
}

function buildForm() {
  const box = $("policy-fields");
  for (const [path, label] of FIELDS) {
    const id = `f-${path.replaceAll(".", "-")}`;
    const lab = document.createElement("label");
    lab.htmlFor = id; lab.textContent = label;
    let input;
    if (CHOICES[path]) {
      input = document.createElement("select");
      for (const c of CHOICES[path]) input.append(new Option(c, c));
    } else {
      input = document.createElement("input");
      input.type = "text"; input.inputMode = "decimal";
    }
    input.id = id; input.name = path;
    input.addEventListener("input", () => { state.dirty = true; });
    box.append(lab, input);
  }
}

function fillForm(policy) {
  for (const [path] of FIELDS) $(`f-${path.replaceAll(".", "-")}`).value = String(get(policy, path));
}

// Numbers go as numbers; anything else goes as typed, so the server's 422 says what is wrong with it.
function parseValue(text) {
  const s = text.trim();
  return /^-?\d+(\.\d+)?([eE][-+]?\d+)?$/.test(s) ? Number(s) : s;
}

async function submitPolicy(event) {
  event.preventDefault();
  const partial = {};
  for (const [path] of FIELDS) {
    const raw = $(`f-${path.replaceAll(".", "-")}`).value;
    if (String(get(state.policy.policy, path)) === raw.trim()) continue;
    const keys = path.split(".");
    let node = partial;
    for (const k of keys.slice(0, -1)) node = node[k] = node[k] || {};
    node[keys[keys.length - 1]] = parseValue(raw);
  }
  $("policy-error").textContent = ""; $("policy-ok").textContent = "";
  if (!Object.keys(partial).length) { $("policy-ok").textContent = "nothing changed"; return; }
  try {
    const { status, body } = await api("/v1/policy", { method: "POST", body: JSON.stringify(partial) });
    if (status === 200) {
      state.dirty = false;
      $("policy-ok").textContent = `applied: policy version ${body.version}`;
      await refresh();
    } else {
      $("policy-error").textContent = body && body.error ? body.error.message : `the server answered ${status}`;
    }
  } catch (err) {
    if (err instanceof Unauthorized) askToken(); else $("policy-error").textContent = err.message;
  }
}

async function toggleBaseline() {
  const enable = !(state.policy && state.policy.baseline_mode);
  try {
    const { status, body } = await api("/v1/baseline", { method: "POST", body: JSON.stringify({ enable }) });
    if (status !== 200) setStatus(body && body.error ? body.error.message : `baseline: ${status}`, true);
    await refresh();
  } catch (err) {
    if (err instanceof Unauthorized) askToken();
  }
}

function renderDecisions() {
  const items = state.history.filter((i) => i.type === "decision").slice(-50).reverse();
  $("decisions").replaceChildren(...items.map((i) => {
    const li = document.createElement("li");
    const b = document.createElement("b");
    b.textContent = i.kind;
    li.append(`${clock(i.t)} `, b, `: ${i.reason}`);
    return li;
  }));
}

function render() {
  $("model").textContent = `${state.health.model} · ${state.health.profile || "default profile"}`;
  renderCards();
  renderCharts();
  renderPolicy();
  renderDecisions();
}

// ----------------------------------------------------------------------------------------------- start
buildForm();
$("policy-form").addEventListener("submit", submitPolicy);
$("baseline").addEventListener("click", toggleBaseline);
$("window").addEventListener("change", () => { if (state.metrics) render(); });
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token-form").hidden = true;
  $("main").hidden = false;
  state.blocked = false;
  refresh();
});
refresh();
