// SMTP Harness live page. Everything is built with DOM nodes and textContent:
// no captured text is ever parsed as HTML here. Captured HTML is shown only in
// a sandboxed frame loaded from /api/v1/messages/N/html (served with a
// sandboxing Content-Security-Policy).
"use strict";

const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
const headers = token ? { Authorization: `Bearer ${token}` } : {};
// Frames, links and EventSource cannot send headers: those URLs carry the token.
const withToken = (url) => (token ? `${url}?token=${encodeURIComponent(token)}` : url);
const state = { listener: 0, sessions: new Map(), selected: null, library: [] };
// Live events that arrive while the history is loading wait here, so nothing
// between the history snapshot and the live stream is lost (duplicates are
// dropped by addLine).
let pending = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: { ...headers, ...(options.headers || {}) } });
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error(body.title || r.statusText);
  return body;
}

function showError(e) {
  const status = document.getElementById("status");
  status.textContent = `error: ${e.message}`;
  status.className = "bad";
}

// One refresh at a time: calls made while one runs share a single re-run
// (a busy server sends many events; the page must not flood the API).
function coalesce(fn) {
  let running = null, again = false;
  return () => {
    if (running) { again = true; return running; }
    running = (async () => {
      try {
        do { again = false; await fn(); } while (again);
      } catch (e) {
        showError(e);
      } finally {
        running = null;
      }
    })();
    return running;
  };
}

function codeClass(text) {
  const c = text.charAt(0);
  return "0123456789".includes(c) ? `c${c}` : "cC";
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function duration(s) {
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  const rest = Math.round(s - m * 60);
  if (m < 60) return rest ? `${m} min ${rest} s` : `${m} min`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

// The verdict of an SMTP reply in a phase that decides delivery.
const VERDICT_PHASES = new Set(["rcpt", "data", "message", "bdat"]);
const VERDICT = { 2: ["delivered", "ok"], 4: ["deferred", "warn"], 5: ["rejected", "bad"] };

// ---------------------------------------------------------------- the feed

function sessionNode(id) {
  let s = state.sessions.get(id);
  if (!s) {
    const label = el("span", { class: "label", text: `session ${id}` });
    const badge = el("span", { class: "badge" });
    const title = el("h3", {}, label, badge);
    const lines = el("div", { class: "lines" });
    const node = el("li", { class: "session", "data-session": String(id) }, title, lines);
    s = { node, label, badge, lines, seen: new Set(), verdict: 0, ehlo: null };
    state.sessions.set(id, s);
    // newest session on top: before the first session with a smaller id
    const after = [...state.sessions.keys()].filter((k) => k < id).sort((a, b) => b - a)[0];
    const feed = document.getElementById("feed");
    if (after === undefined) feed.append(node);
    else feed.insertBefore(node, state.sessions.get(after).node);
    while (state.sessions.size > 60) {
      const oldest = Math.min(...state.sessions.keys());
      state.sessions.get(oldest).node.remove();
      state.sessions.delete(oldest);
    }
  }
  return s;
}

function setVerdict(s, e) {
  if (e.direction !== "S" || !VERDICT_PHASES.has(e.phase)) return;
  const cls = Number(e.text.charAt(0));
  if (!VERDICT[cls]) return;
  if (cls === 2 && e.phase !== "message" && e.phase !== "bdat") return;  // not delivered yet
  if (cls < s.verdict) return;  // a rejection outranks a later success
  s.verdict = cls;
  const [word, tone] = VERDICT[cls];
  s.badge.textContent = word;
  s.badge.className = `badge ${tone}`;
  s.node.dataset.verdict = word;
}

function addLine(e) {
  const s = sessionNode(e.session);
  const key = `${e.t}|${e.direction}|${e.text}`;
  if (s.seen.has(key)) return;  // already shown (history and live overlap)
  s.seen.add(key);
  if (e.direction === "I" && e.text.startsWith("connection from")) {
    // "connection from 127.0.0.1:4711 (scenario greylisting)" -> one short line
    const m = /^connection from (\S+)(?: \(scenario (.+)\))?$/.exec(e.text);
    const rest = m ? [`from ${m[1]}`, ...(m[2] ? [m[2]] : [])] : [e.text];
    s.label.textContent = [`session ${e.session}`, clock(e.t), ...rest].join(" · ");
    s.label.title = e.text;
    return;
  }
  const who = { C: "C:", S: "S:", I: "" }[e.direction] || "";
  const cls = e.direction === "S" ? codeClass(e.text) : e.direction === "I" ? "cI" : "cC";
  const line = el("div", { class: `line ${cls}`, "data-direction": e.direction },
    el("span", { class: "who", text: who }), el("span", { class: "text", text: e.text }));
  if (e.rule && e.direction !== "C") line.append(el("span", { class: "rule", text: `rule: ${e.rule}` }));
  setVerdict(s, e);
  // The EHLO reply's extension lines fold into one summary line that opens
  // to the lines as sent: the feed stays readable on a projector.
  if (s.ehlo && e.direction === "S" && e.phase === "helo" && /^250[ -]/.test(e.text)) {
    s.ehlo.names.push(e.text.slice(4));
    s.ehlo.text.textContent = `extensions: ${s.ehlo.names.join(" · ")}`;
    s.ehlo.box.append(line);
    if (e.text.charAt(3) === " ") s.ehlo = null;
    return;
  }
  if (e.direction !== "S" || e.phase !== "helo") s.ehlo = null;
  s.lines.append(line);
  if (e.direction === "S" && e.phase === "helo" && e.text.startsWith("250-")) {
    const text = el("span", { class: "text" });
    const box = el("details", { class: "ehlo" },
      el("summary", { class: "line c2" }, el("span", { class: "who", text: "S:" }), text));
    s.lines.append(box);
    s.ehlo = { names: [], text, box };
  }
  if (e.direction === "I" && e.text.startsWith("session ended")) s.node.classList.add("ended");
}

function onLine(e) {
  if (pending) pending.push(e);
  else addLine(e);
}

async function loadRecent() {
  const sessions = await api("/api/v1/sessions?limit=20");
  for (const s of sessions.reverse()) {  // oldest first
    const full = await api(`/api/v1/sessions/${s.id}`);
    for (const e of full.events) addLine({ ...e, session: s.id });
    if (full.ended_at) sessionNode(s.id).node.classList.add("ended");
  }
}

// -------------------------------------------------------------- messages

async function loadMessages() {
  const list = document.getElementById("messages");
  const msgs = await api("/api/v1/messages?limit=50");
  if (!msgs.length) {
    list.replaceChildren(el("li", { class: "empty muted", text: "No messages yet." }));
    return;
  }
  list.replaceChildren(...msgs.slice().reverse().map((m) => {  // newest first, like the feed
    const li = el("li", { "data-message": String(m.id), tabindex: "0" },
      el("strong", { text: `#${m.id} ` }),
      el("span", { class: "subject", text: m.subject ?? "(no subject)" }),
      el("div", { class: "muted", text: `${m.mail_from || "<>"} → ${m.rcpt_tos.join(", ")} · ${m.size} bytes` }));
    if (state.selected === m.id) li.classList.add("selected");
    li.addEventListener("click", () => showMessage(m.id).catch(showError));
    li.addEventListener("keydown", (ev) => { if (ev.key === "Enter") showMessage(m.id).catch(showError); });
    return li;
  }));
}

async function showMessage(id) {
  state.selected = id;
  for (const li of document.querySelectorAll("#messages li")) {
    li.classList.toggle("selected", li.dataset.message === String(id));
  }
  const m = await api(`/api/v1/messages/${id}`);
  const box = document.getElementById("message");
  const rows = m.headers.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: v })));
  const parts = [
    el("h2", { text: `Message ${m.id}` }),
    el("p", { class: "envelope" }, el("span", { class: "muted", text: "Envelope " }),
      `${m.mail_from || "<>"} → ${m.rcpt_tos.join(", ")}`),
    el("table", { class: "headers" }, ...rows),
  ];
  if (m.analysis && m.analysis.pending) {
    parts.push(el("p", { class: "muted analysis-pending",
      text: "Analysis pending: the NDR parse and the SPF, DKIM and DMARC checks have not run yet." }));
  } else if (m.analysis && m.analysis.partial) {
    parts.push(el("p", { class: "muted", text: `Analysis ${m.analysis.partial}.` }));
  }
  if (m.analysis && m.analysis.ndr) parts.push(ndrNode(m.analysis));
  if (m.text !== null) parts.push(el("h2", { text: "Text" }), el("pre", { text: m.text }));
  if (m.has_html) {
    // sandbox="" : no scripts, no same-origin, no forms, no navigation
    parts.push(el("h2", { text: "HTML (sandboxed)" }),
      el("iframe", { sandbox: "", src: withToken(`/api/v1/messages/${id}/html`), title: "message HTML",
        referrerpolicy: "no-referrer" }));
  }
  parts.push(el("p", {}, el("a", { href: withToken(`/api/v1/messages/${id}/raw`), target: "_blank",
    rel: "noopener", text: "Raw source" })));
  box.replaceChildren(...parts);
}

// ------------------------------------------------------------ timelines

const SVG = "http://www.w3.org/2000/svg";
const TONE = { accepted: "#4cc38a", deferred: "#f2c94c", rejected: "#ff7b72" };

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function timelineNode(pair) {
  // about 1:1 with the pane at 1600 px wide, so the labels stay large
  const w = 700, h = 100, pad = 56, y = 42;
  const t0 = Math.min(...pair.attempts.map((a) => a.t));
  const span = Math.max(1, Math.max(...pair.attempts.map((a) => a.t)) - t0);
  const svg = svgEl("svg", { viewBox: `0 0 ${w} ${h}`, role: "img",
    "aria-label": `${pair.attempts.length} attempts` });
  svg.append(svgEl("line", { x1: pad, x2: w - pad, y1: y, y2: y, stroke: "#5a6676", "stroke-width": 3 }));
  for (const a of pair.attempts) {
    const x = pad + ((a.t - t0) / span) * (w - 2 * pad);
    const dot = svgEl("circle", { cx: x, cy: y, r: 14, fill: TONE[a.outcome] || "#c4a7ff",
      "data-outcome": a.outcome });
    dot.append(svgEl("title", {}, `${clock(a.t)} ${a.reply || a.outcome}`));
    svg.append(dot,
      svgEl("text", { x, y: y - 22, fill: "#e8ecf1", "font-size": 19, "text-anchor": "middle",
        "font-weight": 700 }, String(a.code ?? a.outcome)),
      svgEl("text", { x, y: y + 42, fill: "#a9b4c2", "font-size": 17, "text-anchor": "middle" },
        a.t === t0 ? "0 s" : `+${duration(a.t - t0)}`));
  }
  const rows = pair.attempts.map((a, i) => el("tr", { class: `outcome-${a.outcome}` },
    el("td", { text: `#${i + 1}` }),
    el("td", { text: clock(a.t) }),
    el("td", { class: "muted", text: a.interval == null ? "" : `+${duration(a.interval)}` }),
    el("td", {}, el("span", { class: `reply ${codeClass(a.reply || String(a.code ?? ""))}`,
      text: a.reply || a.outcome }),
    ...(a.rule ? [el("span", { class: "rule", text: `rule: ${a.rule}` })] : []))));
  const last = pair.attempts[pair.attempts.length - 1];
  const n = pair.attempts.length;
  const after = n > 1 ? ` after ${duration(last.t - t0)}` : "";
  return el("div", { class: "timeline" },
    el("h3", { text: `${pair.mail_from || "<>"} → ${pair.rcpt}` }),
    el("p", { class: "summary" }, el("span", { class: "muted", text: `${n} attempt${n === 1 ? "" : "s"} · ` }),
      el("span", { class: `outcome ${last.outcome}`, text: `${last.outcome}${after}` })),
    svg, el("table", { class: "attempts" }, ...rows));
}

async function loadTimelines() {
  const pairs = await api("/api/v1/timelines");
  document.getElementById("timelines").replaceChildren(
    ...(pairs.length ? pairs.map(timelineNode) : [el("p", { class: "muted", text: "No attempts yet." })]));
}

// ------------------------------------------------------------------ NDRs

function ndrNode(a) {
  const box = el("div", { class: "ndr" },
    el("div", { class: "muted", text: `${a.ndr.is_delay ? "Delay notice" : "Non-delivery report"} · ${a.ndr.format || ""} · from ${a.ndr.reporting_mta || "?"}` }));
  (a.ndr.recipients || []).forEach((r, i) => {
    const ex = (a.explained || [])[i] || {};
    box.append(el("div", { class: "code" },
      el("span", { class: codeClass(r.status || ""), text: r.status || "no status" }),
      el("span", { class: "rcpt", text: ` ${r.final_recipient || ""}` })));
    if (r.diagnostic_text) box.append(el("div", { class: "line", text: r.diagnostic_text }));
    if (ex.status && ex.status.title) box.append(el("p", { class: "title", text: ex.status.title }));
    if (ex.status && ex.status.meaning) box.append(el("p", { text: ex.status.meaning }));
    const checks = ex.status && (ex.status.checks || ex.status.what_to_check);
    if (Array.isArray(checks) && checks.length) {
      box.append(el("h4", { text: "What to check" }), el("ul", {}, ...checks.map((c) => el("li", { text: c }))));
    }
  });
  return box;
}

async function loadNdrs() {
  const list = await api("/api/v1/ndrs");
  document.getElementById("ndrs").replaceChildren(
    ...(list.length ? list.map((x) => ndrNode(x)) : [el("p", { class: "muted", text: "No NDRs captured." })]));
}

// ------------------------------------------------------- sender's logs

// The files never leave the page as files: their text goes to
// POST /api/v1/evidence, and the lined-up timelines come back as JSON.
function evidenceNode(result) {
  const parts = [];
  for (const f of result.files) {
    parts.push(el("p", { class: "muted", text: `${f.path}: ${f.title}, ${f.records} record(s)` }));
    for (const p of f.problems) parts.push(el("p", { class: "warn", text: p }));
  }
  for (const s of result.skews) parts.push(el("p", { class: "skew", text: s.text }));
  for (const m of result.messages) {
    const rows = m.steps.map((st) => el("tr", { class: st.flags.length ? "flagged" : "" },
      el("td", { class: "muted", text: clock(st.t) }),
      el("td", {}, ...st.sender.map((x) => el("div", {},
        el("span", { class: "muted", text: `${x.where} ` }),
        el("span", { class: `reply ${codeClass(x.reply || "")}`, text: x.text })))),
      el("td", {}, el("span", { class: st.harness ? `reply ${codeClass(st.harness.reply || "")}` : "muted",
        text: st.harness ? st.harness.text : (st.note || "-") })),
      el("td", { class: st.flags.length ? "bad" : "ok", text: st.flags.join(", ") || (st.harness && st.sender.length ? "ok" : "") })));
    const box = el("div", { class: "evidence-message" },
      el("h3", { text: `Message ${m.message_id || m.key}` }),
      el("table", { class: "evidence" },
        el("tr", {}, el("th", { text: "time" }), el("th", { text: "sender logged" }),
          el("th", { text: "harness did" }), el("th", { text: "" })), ...rows));
    if (m.disagreements.length) {
      box.append(el("ul", { class: "disagreements" },
        ...m.disagreements.map((d) => el("li", { class: "bad", text: `${d.kind}: ${d.message}` }))));
    } else {
      box.append(el("p", { class: "ok", text: "the sender's log and the harness agree" }));
    }
    parts.push(box);
  }
  const n = result.disagreements;
  parts.push(el("p", { class: n ? "bad" : "ok", id: "evidence-summary",
    text: `${result.messages.length} message(s), ${n ? `${n} disagreement(s)` : "no disagreement"}` }));
  return parts;
}

document.getElementById("evidence-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const box = document.getElementById("evidence");
  const chosen = [...document.getElementById("evidence-files").files];
  if (!chosen.length) {
    box.replaceChildren(el("p", { class: "muted", text: "Choose the sending MTA's log files first." }));
    return;
  }
  box.replaceChildren(el("p", { class: "muted", text: "lining up…" }));
  try {
    const files = await Promise.all(chosen.map(async (f) => ({ name: f.name, text: await f.text() })));
    const result = await api("/api/v1/evidence", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ files }) });
    box.replaceChildren(...evidenceNode(result));
  } catch (e) {
    box.replaceChildren(el("p", { class: "bad", text: `could not line up: ${e.message}` }));
  }
});

// ------------------------------------------------------- bounces sent

const OUTCOME_TONE = { sent: "c2", failed: "c5", skipped: "c4", cancelled: "cI" };

function bounceNode(b) {
  const what = `${b.kind}${b.status ? ` ${b.status}` : ""}`;
  const head = el("div", { class: "code" },
    el("span", { class: OUTCOME_TONE[b.outcome] || "", text: b.outcome }),
    el("span", { class: "rcpt", text: ` ${what} about ${b.recipients.join(", ")}` }));
  const box = el("div", { class: "ndr bounce", "data-outcome": b.outcome }, head,
    el("div", { class: "muted", text: `session ${b.session_id} · rule ${b.rule || "?"} · to <${b.mail_to || ""}> via ${b.via || "(no next hop)"} · ${clock(b.done_at || b.scheduled_at)}` }));
  if (b.subject) box.append(el("div", { class: "line", text: `Subject: ${b.subject}` }));
  if (b.reply) box.append(el("div", { class: "line c2", text: b.reply }));
  if (b.error) box.append(el("div", { class: "line", text: b.error }));
  if (b.classified_as) box.append(el("p", { class: "muted", text: `our parser reads it as: ${b.classified_as}` }));
  if (b.outcome !== "skipped" && b.outcome !== "cancelled") {
    box.append(el("p", {}, el("a", { href: withToken(`/api/v1/bounces/${b.id}/raw`), target: "_blank",
      rel: "noopener", text: "Report source" })));
  }
  return box;
}

async function loadBounces() {
  const list = await api("/api/v1/bounces");
  document.getElementById("bounces").replaceChildren(
    ...(list.length ? list.slice().reverse().map(bounceNode)
      : [el("p", { class: "muted", text: "No bounces sent. A rule with bounce: sends one (harness serve --bounce-via HOST:PORT)." })]));
}

// ----------------------------------------------------------------- probe

const STEP_LABEL = { connect: "connect", banner: "banner", ehlo: "EHLO", helo: "HELO", starttls: "STARTTLS",
  tls: "TLS", "ehlo-tls": "EHLO (TLS)", mail: "MAIL", rcpt: "RCPT", data: "DATA", message: "message",
  rset: "RSET", quit: "QUIT" };
const VERDICT_TONE = { deliver: "ok", defer: "warn", bounce: "bad" };

function stepRow(s) {
  const lines = (s.reply || "").split("\n");
  let shown = s.error ? s.error : s.reply === null ? (s.detail || "")
    : s.step === "banner" || s.step.startsWith("ehlo") ? lines[0] : lines[lines.length - 1];
  if (s.step.startsWith("ehlo") && lines.length > 1) {
    shown += `  (${lines.length - 1} extensions: ${lines.slice(1).map((x) => x.slice(4)).join(", ")})`;
  }
  const what = el("td", { class: "exchange" });
  if (s.sent) what.append(el("div", { class: "sent", text: s.sent }));
  what.append(el("div", { class: `reply ${s.error ? "c5" : codeClass(shown)}`, text: shown }));
  const ex = s.explanation;
  if (ex) {
    const meaning = el("div", { class: "meaning", text: `${ex.code} ${ex.title}` });
    if (s.code >= 400 && ex.meaning) meaning.append(el("div", { text: ex.meaning }));
    what.append(meaning);
  }
  return el("tr", { "data-step": s.step }, el("td", { class: "step", text: STEP_LABEL[s.step] || s.step }),
    what, el("td", { class: "ms", text: `${(s.seconds * 1000).toFixed(1)} ms` }));
}

function mxNode(m) {
  const title = m.source === "given" ? `server ${m.name || ""}` : m.label;
  const box = el("div", { class: "mx", "data-verdict": m.verdict },
    el("h3", { text: `${title} · ${m.address || "-"} port ${m.port}` }));
  for (const n of m.notes || []) box.append(el("p", { class: "note", text: n }));
  box.append(el("table", { class: "steps" }, ...m.steps.map(stepRow)));
  const c = m.tls && m.tls.certificate;
  if (m.tls) {
    const lines = [m.tls.error ? `TLS: ${m.tls.error}` : `TLS: ${m.tls.version} ${m.tls.cipher}`];
    if (c) {
      lines.push(`certificate: ${c.subject} issued by ${c.issuer}; names ${c.names.join(", ") || "-"}; ${c.days_left} day(s) left`);
      lines.push(`chain: ${c.chain_ok ? "verified" : c.chain_error}`);
      if (c.name_ok !== null) lines.push(`name ${c.expected_name}: ${c.name_ok ? "matches" : "does not match"}`);
    }
    box.append(el("div", { class: "tls" }, ...lines.map((t) => el("div", { text: t }))));
  }
  box.append(el("p", { class: "verdict" },
    el("span", { class: `badge ${VERDICT_TONE[m.verdict]}`, text: m.verdict_text }), ` ${m.reason}`));
  return box;
}

function probeNode(r) {
  const box = el("div", { class: "probe", "data-verdict": r.verdict },
    el("p", { class: "overall" }, el("span", { class: `badge ${VERDICT_TONE[r.verdict]}`, text: r.verdict_text }),
      ` ${r.reason}`));
  for (const n of r.notes || []) box.append(el("p", { class: "note", text: n }));
  if (r.dns) {
    box.append(el("div", { class: "tls" },
      el("div", { text: `DNS ${r.dns.domain}: SOA ${r.dns.soa || "-"}` }),
      el("div", { text: `MX ${r.dns.mx.map((x) => `${x.preference} ${x.host}`).join(", ") || "none"}` })));
  }
  box.append(...r.mx.map(mxNode));
  return box;
}

document.getElementById("probe-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const result = document.getElementById("probe-result");
  const button = document.getElementById("probe-run");
  const body = {
    sender: document.getElementById("probe-sender").value.trim(),
    recipient: document.getElementById("probe-recipient").value.trim(),
    mx: document.getElementById("probe-mx").value.split(/\s+/).filter(Boolean),
  };
  if (document.getElementById("probe-dns").value) body.dns = document.getElementById("probe-dns").value;
  button.disabled = true;
  result.replaceChildren(el("p", { class: "muted", text: "probing…" }));
  try {
    const r = await api("/api/v1/probe", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    result.replaceChildren(probeNode(r));
  } catch (e) {
    result.replaceChildren(el("p", { class: "c5 probe-error", text: `probe refused: ${e.message}` }));
  } finally {
    button.disabled = false;
  }
});

// ------------------------------------------------------------- scenarios

function showSummary() {
  const name = document.getElementById("scenario-select").value;
  const s = state.library.find((x) => x.name === name);
  const box = document.getElementById("scenario-summary");
  box.textContent = s ? s.summary || "" : "";
  box.title = box.textContent;
}

async function loadScenarios() {
  const [listeners, library] = await Promise.all([api("/api/v1/listeners"), api("/api/v1/scenarios")]);
  const current = listeners[state.listener];
  state.library = library;
  document.getElementById("listener").textContent = `SMTP ${current.address}`;
  document.getElementById("active").textContent = current.scenario.name;
  document.getElementById("active").title = current.scenario.summary || "";
  const select = document.getElementById("scenario-select");
  const names = library.map((s) => s.name);
  if (!names.includes(current.scenario.name)) names.unshift(current.scenario.name);
  select.replaceChildren(...names.map((name) => {
    const o = el("option", { value: name, text: name });
    if (name === current.scenario.name) o.selected = true;
    return o;
  }));
  showSummary();
}

document.getElementById("scenario-select").addEventListener("change", showSummary);

document.getElementById("switcher").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = document.getElementById("scenario-select").value;
  try {
    await api(`/api/v1/listeners/${state.listener}/scenario`, {
      method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }) });
    await loadScenarios();
  } catch (e) {
    document.getElementById("status").textContent = `switch failed: ${e.message}`;
    document.getElementById("status").className = "bad";
  }
});

for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => {
    for (const x of document.querySelectorAll("#tabs button")) x.classList.toggle("active", x === b);
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.id === `tab-${b.dataset.tab}`);
    if (b.dataset.tab === "attempts") refreshTimelines();
    if (b.dataset.tab === "ndrs") refreshNdrs();
    if (b.dataset.tab === "bounces") refreshBounces();
  });
}

// ----------------------------------------------------------------- store

function megabytes(n) {
  return n >= 1e9 ? `${(n / 1e9).toFixed(1)} GB` : `${(n / 1e6).toFixed(1)} MB`;
}

async function loadStore() {
  const s = await api("/api/v1/store");
  const box = document.getElementById("store");
  if (s.writable === false) {
    box.textContent = s.disk_free_bytes == null  // a database server: its disk not known
      ? "store cannot write (server read-only, full or out of reach?): messages get 452 4.3.1"
      : `store cannot write (disk full?): messages get 452 4.3.1 — ${megabytes(s.disk_free_bytes)} free`;
    box.title = s.error || "";
    box.className = "bad";
    return;
  }
  const kept = s.retention && s.retention.summary !== "keeps everything" ? `, ${s.retention.summary}` : "";
  const n = s.counts.messages;
  box.textContent = `store ${megabytes(s.used_bytes)}, ${n.toLocaleString()} message${n === 1 ? "" : "s"}${kept}`;
  box.title = s.disk_free_bytes == null ? `${s.path}: tables ${megabytes(s.used_bytes)}`
    : `${s.path}: file ${megabytes(s.file_bytes)}, log ${megabytes(s.wal_bytes)}, ` +
      `${megabytes(s.disk_free_bytes)} free on its disk`;
  box.className = "muted";
}

// ---------------------------------------------------------------- events

const refreshMessages = coalesce(loadMessages);
const refreshTimelines = coalesce(loadTimelines);
const refreshNdrs = coalesce(loadNdrs);
const refreshBounces = coalesce(loadBounces);
const refreshScenarios = coalesce(loadScenarios);
const refreshStore = coalesce(loadStore);
setInterval(refreshStore, 5000);

function connect() {
  const src = new EventSource(withToken("/api/v1/events"));
  const status = document.getElementById("status");
  const say = (text, cls) => { status.textContent = text; status.className = cls; };
  src.onopen = async () => {
    // (Re)connected: fill in what happened before, then go live. Events that
    // arrive meanwhile wait in `pending` and are replayed in order.
    pending = [];
    say("loading…", "");
    try {
      await loadScenarios();
      await loadRecent();
      await loadMessages();
      await loadStore();
      if (document.getElementById("tab-attempts").classList.contains("active")) await loadTimelines();
      if (document.getElementById("tab-ndrs").classList.contains("active")) await loadNdrs();
    } catch (e) {
      say(`error: ${e.message}`, "bad");
    }
    const queued = pending;
    pending = null;
    for (const e of queued) addLine(e);
    if (!status.classList.contains("bad")) say("live", "ok");
  };
  src.onerror = () => say("reconnecting…", "warn");
  src.addEventListener("line", (m) => {
    const e = JSON.parse(m.data);
    onLine(e);
    // a bounce's fate is told on its session's transcript
    if (e.direction === "I" && e.text.startsWith("bounce ") &&
        document.getElementById("tab-bounces").classList.contains("active")) refreshBounces();
  });
  src.addEventListener("message", () => {
    refreshMessages();
    if (document.getElementById("tab-ndrs").classList.contains("active")) refreshNdrs();
  });
  src.addEventListener("session_end", () => {
    if (document.getElementById("tab-attempts").classList.contains("active")) refreshTimelines();
  });
  src.addEventListener("scenario", () => refreshScenarios());
}

connect();
