// Cohort dashboard: polls the status API with the bearer token and draws what it says.
// Read-only by construction: it only ever sends GET requests to the paths in API.
// Nothing from the API is inserted as HTML: every value goes in through textContent or an
// attribute, so a site name or a decline reason can never become markup or script.
"use strict";

// Every request this page makes (besides its own three files). The browser test checks that
// each is in the OpenAPI document.
const API = {
  status: "/api/v1/status",
  sites: "/api/v1/sites",
  rounds: "/api/v1/rounds",
  shards: "/api/v1/shards",
};
const TOKEN_KEY = "cohort.status.token";
// The coordinator process last seen, so a reload during an outage still notices a restart.
const STARTED_KEY = "cohort.started_unix";
const POLL_MS = 2000;
const ROUNDS_PAGE = 500;
const STAGES = [
  ["AdvertiseKeys", "Keys advertised"],
  ["ShareKeys", "Shares exchanged"],
  ["MaskedInput", "Masked inputs"],
  ["ConsistencyCheck", "Consistency check"],
  ["Unmask", "Unmasking"],
];
const STAGE_COLOURS = {
  AdvertiseKeys: "#5b8def", ShareKeys: "#8e6bd1", MaskedInput: "#d9822b",
  ConsistencyCheck: "#2a9d8f", Unmask: "#c0392b",
};
const PALETTE = ["#d9822b", "#2a9d8f", "#8e6bd1", "#c0392b", "#5b8def", "#7a8b1e", "#b5487a", "#4d6a7a"];
const METRIC_NAMES = {
  accuracy: "accuracy", balanced_accuracy: "balanced accuracy", f1: "F1", macro_f1: "macro F1",
  auc: "AUC", rmse: "RMSE", mae: "MAE", r2: "R²",
};

class AuthError extends Error {}

const state = {
  token: null,
  timer: null,
  rounds: [],
  lastRound: 0,
  startedUnix: null,
  status: null,
  sites: [],
  shards: null,
  offlineSince: null,
  restartNote: null,
  metric: null,
  cursor: {},
};

const $ = (id) => document.getElementById(id);

// A DOM element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const svg = ["svg", "polyline", "line", "text", "g", "rect", "title", "circle"].includes(tag);
  const e = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function api(path) {
  const r = await fetch(path, {
    headers: { Authorization: "Bearer " + state.token },
    cache: "no-store",
  });
  if (r.status === 401) throw new AuthError("the coordinator refused the token");
  if (!r.ok) {
    let why = "";
    try { why = (await r.json()).error || ""; } catch (_) { /* not JSON */ }
    throw new Error(`${path}: HTTP ${r.status} ${why}`);
  }
  return r.json();
}

// ---- formatting -------------------------------------------------------------------------

function fmtNum(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en");
  return v.toFixed(digits);
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.max(0, s);
  if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
  if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.round(s / 60);
  if (m < 90) return `${m} min`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

function fmtAgo(unix) {
  if (!unix) return "never";
  // The API counts in whole seconds: anything under two is "now".
  const s = Date.now() / 1000 - unix;
  return s < 2 ? "just now" : `${fmtDuration(s)} ago`;
}

function fmtTime(unix) {
  return new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function stateName(s) {
  return String(s || "").replaceAll("_", " ");
}

// ---- login and the poll loop -------------------------------------------------------------

function showLogin(message) {
  clearTimeout(state.timer);
  state.timer = null;
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(STARTED_KEY);
  // No data stays on the page once the token is gone or refused.
  Object.assign(state, { rounds: [], lastRound: 0, startedUnix: null, status: null, sites: [], shards: null });
  for (const id of ["overview-facts", "stages", "metric-chart", "loss-chart", "heldout-chart", "rollout", "heat-summary", "footer"]) {
    $(id).replaceChildren();
  }
  for (const t of ["sites-table", "rounds-table"]) $(t).tBodies[0].replaceChildren();
  $("dashboard").hidden = true;
  $("logout").hidden = true;
  $("connection").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").value = "";
  $("token").focus();
}

// `remembered`: the token this tab already logged in with (a reload). If the coordinator is
// down at that moment the page stays logged in and waits for it, as it does when it goes down
// later; a token typed in now is only kept once the coordinator has accepted it.
async function logIn(token, remembered) {
  state.token = token;
  try {
    await api(API.status);
  } catch (e) {
    if (e instanceof AuthError || !remembered) {
      showLogin(e instanceof AuthError
        ? "Wrong token: the coordinator refused it (HTTP 401). Ask the operator for the status token."
        : `The coordinator did not answer: ${e.message}`);
      return;
    }
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login").hidden = true;
  $("login-error").textContent = "";
  $("dashboard").hidden = false;
  $("logout").hidden = false;
  $("connection").hidden = false;
  await refresh();
}

function schedule() {
  clearTimeout(state.timer);
  if (state.token) state.timer = setTimeout(refresh, POLL_MS);
}

// New rounds only: the API pages by "after", so each poll costs one small request.
async function loadRounds() {
  for (;;) {
    const page = await api(`${API.rounds}?after=${state.lastRound}&per_page=${ROUNDS_PAGE}`);
    for (const r of page.rounds) {
      if (r.summary.round > state.lastRound) {
        state.rounds.push(r);
        state.lastRound = r.summary.round;
      }
    }
    if (page.rounds.length < ROUNDS_PAGE) return;
  }
}

async function refresh() {
  if (!state.token) return;
  try {
    const [status, sites, shards] = await Promise.all([api(API.status), api(API.sites), api(API.shards)]);
    if (state.startedUnix !== null && status.started_unix !== state.startedUnix) {
      // Another coordinator process: its store is the truth now (it may have been repaired
      // or rebuilt), so the rounds are read again from the start.
      state.restartNote = `The coordinator restarted at ${fmtTime(status.started_unix)} and resumed at round ${status.round}.`;
      state.rounds = [];
      state.lastRound = 0;
    }
    state.startedUnix = status.started_unix;
    sessionStorage.setItem(STARTED_KEY, String(status.started_unix));
    state.status = status;
    state.sites = sites.sites;
    state.shards = shards;
    await loadRounds();
    state.offlineSince = null;
    render();
  } catch (e) {
    if (e instanceof AuthError) {
      showLogin("The coordinator no longer accepts this token (HTTP 401). Log in again.");
      return;
    }
    if (state.offlineSince === null) state.offlineSince = Date.now();
    const c = $("connection");
    c.className = "connection offline";
    c.textContent = `Coordinator unreachable since ${new Date(state.offlineSince).toLocaleTimeString("en-GB")}; retrying every ${POLL_MS / 1000} s`;
    c.dataset.state = "offline";
  }
  schedule();
}

// ---- rendering ---------------------------------------------------------------------------

function render() {
  const c = $("connection");
  c.className = "connection live";
  c.dataset.state = "live";
  c.textContent = `Live · updated ${new Date().toLocaleTimeString("en-GB")}`;
  renderOverview();
  renderMetrics();
  renderSites();
  renderRounds();
  renderHeatmap();
  const s = state.status;
  $("footer").textContent = `Coordinator ${s.coordinator_version} · process started ${fmtTime(s.started_unix)} · this page refreshes every ${POLL_MS / 1000} s and cannot change the run.`;
}

function fact(key, label, value, cls) {
  return el("div", { "data-fact": key }, el("dt", {}, label), el("dd", { class: cls }, value));
}

function renderOverview() {
  const s = state.status;
  const done = s.rounds_completed;
  $("round-progress").max = Math.max(1, s.rounds_total);
  $("round-progress").value = Math.min(done, s.rounds_total);
  $("round-progress-text").textContent =
    `${fmtNum(done)} of ${fmtNum(s.rounds_total)} rounds (${(100 * done / Math.max(1, s.rounds_total)).toFixed(1)} %)`;

  const stages = $("stages");
  stages.replaceChildren();
  if (s.state === "training" || s.state === "statistics") {
    const at = STAGES.findIndex(([k]) => k === s.stage);
    STAGES.forEach(([k, name], i) => {
      stages.append(el("li", {
        class: i < at ? "done" : i === at ? "current" : "",
        "aria-current": i === at ? "step" : null,
      }, name));
    });
  } else if (s.state === "evaluating") {
    stages.append(el("li", { class: "current", "aria-current": "step" }, "Sites evaluate the new model"));
  }

  const facts = [];
  const stalled = s.seconds_since_progress > 120;
  facts.push(fact("state", "State", stateName(s.state) + (s.stage ? ` · ${s.stage}` : ""),
    s.state === "finished" ? "ok" : null));
  facts.push(fact("round", "Current round", `${fmtNum(s.round)}${s.attempt ? ` (attempt ${s.attempt + 1})` : ""}`));
  facts.push(fact("completed", "Rounds completed", fmtNum(done)));
  facts.push(fact("failed", "Rounds failed", fmtNum(s.rounds_failed), s.rounds_failed ? "warning" : null));
  facts.push(fact("eta", "Estimated time left",
    s.state === "finished" ? "finished" : s.estimated_remaining_seconds === null ? "after the first round" : fmtDuration(s.estimated_remaining_seconds)));
  facts.push(fact("progress", "Since last progress", fmtDuration(s.seconds_since_progress), stalled ? "bad" : null));
  facts.push(fact("sites", "Sites connected", `${s.sites_connected} (at least ${s.sites_expected} per round)`,
    s.sites_connected < s.sites_expected ? "warning" : null));
  facts.push(fact("aggregation", "Aggregation",
    s.secure_aggregation ? "secure (SecAgg+): the coordinator sees only sums" : "plain: the coordinator sees each site's update",
    s.secure_aggregation ? "ok" : "warning"));
  facts.push(fact("privacy", "Privacy budget spent", privacyText(s)));
  facts.push(fact("manifest", "Federation manifest", s.manifest_version === null ? "none (any site of the CA)" : `version ${s.manifest_version}`));
  facts.push(fact("elapsed", "Running for", fmtDuration(s.elapsed_seconds)));
  if (s.last_round) {
    const key = pickMetric();
    const v = s.last_round.weighted ? s.last_round.weighted[key] : null;
    facts.push(fact("last-metric", `Last ${METRIC_NAMES[key] || key} (pooled)`, fmtNum(v)));
  }
  $("overview-facts").replaceChildren(...facts);

  const alerts = [];
  if (state.restartNote) alerts.push(state.restartNote);
  if (s.stopped) alerts.push(`Training stopped early: ${s.stopped}`);
  if (s.last_failure) alerts.push(`Round ${s.last_failure.round} was given up: ${s.last_failure.reason}`);
  if (stalled) alerts.push(`No progress for ${fmtDuration(s.seconds_since_progress)}.`);
  $("overview-alert").hidden = alerts.length === 0;
  $("overview-alert").textContent = alerts.join(" ");
}

function privacyText(s) {
  const parts = [];
  if (s.privacy) {
    parts.push(`example-level ε = ${fmtNum(s.privacy.epsilon, 2)}` +
      (s.privacy.target_epsilon ? ` of ${fmtNum(s.privacy.target_epsilon, 2)}` : "") +
      ` at δ = ${s.privacy.delta.toExponential(0)} (${s.privacy.sites_exhausted} of ${s.privacy.sites} sites exhausted)`);
  }
  if (s.site_level_privacy) {
    const p = s.site_level_privacy;
    parts.push(`site-level ε = ${fmtNum(p.epsilon, 2)} of ${fmtNum(p.budget, 2)} at δ = ${p.delta.toExponential(0)} (${p.mode})`);
  }
  return parts.length ? parts.join("; ") : "no differential privacy in this run";
}

// The metric shown: the user's choice, else accuracy or RMSE, else what the task reports.
function availableMetrics() {
  const last = state.rounds[state.rounds.length - 1];
  const w = last ? last.summary.weighted : state.status && state.status.last_round ? state.status.last_round.weighted : {};
  return Object.keys(w || {}).filter((k) => typeof w[k] === "number");
}

function pickMetric() {
  const keys = availableMetrics();
  if (state.metric && keys.includes(state.metric)) return state.metric;
  return ["accuracy", "rmse", "auc"].find((k) => keys.includes(k)) || keys[0] || "accuracy";
}

function renderMetrics() {
  const select = $("metric-select");
  const keys = availableMetrics();
  const key = pickMetric();
  if (select.dataset.keys !== keys.join(",")) {
    select.replaceChildren(...keys.map((k) => el("option", { value: k }, METRIC_NAMES[k] || k)));
    select.dataset.keys = keys.join(",");
  }
  select.value = key;
  const range = Number($("range-select").value);
  const rounds = range > 0 ? state.rounds.slice(-range) : state.rounds;
  const name = METRIC_NAMES[key] || key;

  const perSite = (pick, evaluateOnly) => {
    const lines = new Map();
    for (const r of rounds) {
      for (const [site, res] of Object.entries(r.per_site || {})) {
        if (Boolean(res.evaluate_only) !== evaluateOnly) continue;
        const v = pick(res);
        if (typeof v !== "number") continue;
        if (!lines.has(site)) lines.set(site, []);
        lines.get(site).push([r.summary.round, v]);
      }
    }
    return [...lines.entries()].sort().map(([site, points], i) => ({
      name: site, points, colour: PALETTE[i % PALETTE.length], cls: "site",
    }));
  };
  const series = (label, cls, colour, pick) => ({
    name: label, cls, colour,
    points: rounds.map((r) => [r.summary.round, pick(r.summary)]).filter(([, v]) => typeof v === "number"),
  });

  lineChart($("metric-chart"), "metric", `${name} per round`, [
    series("pooled (all test sets)", "pooled", "#0b5cad", (s) => s.weighted && s.weighted[key]),
    series("mean of sites", "mean", "#1a1f24", (s) => s.site_mean && s.site_mean[key]),
    ...perSite((res) => res.metrics && res.metrics[key], false),
  ]);
  $("metric-caption").textContent =
    `${name[0].toUpperCase()}${name.slice(1)} of each round's model on the training sites' test sets: pooled over all test examples, the unweighted mean of the sites, and each site. ${rounds.length} of ${state.rounds.length} rounds shown.`;
  lineChart($("loss-chart"), "loss", "Test loss per round", [
    series("loss (weighted)", "pooled", "#0b5cad", (s) => s.loss),
    ...perSite((res) => res.loss, false),
  ]);
  const heldOut = rounds.some((r) => r.summary.held_out);
  $("heldout-figure").hidden = !heldOut;
  if (heldOut) {
    lineChart($("heldout-chart"), "heldout", `${name} on evaluation-only sites`, [
      series(`${name} (pooled)`, "pooled", "#0b5cad", (s) => s.held_out && s.held_out.weighted && s.held_out.weighted[key]),
      ...perSite((res) => res.metrics && res.metrics[key], true),
    ]);
  }
}

// An SVG line chart. Each series is one polyline holding every point (no downsampling: a
// few thousand points draw fast), with a legend and a cursor driven by mouse or arrow keys.
function lineChart(container, id, title, seriesList) {
  const W = 900, H = 260, L = 52, R = 12, T = 12, B = 28;
  const all = seriesList.flatMap((s) => s.points);
  container.replaceChildren();
  if (all.length === 0) {
    container.append(el("p", { class: "muted" }, "No rounds yet."));
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = el("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img", tabindex: 0, "aria-label": `${title}. Use the arrow keys to read each round.`,
    "data-chart": id,
  });
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    svg.append(el("line", { class: "grid", x1: L, x2: W - R, y1: sy(y), y2: sy(y) }));
    svg.append(el("text", { x: L - 4, y: sy(y) + 4, "text-anchor": "end" }, fmtNum(y, Math.abs(y1 - y0) < 0.1 ? 3 : 2)));
  }
  for (let i = 0; i <= 5; i++) {
    const x = Math.round(x0 + (x1 - x0) * i / 5);
    const anchor = i === 0 ? "start" : i === 5 ? "end" : "middle";
    svg.append(el("text", { x: sx(x), y: H - 8, "text-anchor": anchor }, fmtNum(x)));
  }
  svg.append(el("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  svg.append(el("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  // Sites first, so the federation's lines are drawn on top of them.
  const ordered = [...seriesList.filter((s) => s.cls === "site"), ...seriesList.filter((s) => s.cls !== "site")];
  for (const s of ordered) {
    if (s.points.length === 0) continue;
    svg.append(el("polyline", {
      class: `series ${s.cls}`, stroke: s.cls === "site" ? s.colour : null, "data-series": s.name,
      "data-points": s.points.length,
      points: s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "),
    }));
  }
  const cursor = el("line", { class: "cursor", y1: T, y2: H - B, x1: -10, x2: -10 });
  svg.append(cursor);
  const readout = el("p", { class: "readout", "aria-live": "polite" });
  const xs = [...new Set(all.map((p) => p[0]))].sort((a, b) => a - b);
  const show = (x) => {
    state.cursor[id] = x;
    cursor.setAttribute("x1", sx(x));
    cursor.setAttribute("x2", sx(x));
    const parts = seriesList
      .map((s) => [s.name, (s.points.find((p) => p[0] === x) || [])[1]])
      .filter(([, v]) => typeof v === "number")
      .map(([n, v]) => `${n} ${fmtNum(v)}`);
    readout.textContent = `Round ${x}: ${parts.join(" · ")}`;
  };
  const nearest = (x) => xs.reduce((b, v) => Math.abs(v - x) < Math.abs(b - x) ? v : b, xs[0]);
  svg.addEventListener("mousemove", (ev) => {
    const box = svg.getBoundingClientRect();
    const px = (ev.clientX - box.left) / box.width * W;
    show(nearest(x0 + (px - L) / (W - L - R) * (x1 - x0)));
  });
  svg.addEventListener("keydown", (ev) => {
    const at = xs.indexOf(state.cursor[id] ?? xs[xs.length - 1]);
    if (ev.key === "ArrowLeft") show(xs[Math.max(0, at - 1)]);
    else if (ev.key === "ArrowRight") show(xs[Math.min(xs.length - 1, at + 1)]);
    else return;
    ev.preventDefault();
  });
  if (state.cursor[id] !== undefined && xs.includes(state.cursor[id])) show(state.cursor[id]);
  const legend = el("div", { class: "legend" }, ordered.slice().reverse().filter((s) => s.points.length)
    .map((s) => el("span", { style: null, "data-colour": s.colour }, s.name)));
  // Colours go through the CSSOM, which the style-src policy allows (inline style attributes
  // it does not).
  for (const span of legend.children) span.style.setProperty("--swatch", span.dataset.colour);
  container.append(svg, legend, readout);
}

function latestPerSite(site) {
  for (let i = state.rounds.length - 1; i >= Math.max(0, state.rounds.length - 200); i--) {
    const r = state.rounds[i].per_site && state.rounds[i].per_site[site];
    if (r) return r;
  }
  return null;
}

function renderSites() {
  const now = Date.now() / 1000;
  const rows = state.sites.map((s) => {
    const days = s.certificate_expires_unix ? (s.certificate_expires_unix - now) / 86400 : null;
    const cert = days === null ? "—"
      : days < 0 ? `expired ${fmtTime(s.certificate_expires_unix).slice(0, 10)}`
        : `${fmtTime(s.certificate_expires_unix).slice(0, 10)} (in ${Math.floor(days)} days)`;
    const certCls = days === null ? null : days < 0 ? "bad" : days < 30 ? "warning" : null;
    const res = latestPerSite(s.name);
    const metric = s.last_accuracy !== null ? `accuracy ${fmtNum(s.last_accuracy)}`
      : s.last_rmse !== null ? `RMSE ${fmtNum(s.last_rmse)}` : "—";
    const refused = s.rejections
      ? `${s.rejections}` + (s.last_rejection ? ` (last, round ${s.last_rejection.round}: ${s.last_rejection.reason})` : "")
      : "0";
    const decline = s.last_decline ? `round ${s.last_decline.round}: ${s.last_decline.reason}` : "—";
    return el("tr", { "data-site": s.name },
      el("th", { scope: "row" }, s.name),
      el("td", {}, s.evaluate_only ? "evaluate" : "train"),
      el("td", { class: `dot ${s.connected ? "ok" : "bad"}`, "data-connected": String(s.connected) }, s.connected ? "connected" : "disconnected"),
      el("td", {}, fmtAgo(s.last_seen_unix)),
      el("td", { class: "num" }, fmtNum(s.rounds_joined)),
      el("td", { class: "num" }, fmtNum(s.dropouts)),
      el("td", { class: s.rejections ? "warning" : null }, refused),
      el("td", {}, decline),
      el("td", { class: certCls, "data-days": days === null ? null : Math.floor(days) }, cert),
      el("td", {}, s.agent_version || "—"),
      el("td", { class: "num" }, res ? `${fmtNum(res.examples)} / ${fmtNum(res.test_examples)}` : "—"),
      el("td", {}, metric),
      el("td", { class: "num" }, s.privacy ? `${fmtNum(s.privacy.epsilon, 2)} of ${fmtNum(s.privacy.budget, 2)}` : "—"),
    );
  });
  $("sites-table").tBodies[0].replaceChildren(...rows);
}

function renderRounds() {
  const s = state.status;
  const ro = s.last_rollout;
  $("rollout").textContent = ro
    ? `Last model roll-out: the model of round ${ro.round} (${(ro.model_bytes / 1024).toFixed(1)} KiB) went to ${ro.sites} sites, ${ro.acknowledged} verified it and reported; ${fmtDuration(ro.seconds)} from first byte to last report (queued for every site in ${fmtDuration(ro.sent_seconds)}).`
    : "No model roll-out since this coordinator process started.";
  const key = pickMetric();
  const recent = state.rounds.slice(-25).reverse();
  const rows = recent.map((r) => {
    const m = r.summary;
    const attempts = (m.attempt_log || []).map((a) => {
      const total = Math.max(1e-9, a.stages.reduce((t, st) => t + st.seconds, 0));
      const bar = el("span", { class: "bar", "aria-hidden": "true" }, a.stages.map((st) => {
        const seg = el("span", { title: `${st.stage} ${fmtDuration(st.seconds)}` });
        seg.style.width = `${(100 * st.seconds / total).toFixed(1)}%`;
        seg.style.background = STAGE_COLOURS[st.stage] || "#888";
        return seg;
      }));
      const stages = a.stages.map((st) => `${st.stage} ${fmtDuration(st.seconds)}`).join(", ");
      return el("span", { class: "attempt" },
        `#${a.attempt + 1} ${fmtDuration(a.seconds)} `, bar,
        stages ? ` ${stages}` : "",
        a.aborted ? el("span", { class: "bad" }, ` — aborted: ${a.aborted}`) : "");
    });
    return el("tr", { "data-round": m.round },
      el("th", { scope: "row" }, fmtNum(m.round)),
      el("td", { class: m.failed ? "bad" : "ok" }, m.failed ? `given up: ${m.failed}` : "committed",
        m.rejected && m.rejected.length ? el("span", { class: "warning" }, ` · refused: ${m.rejected.join(", ")}`) : ""),
      el("td", {}, attempts.length ? attempts : `${m.attempts}`),
      el("td", { class: "num" }, fmtNum(m.sites)),
      el("td", { class: "num" }, fmtNum(m.dropped)),
      el("td", { class: "num" }, fmtNum(m.seconds, 2)),
      el("td", { class: "num" }, fmtNum(m.weighted ? m.weighted[key] : null)),
      el("td", { class: "num" }, fmtNum(m.site_epsilon ?? m.epsilon ?? null, 2)),
    );
  });
  $("rounds-table").tBodies[0].replaceChildren(...rows);
}

function renderHeatmap() {
  const doc = state.shards;
  const canvas = $("heatmap");
  const which = $("heat-select").value;
  const rows = doc.shards.length, cols = doc.samples.length;
  canvas.dataset.rows = rows;
  canvas.dataset.columns = cols;
  const LW = 84, CW = 3, RH = 10, TH = 14;
  canvas.width = LW + Math.max(cols, 100) * CW + 4;
  canvas.height = TH + rows * RH + 4;
  const g = canvas.getContext("2d");
  g.fillStyle = "#ffffff";
  g.fillRect(0, 0, canvas.width, canvas.height);
  g.font = "9px system-ui, sans-serif";
  g.fillStyle = "#4a5560";
  g.fillText(cols ? `${fmtTime(doc.samples[0].unix).slice(11, 19)} → ${fmtTime(doc.samples[cols - 1].unix).slice(11, 19)}` : "", LW, 10);
  let max = 0;
  const totals = new Array(rows).fill(0);
  for (const s of doc.samples) {
    s[which].forEach((v, i) => { max = Math.max(max, v); totals[i] += v; });
  }
  doc.shards.forEach((name, r) => {
    g.fillStyle = "#4a5560";
    g.fillText(name, 2, TH + r * RH + 8);
    doc.samples.forEach((s, c) => {
      const v = s[which][r];
      const t = max > 0 ? Math.log1p(v) / Math.log1p(max) : 0;
      const shade = Math.round(245 - t * 200);
      g.fillStyle = v > 0 ? `rgb(${shade - 40},${shade - 10},${Math.min(255, shade + 10)})` : "#f1f3f5";
      g.fillRect(LW + c * CW, TH + r * RH, CW, RH - 1);
    });
  });
  if (cols === 0) {
    $("heat-summary").textContent = `No samples yet: the first arrives ${doc.interval_seconds} s after the coordinator starts.`;
    return;
  }
  const busiest = totals.map((v, i) => [v, i]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  const unit = which === "acquisitions" ? (v) => `${fmtNum(v)} acquisitions` : (v) => `${fmtDuration(v)} waited`;
  $("heat-summary").textContent =
    `${rows} shards × ${cols} samples of ${doc.interval_seconds} s; the darkest cell is ${unit(max)} in one interval, light grey none. ` +
    `Busiest over this window: ` + busiest.map(([v, i]) => `${doc.shards[i]} (${unit(v)})`).join(", ") + ".";
}

// ---- start -------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    logIn($("token").value.trim(), false);
  });
  $("logout").addEventListener("click", () => showLogin("Logged out."));
  $("metric-select").addEventListener("change", (ev) => { state.metric = ev.target.value; if (state.status) render(); });
  $("range-select").addEventListener("change", () => { if (state.status) render(); });
  $("heat-select").addEventListener("change", () => { if (state.shards) renderHeatmap(); });
  const saved = sessionStorage.getItem(TOKEN_KEY);
  const started = Number(sessionStorage.getItem(STARTED_KEY));
  if (started > 0) state.startedUnix = started;
  if (saved) logIn(saved, true);
  else $("token").focus();
});
