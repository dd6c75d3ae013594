// rlm-pipelines run viewer: a static page over the data the pipeline writes beside it (data.js sets
// window.RLM_DATA). No build step, no CDN: it opens from disk. Every value in the data is hostile: it reaches
// the page through esc() (text and quoted attributes) or textContent, and class names through a whitelist.
"use strict";

const KNOWN_SCHEMA = "rlm-pipelines/run@1";
const DEPTH_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"];
const STATUSES = ["ok", "partial", "error", "running", "timeout", "budget_exceeded", "cancelled", "terminated",
  "crashed"];

const data = window.RLM_DATA || null;
const $ = (id) => document.getElementById(id);
const nodes = Object.create(null);  // by id; no prototype, so an id such as "__proto__" is just a key

function esc(text) {
  return String(text ?? "").replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

const list = (x) => (Array.isArray(x) ? x : []);
const statusClass = (status) => (STATUSES.includes(status) ? status : "unknown");
const colour = (depth) => DEPTH_COLOURS[Math.abs(Math.trunc(Number(depth) || 0)) % DEPTH_COLOURS.length];

function highlightPython(code) {
  // one pass over the raw code: comments, strings, keywords and numbers become spans, the rest is escaped
  const token = /(#[^\n]*)|("""[\s\S]*?"""|'\'\'[\s\S]*?'\'\'|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')|\b(def|class|return|if|elif|else|for|while|in|import|from|as|with|try|except|finally|raise|lambda|not|and|or|is|None|True|False|print|yield|pass|break|continue)\b|\b(\d+(?:\.\d+)?)\b/g;
  let out = "", last = 0, m;
  while ((m = token.exec(code)) !== null) {
    const cls = m[1] ? "com" : m[2] ? "str" : m[3] ? "kw" : "num";
    out += esc(code.slice(last, m.index)) + `<span class="${cls}">${esc(m[0])}</span>`;
    last = token.lastIndex;
  }
  return out + esc(code.slice(last));
}

function block(label, text, cls = "", open = false, html = null) {
  if (text === null || text === undefined || text === "") return "";
  const big = String(text).length > 2000;
  const body = `<pre class="${cls}">${html ?? esc(text)}</pre>`;
  return `<details class="text" ${open && !big ? "open" : ""}><summary>${esc(label)} (${String(text).length} chars)</summary>${body}</details>`;
}

// a model call answered from the cache (free) or from a recorded run (replay), not by the live model
function origin(item) { return item.origin ? ` · <span class="origin">${esc(item.origin)}</span>` : ""; }

function money(x) { return "$" + Number(x || 0).toFixed(4); }

function stats(run) {
  const agents = Object.values(nodes).filter((n) => n.kind === "agent");
  const iterations = agents.reduce((s, n) => s + list(n.iterations).length, 0);
  const maxDepth = agents.reduce((m, n) => Math.max(m, Number(n.depth) || 0), 0);
  const u = run.usage || {};
  const items = [["status", run.status], ["agents", agents.length], ["max depth", maxDepth], ["iterations", iterations],
    ["llm calls", u.llm_calls], ["tokens", (u.tokens || 0).toLocaleString()], ["dollars", money(u.cost_usd)],
    ["wall time", `${Number(run.duration_s || 0).toFixed(1)} s`], ["task", run.task], ["model", run.model]];
  const answered = Object.values(nodes).flatMap((n) => [n, ...list(n.iterations)]).filter((x) => x && x.origin);
  if (answered.length) items.push(["calls cached or replayed", answered.length]);
  const source = run.replayed_from ? ["replay", run.replayed_from] : run.resumed_from ? ["resumed", run.resumed_from] : null;
  $("stats").innerHTML = items.map(([k, v]) => `<div class="stat"><b>${esc(v)}</b><span>${k}</span></div>`).join("")
    // the recorded run's folder (a long path) in the tooltip, so the header stays one line
    + (source ? `<div class="stat" title="${esc(source[1])}"><b>${source[0]}</b><span>of a recorded run</span></div>` : "");
}

function index(node) {
  if (!node || typeof node !== "object") return;
  nodes[node.id] = node;
  list(node.children).forEach(index);
}

function treeHtml(node) {
  const agents = list(node.children).filter((c) => c && c.kind === "agent");
  const cost = node.usage && node.usage.total ? money(node.usage.total.cost_usd) : "";
  const result = node.result === null || node.result === undefined ? ""
    : (typeof node.result === "string" ? node.result : JSON.stringify(node.result));
  const label = `<div class="node" data-id="${esc(node.id)}" style="--depth:${colour(node.depth)}">
      <b>${esc(node.id)}</b> <span class="badge ${statusClass(node.status)}">${esc(node.status)}</span> ${cost}
      <div class="task">${esc(String(node.task).slice(0, 140))}</div>
      ${result ? `<div class="result">&rarr; ${esc(result.slice(0, 120))}</div>` : ""}</div>`;
  if (!agents.length) return `<li>${label}</li>`;
  return `<li><details open><summary>${label}</summary><ul>${agents.map(treeHtml).join("")}</ul></details></li>`;
}

function showAgent(id) {
  const node = nodes[id];
  if (!node) return;
  document.querySelectorAll(".node").forEach((el) => el.classList.toggle("selected", el.dataset.id === id));
  const its = list(node.iterations).map((it) => {
    it = it || {};
    const kids = list(it.children).filter((c) => nodes[c] && nodes[c].kind === "agent")
      .map((c) => `<span class="child-link" data-id="${esc(c)}">${esc(c)}</span>`).join("");
    const calls = list(it.children).filter((c) => nodes[c] && nodes[c].kind === "llm_call").length;
    const usage = it.usage || {};
    return `<div class="iteration" data-index="${esc(it.index)}">
      <div class="meta">iteration ${esc(Number(it.index) + 1)} · ${Number(it.duration_s || 0).toFixed(2)} s · ${esc(usage.tokens ?? 0)} tokens
        ${calls ? ` · ${calls} llm calls` : ""}${origin(it)}</div>
      ${kids ? `<div class="children">spawned: ${kids}</div>` : ""}
      ${block("prompt", it.prompt)}${block("response", it.response)}${block("reasoning", it.reasoning, "", true)}
      ${block("code", it.code, "code", true, highlightPython(String(it.code ?? "")))}
      ${block("stdout", it.stdout, "", true)}${block("stderr", it.stderr, "err", true)}${block("error", it.error, "err", true)}
    </div>`;
  }).join("");
  $("agent").innerHTML = `<h2>Agent ${esc(node.id)} · depth ${esc(node.depth)} · ${esc(node.status)}</h2>
    ${block("task", node.task, "", true)}${block("result", typeof node.result === "string" ? node.result : JSON.stringify(node.result, null, 1), "", true)}
    ${node.result_truncated ? "<p><i>the parent saw this result cut</i></p>" : ""}
    ${node.refused ? `<p class="refused"><i>${esc(Number(node.refused.count) || 0)} sub-agents refused
      (${esc(Object.entries(node.refused.reasons || {}).map(([k, v]) => `limits.${k}: ${v}`).join(", "))});
      ${esc(Number(node.refused.kept) || 0)} of them shown</i></p>` : ""}
    ${node.error ? block("error", node.error, "err", true) : ""}
    <div id="iterations">${its || "<p>no iterations</p>"}</div>`;
  document.querySelectorAll("#agent .child-link").forEach((el) => el.addEventListener("click", () => showAgent(el.dataset.id)));
  applySearch();
}

function timeline(run) {
  const agents = Object.values(nodes).filter((n) => n.kind === "agent" && n.started_at);
  const t0 = Math.min(...agents.map((n) => Date.parse(n.started_at)));
  const t1 = Math.max(...agents.map((n) => (n.ended_at ? Date.parse(n.ended_at) : Date.now())), t0 + 1);
  $("timeline").innerHTML = agents.map((n) => {
    const a = Date.parse(n.started_at), b = n.ended_at ? Date.parse(n.ended_at) : t1;
    const left = ((a - t0) / (t1 - t0)) * 100, width = Math.max(0.5, ((b - a) / (t1 - t0)) * 100);
    return `<div class="row" title="${esc(n.id)}: ${((b - a) / 1000).toFixed(2)} s"><div class="bar" data-id="${esc(n.id)}"
      style="left:${left}%;width:${width}%;background:${colour(n.depth)}"></div></div>`;
  }).join("") + `<div class="meta">${((t1 - t0) / 1000).toFixed(1)} s from the first agent's start to the last one's end</div>`;
  document.querySelectorAll("#timeline .bar").forEach((el) => el.addEventListener("click", () => showAgent(el.dataset.id)));
}

function llmCalls() {
  const calls = Object.values(nodes).filter((n) => n.kind === "llm_call");
  if (!calls.length) return;
  // each call says the sandbox API it came through (llm_query, dspy.Predict, ...), its figures and status
  $("calls").innerHTML = `<h2>Model calls from the sandbox (${calls.length})</h2>` + calls.map((c) => {
    const u = (c.usage && c.usage.own) || {};
    return `<div class="iteration call"><div class="meta"><b>${esc(c.id)}</b> · <span class="api">${esc(c.api || "llm_query")}</span>
      · ${esc(u.tokens ?? 0)} tokens · ${money(u.cost_usd)} · ${esc(c.status)}${origin(c)}</div>
      ${block(`${c.id} prompt`, c.task)}${block(`${c.id} answer`, c.result)}${block(`${c.id} error`, c.error, "err")}</div>`;
  }).join("");
}

function patch(text) {
  if (!text || typeof text !== "string") return;
  const lines = text.split("\n").map((l) => {
    const cls = l.startsWith("+++") || l.startsWith("---") || l.startsWith("diff ") ? "file"
      : l.startsWith("@@") ? "hunk" : l.startsWith("+") ? "add" : l.startsWith("-") ? "del" : "";
    return cls ? `<span class="${cls}">${esc(l)}</span>` : esc(l) + "\n";
  }).join("");
  $("patch").innerHTML = `<h2>Patch</h2><pre class="diff">${lines}</pre>`;
}

function plot(name) {
  const title = document.createElement("h2"), img = document.createElement("img");
  title.textContent = name;
  img.className = "plot";
  img.alt = name;
  img.src = "../" + name.split("/").map(encodeURIComponent).join("/");
  $("plots").append(title, img);
}

function applySearch() {
  const term = $("search").value.trim().toLowerCase();
  document.querySelectorAll("mark").forEach((m) => m.replaceWith(...m.childNodes));
  if (term.length < 2) return;
  document.querySelectorAll("details.text pre").forEach((pre) => {
    if (!pre.textContent.toLowerCase().includes(term)) return;
    pre.closest("details").open = true;
    const walker = document.createTreeWalker(pre, NodeFilter.SHOW_TEXT);
    const hits = [];
    while (walker.nextNode()) if (walker.currentNode.nodeValue.toLowerCase().includes(term)) hits.push(walker.currentNode);
    hits.forEach((node) => {
      const at = node.nodeValue.toLowerCase().indexOf(term);
      const mark = document.createElement("mark");
      const rest = node.splitText(at);
      rest.splitText(term.length);
      mark.appendChild(rest.cloneNode(true));
      rest.replaceWith(mark);
    });
  });
}

function main() {
  if (!data || !data.run) {
    $("banner").hidden = false;
    $("banner").textContent = "No run data found: data.js is missing beside this page.";
    return;
  }
  const run = data.run;
  if (run.schema !== KNOWN_SCHEMA) {
    $("banner").hidden = false;
    $("banner").textContent = `This run says schema "${run.schema}"; this viewer knows "${KNOWN_SCHEMA}". What it shows may be incomplete.`;
  }
  if (run.partial && typeof run.partial === "object") {  // why the answer may be incomplete
    $("partial").hidden = false;
    $("partial").textContent = `Partial run: ${run.partial.note || "some sub-agents were refused or cut"}.`;
  }
  document.title = `${run.task} · ${run.model} · ${run.status}`;
  $("title").textContent = `${run.task} · ${run.model} · run ${run.id}`;
  if (run.root) index(run.root);
  stats(run);
  $("tree").innerHTML = run.root ? `<ul>${treeHtml(run.root)}</ul>` : "<p>no agents</p>";
  document.querySelectorAll("#tree .node").forEach((el) => el.addEventListener("click", (e) => { e.preventDefault(); showAgent(el.dataset.id); }));
  timeline(run);
  llmCalls();
  patch(data.patch);
  list(data.plots).forEach((p) => plot(String(p)));
  $("search").addEventListener("input", applySearch);
  if (run.root) showAgent(run.root.id);
}

main();
