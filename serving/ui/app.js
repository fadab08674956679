/* cltvit viewer: explain an image (top classes, the waterfall of terms, the heatmap, the top features) and browse
   the feature atlas. Plain JavaScript, no library, nothing fetched from anywhere but the server that served it.
   Served by the service at /ui/ (data from its API), or inlined into one file by `cltvit-explain --html`
   (data in window.CLTVIT_REPORT). State lives in the URL's hash, so a reload or a shared link restores the view. */
"use strict";

const REPORT = window.CLTVIT_REPORT || null;
const API = REPORT ? "" : location.pathname.replace(/\/ui(\/[^/]*)?$/, "");
const TOKEN_KEY = "cltvit-token";
const $ = (sel) => document.querySelector(sel);

const app = { info: null, atlas: null, result: null, imageEl: null, imageBlob: null, run: 0, examples: [],
              whatIf: null, whatIfKey: null, whatIfRun: 0, linearity: null, linearityKey: null };  // the last /intervene answer and the edits + image it is for

// ------------------------------------------------------------------ small helpers
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k === "style") e.setAttribute("style", v);
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else if (k in e) e[k] = v;
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v) ? "n/a" : (v >= 0 ? "+" : "") + Number(v).toFixed(d));
const pct = (v) => (100 * v).toFixed(v < 0.001 ? 3 : 1) + "%";

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// ------------------------------------------------------------------ state in the URL hash
function readState() { return Object.fromEntries(new URLSearchParams(location.hash.slice(1))); }
function hashOf(state) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(state)) if (v !== undefined && v !== null && v !== "") p.set(k, v);
  return "#" + p.toString();
}
function setState(patch, { push = false } = {}) {
  const next = { ...readState(), ...patch };
  const h = hashOf(next);
  if (h === location.hash) return;
  if (push) location.hash = h;  // a new history entry; hashchange renders it
  else history.replaceState(null, "", h);
}

// ------------------------------------------------------------------ the API (or the report's embedded data)
async function request(path, opts = {}) {
  const headers = new Headers(opts.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", "Bearer " + token);
  const r = await fetch(API + path, { ...opts, headers });
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { const j = await r.json(); message = j.error || JSON.stringify(j); } catch (e) { /* not JSON */ }
    if (r.status === 401) askToken(message);
    throw new ApiError(r.status, message);
  }
  return r;
}
const getJSON = async (path) => (await request(path)).json();

async function getInfo() { return REPORT ? REPORT.info : getJSON("/info"); }
async function getAtlas(query = "") {
  if (REPORT) return REPORT.atlas;
  try { return await getJSON("/atlas" + query); } catch (e) { if (e.status === 404) return null; throw e; }
}
const featureCache = new Map();
async function getFeature(layer, index) {
  const key = layer + ":" + index;
  if (REPORT) {
    if (!REPORT.features || !REPORT.features[key]) throw new ApiError(404, "this report holds the atlas pages of its top features only");
    return REPORT.features[key];
  }
  if (!featureCache.has(key)) featureCache.set(key, getJSON(`/atlas/features/${layer}/${index}`).catch((e) => { featureCache.delete(key); throw e; }));
  return featureCache.get(key);
}
// totalEffect: also the total-effect map (patches + 1 more model rows on the server), asked for only when shown
async function explain(blob, labels, totalEffect) {
  if (REPORT) return REPORT.result;
  const form = new FormData();
  form.append("image", blob, "image");
  if (labels.length) form.append("labels", JSON.stringify(labels));
  form.append("top_k", String(Math.min(5, labels.length || app.info.labels.length)));
  form.append("heads", "true");
  if (totalEffect) form.append("total_effect", "true");
  return (await request("/explain", { method: "POST", body: form })).json();
}

// edits: one edit set (docs/intervene.md); topK: labels per result, enough to hold the waterfall's class after the edits
// checkLinearity: also each top feature ablated alone (the answer's feature_ablations)
async function intervene(blob, labels, edits, topK, checkLinearity = false) {
  const form = new FormData();
  form.append("image", blob, "image");
  form.append("edits", JSON.stringify([edits]));
  if (labels.length) form.append("labels", JSON.stringify(labels));
  form.append("top_k", String(topK));
  if (checkLinearity) form.append("check_linearity", "true");
  return (await request("/intervene", { method: "POST", body: form })).json();
}

// ------------------------------------------------------------------ uploaded images survive a reload (IndexedDB, this browser only)
function idb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open("cltvit-viewer", 1);
    req.onupgradeneeded = () => req.result.createObjectStore("images");
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}
async function storeImage(key, blob) {
  const db = await idb();
  await new Promise((resolve, reject) => {
    const tx = db.transaction("images", "readwrite");
    tx.objectStore("images").put(blob, key);
    tx.oncomplete = resolve; tx.onerror = () => reject(tx.error);
  });
}
async function loadImage(key) {
  const db = await idb();
  return new Promise((resolve, reject) => {
    const req = db.transaction("images").objectStore("images").get(key);
    req.onsuccess = () => resolve(req.result || null);
    req.onerror = () => reject(req.error);
  });
}
async function digest(blob) {
  const buf = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(buf)).slice(0, 16).map((b) => b.toString(16).padStart(2, "0")).join("");
}

// ------------------------------------------------------------------ auth
function askToken(message) {
  $("#auth").hidden = false;
  $("#auth-message").textContent = message || "";
  $("#token").focus();
}
$("#auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
  $("#auth").hidden = true;
  start();
});

// ------------------------------------------------------------------ explain view: input
function parseLabels(text) { return text.split(",").map((s) => s.trim()).filter(Boolean); }

async function useFile(file) {
  if (!file) return;
  showError("");
  const key = await digest(file);
  try { await storeImage(key, file); } catch (e) { /* private mode: the image just won't survive a reload */ }
  app.imageBlob = file; app.imageKey = key;
  setState({ view: "explain", img: key, example: "", cls: "", ablate: "", del: "" }, { push: true });
}

async function exampleBlob(i) { return (await request(`/atlas/examples/${i}.png`)).blob(); }

async function currentImage(state) {
  if (REPORT) return dataURLBlob(REPORT.image);
  if (state.img) {
    if (app.imageBlob && app.imageKey === state.img) return app.imageBlob;
    const blob = await loadImage(state.img).catch(() => null);
    if (!blob) throw new ApiError(0, "the uploaded image of this link is not stored in this browser: upload it again");
    return blob;
  }
  if (state.example !== undefined && state.example !== "") return exampleBlob(Number(state.example));
  return null;
}
async function dataURLBlob(url) { return (await fetch(url)).blob(); }

function blobImage(blob) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image (the server may still read it)"));
    img.src = URL.createObjectURL(blob);
  });
}

// ------------------------------------------------------------------ explain view: render
async function renderExplain(state) {
  $("#labels").value = state.labels || "";
  $("#rerun").disabled = !(state.img || state.example);
  document.querySelectorAll("#examples button").forEach((b) => b.classList.toggle("selected", b.dataset.example === state.example));
  const key = [state.img, state.example, state.labels].join("|");
  const wantTotal = state.kind === "total" && app.info.patches != null;  // a bundle without a patch grid has no total effect
  if (key === app.resultKey && app.result && (!wantTotal || app.result.total_effect || REPORT)) { drawResult(state); whatIf(state); return; }
  let blob;
  try { blob = await currentImage(state); } catch (e) { showError(e.message); return; }
  if (!blob) { $("#result").hidden = true; return; }
  const run = ++app.run;
  $("#status").textContent = "explaining...";
  showError("");
  try {
    const result = await explain(blob, parseLabels(state.labels || ""), wantTotal);
    if (run !== app.run) return;
    app.result = result; app.resultKey = key; app.imageBlob = blob; app.imageKey = state.img;
    app.imageEl = await blobImage(blob).catch(() => null);
    $("#status").textContent = "";
    drawResult(state);
    whatIf(state);
  } catch (e) {
    if (run !== app.run) return;
    $("#status").textContent = "";
    $("#result").hidden = true;
    app.result = null; app.resultKey = null;
    showError(e.message);
  }
}

function drawResult(state) {
  const r = app.result;
  const answer = currentWhatIf(state);
  $("#result").hidden = false;
  const cls = Math.min(Number(state.cls || 0), r.top.length - 1);
  // top classes
  const top = $("#top");
  top.replaceChildren(...r.top.map((t, i) => el("li", { "data-label": t.label, "data-logit": t.logit, class: i === cls ? "selected" : "" },
    el("a", { href: hashOf({ ...readState(), cls: i }), text: t.label }), ` ${pct(t.probability)} (logit ${t.logit.toFixed(3)})`,
    el("div", { class: "bar", style: `width:${Math.max(1, 100 * t.probability)}%` }))));
  top.dataset.predicted = r.predicted;
  $("#residual").textContent = `completeness residual ${r.completeness_residual.toExponential(1)} (logit minus the sum of its terms, max over labels)`;
  drawWaterfall(r, cls, state, answer);
  drawFeatures(r, state);
  drawWhatIf(r, state, answer);
  drawMapControls(r, state, cls);
  drawMap(state);
}

// answer: the /intervene answer for the current edits (null: none); its bars are drawn outlined over the originals
function drawWaterfall(r, cls, state, answer) {
  const ex = r.explanations[cls];
  $("#wf-label").textContent = ex.label;
  // the same label's terms in the rerun model (null: no edits, or the label is not among the answer's top_k)
  const after = answer ? answer.edited[0].result.explanations.find((e) => e.label === ex.label) || null : null;
  const stepsOf = (terms) => { let c = 0; return terms.map((t) => { const s = { term: t.term, value: t.value, start: c }; c += t.value; s.end = c; return s; }); };
  const steps = stepsOf(ex.terms), ghost = after ? stepsOf(after.terms) : [];
  const cum = steps.length ? steps[steps.length - 1].end : 0;
  const ends = [0, ex.logit, ...steps.flatMap((s) => [s.start, s.end]), ...(after ? [after.logit, ...ghost.flatMap((s) => [s.start, s.end])] : [])];
  const lo = Math.min(...ends), hi = Math.max(...ends);
  const span = hi - lo || 1;
  const x = (v) => (100 * (v - lo)) / span;
  const seg = (value, a, b, extra) => el("div", { class: `seg ${value >= 0 ? "pos" : "neg"}${extra || ""}`,
    style: `left:${x(Math.min(a, b))}%;width:${Math.max(0.3, (100 * Math.abs(b - a)) / span)}%` });
  const ablated = new Set(listOf(state.ablate));
  const row = (name, value, a, b, extra, kind, g) => {
    const attrs = { class: `wf-row ${kind}${ablated.has(name) ? " ablated" : ""}`, "data-term": name, "data-value": String(value) };
    if (g) { attrs["data-edited"] = String(g.value); attrs["data-delta"] = String(g.value - value); }
    const editable = kind === "wf-term" && canEdit() && !NOT_EDITABLE.includes(name);
    return el("div", attrs, el("span", { text: name }),
      el("div", { class: "track", style: `--zero:${x(0)}%` }, seg(value, a, b), g ? seg(g.value, g.start, g.end, " ghost") : null),
      el("span", { class: "num", text: fmt(value, 4) }), el("span", { class: "num muted", text: extra }),
      el("span", { class: "num delta", title: "change in the rerun model", text: g ? "Δ " + fmt(g.value - value, 4) : "" }),
      editable ? editButton(ablated.has(name), `the ${name} term`, () => toggleEdit("ablate", name)) : el("span"));
  };
  const rows = steps.map((s, i) => row(s.term, s.value, s.start, s.end, s.end.toFixed(3), "wf-term", after ? ghost[i] : null));
  rows.push(row("logit", ex.logit, 0, ex.logit, `sum ${cum.toFixed(4)}`, "wf-total", after ? { value: after.logit, start: 0, end: after.logit } : null));
  $("#waterfall").replaceChildren(...rows);
  const note = $("#wf-edit-note");
  note.hidden = !canEdit();
  note.textContent = answer && !after ? `${ex.label} is not among the rerun model's top ${answer.edited[0].result.top.length} labels: no bars after the edits.`
    : "With edits, the outlined bars and the Δ column are the same terms in the rerun model.";
}

function sourceBadge(f) {
  const out = [];
  if (f.label_source && f.label_source !== "none") out.push(el("span", { class: "badge", text: f.label_source === "text" ? "text" : "image classes" }));
  if (f.low_confidence && f.label_source !== "none") out.push(el("span", { class: "badge low", title: "low confidence", text: "?" }));
  return out;
}

function drawFeatures(r, state) {
  const ablated = new Set(listOf(state.ablate));
  $("#linearity-box").hidden = !canEdit() || !(r.top_features || []).length;
  const linear = app.linearity && app.linearityKey === app.resultKey ? app.linearity : null;  // "layer:index" -> logit change
  const cards = (r.top_features || []).map((f) => {
    const thumbs = el("div", { class: "thumbs" });
    const ref = `${f.layer}:${f.index}`, on = ablated.has(ref);
    const card = el("div", { class: "card" + (on ? " ablated" : ""), "data-layer": f.layer, "data-index": f.index },
      el("h3", {}, `layer ${f.layer} · #${f.index}`, canEdit() ? editButton(on, `feature ${ref}`, () => toggleEdit("ablate", ref)) : null),
      el("div", {}, el("span", { class: "label", text: f.label || (f.label_source ? "(no label)" : "(no atlas)") }), ...sourceBadge(f)),
      el("div", { class: "muted" }, `activation ${f.activation.toFixed(3)} · contribution ${fmt(f.contribution, 4)}`),
      linear && linear.has(ref) ? el("div", { class: "linearity", "data-change": String(linear.get(ref)) }, `ablated alone: ${fmt(linear.get(ref), 4)}`) : null,
      thumbs,
      el("a", { class: "atlas-page", href: hashOf({ view: "feature", f: `${f.layer}:${f.index}` }), text: "atlas page →" }));
    if (app.atlas) {
      getFeature(f.layer, f.index).then((page) => {
        thumbs.replaceChildren(...page.top_images.slice(0, 6).map((t) => el("img", { src: t.thumbnail, alt: t.class || "", title: `activation ${t.activation.toFixed(3)}` + (t.class ? ` · ${t.class}` : "") })));
      }).catch(() => thumbs.replaceChildren(el("span", { class: "muted", text: "no atlas page" })));
    } else {
      thumbs.replaceChildren(el("span", { class: "muted", text: "this bundle has no feature atlas" }));
    }
    return card;
  });
  $("#features").replaceChildren(...cards);
}

// ------------------------------------------------------------------ what if: edits rerun through POST /intervene
// The edits live in the URL hash: ablate = CLT features ("layer:index") and term names, del = deleted patches
// (row-major on the bundle's patch grid). They make one edit set; the server reruns the model with all of them.
const NOT_EDITABLE = ["error"];  // 0 in the modes with an intervention graph; the server refuses it (serving/intervene.py)
const listOf = (v) => (v || "").split(",").filter(Boolean);
const canEdit = () => !REPORT && !!app.info && !!app.info.intervene;

function editSet(state) {
  const ablate = listOf(state.ablate);
  const features = ablate.filter((a) => a.includes(":")).map((a) => { const [layer, index] = a.split(":").map(Number); return { layer, index }; });
  const terms = ablate.filter((a) => !a.includes(":")).map((term) => ({ term }));
  const patches = listOf(state.del).map(Number);
  const set = {};
  if (features.length) set.features = features;
  if (terms.length) set.terms = terms;
  if (patches.length) set.delete_patches = patches;
  return Object.keys(set).length ? set : null;
}
function whatIfKeyOf(state) {
  const edits = canEdit() ? editSet(state) : null;
  return edits && app.resultKey ? app.resultKey + "|" + JSON.stringify(edits) : null;
}
const currentWhatIf = (state) => (app.whatIf && app.whatIfKey === whatIfKeyOf(state) ? app.whatIf : null);

function toggleEdit(field, item) {
  const list = listOf(readState()[field]);
  const i = list.indexOf(item);
  if (i >= 0) list.splice(i, 1); else list.push(item);
  setState({ [field]: list.join(",") }, { push: true });  // a history entry: the back button undoes an edit
}
function editButton(on, what, onclick) {
  const b = el("button", { type: "button", class: "ablate" + (on ? " on" : ""), text: on ? "restore" : "ablate",
                           title: on ? `bring back ${what}` : `rerun the model without ${what}` });
  b.addEventListener("click", onclick);
  return b;
}

// each top feature ablated alone (POST /intervene with check_linearity), shown on its card
async function checkLinearity() {
  const key = app.resultKey, state = readState();
  $("#check-linearity").disabled = true;
  try {
    const answer = await intervene(app.imageBlob, parseLabels(state.labels || ""), {}, 1, true);
    if (key !== app.resultKey) return;
    app.linearity = new Map(answer.feature_ablations.map((a) => [`${a.layer}:${a.index}`, a.ablated_change]));
    app.linearityKey = key;
    drawFeatures(app.result, readState());
  } catch (e) { showError(e.message); } finally { $("#check-linearity").disabled = false; }
}

// ask the server for the current edits (once per image, labels and edit set); drawResult shows the answer
async function whatIf(state) {
  const key = whatIfKeyOf(state);
  if (!key || key === app.whatIfKey) return;
  const run = ++app.whatIfRun;
  const labels = parseLabels(state.labels || "");
  $("#whatif-status").textContent = "running the model with the edits...";
  try {
    const answer = await intervene(app.imageBlob, labels, editSet(state), Math.min(labels.length || app.info.labels.length, 100));
    if (run !== app.whatIfRun) return;
    app.whatIf = answer; app.whatIfKey = key;
    showError("");
  } catch (e) {
    if (run !== app.whatIfRun) return;
    showError(e.message);
  } finally {
    if (run === app.whatIfRun) $("#whatif-status").textContent = "";
  }
  drawResult(readState());
}

function drawWhatIf(r, state, answer) {
  const box = $("#whatif");
  box.hidden = !canEdit();
  $("#patch-hint").hidden = !canEdit() || !app.info.patches;
  if (!canEdit()) return;
  const edits = editSet(state) || {};
  const cols = app.info.patches ? app.info.patches.grid[1] : 1;
  const chip = (text, field, item) => {
    const b = el("button", { type: "button", class: "chip", title: "remove this edit", text: text + " ×" });
    b.addEventListener("click", () => toggleEdit(field, item));
    return b;
  };
  const chips = [
    ...(edits.features || []).map((f) => chip(`feature ${f.layer}:${f.index}`, "ablate", `${f.layer}:${f.index}`)),
    ...(edits.terms || []).map((t) => chip(t.term, "ablate", t.term)),
    ...(edits.delete_patches || []).map((p) => chip(`patch (${Math.floor(p / cols)}, ${p % cols})`, "del", String(p))),
  ];
  $("#edit-list").replaceChildren(...(chips.length ? chips : [el("span", { class: "muted", text: "No edits: use the ablate buttons or click the image." })]));
  $("#reset-edits").disabled = !chips.length;
  const row = answer ? answer.edited[0] : null;
  box.dataset.edit = row ? JSON.stringify(row.edit) : "";  // the edit set the shown answer is for, as the server validated it
  if (!row) { $("#whatif-note").textContent = ""; $("#top-edited").replaceChildren(); return; }
  const before = new Map(answer.baseline.top.map((t) => [t.label, t.logit]));
  const res = row.result;
  $("#whatif-note").textContent = row.predicted_changed ? `The prediction changes: ${answer.baseline.predicted} → ${res.predicted}.`
    : `The prediction stays ${res.predicted}.`;
  $("#top-edited").replaceChildren(...res.top.slice(0, r.top.length).map((t) => {
    const b = before.get(t.label);
    return el("li", { "data-label": t.label, "data-logit": String(t.logit) },
      `${t.label} ${pct(t.probability)} (logit ${t.logit.toFixed(3)}${b === undefined ? "" : ", Δ " + fmt(t.logit - b)})`,
      el("div", { class: "bar", style: `width:${Math.max(1, 100 * t.probability)}%` }));
  }));
}

// deleted patches (the what-if edits) over the heatmap: grey, outlined, on the bundle's patch grid
function drawDeleted(ctx, canvas, state) {
  const del = canEdit() && app.info.patches ? listOf(state.del).map(Number) : [];
  canvas.dataset.deleted = JSON.stringify(del);
  canvas.classList.toggle("editable", canEdit() && !!app.info.patches);
  if (!del.length) return;
  const [rows, cols] = app.info.patches.grid;
  const cw = canvas.width / cols, ch = canvas.height / rows;
  ctx.save();
  ctx.fillStyle = "rgba(128,128,128,0.85)"; ctx.strokeStyle = "#1d2330"; ctx.lineWidth = 2; ctx.setLineDash([4, 3]);
  for (const p of del) {
    const x = Math.floor((p % cols) * cw), y = Math.floor(Math.floor(p / cols) * ch);
    ctx.fillRect(x, y, Math.ceil(cw), Math.ceil(ch));
    ctx.strokeRect(x + 1, y + 1, Math.ceil(cw) - 2, Math.ceil(ch) - 2);
  }
  ctx.restore();
}

// ------------------------------------------------------------------ heatmap
function mapClass(r, cls) {
  const sp = r.spatial;
  if (!sp) return null;
  return sp.classes.find((c) => c.label === r.top[cls].label) || null;
}

function totalEffectClass(r, cls) {
  const te = r.total_effect;
  if (!te) return null;
  return te.classes.find((c) => c.label === r.top[cls].label) || null;
}

function drawMapControls(r, state, cls) {
  const sp = r.spatial;
  const total = state.kind === "total";
  $("#map-kind").value = total ? "total" : "direct";
  const classSel = $("#map-class");
  classSel.replaceChildren(...r.top.map((t, i) => el("option", { value: String(i), text: t.label, selected: i === cls })));
  const layerSel = $("#map-layer");
  const layers = sp ? sp.layers : [];
  layerSel.replaceChildren(el("option", { value: "sum", text: "all layers (sum)" }),
    ...layers.map((name, l) => el("option", { value: String(l), text: `layer ${l}` })));
  layerSel.value = state.map && state.map !== "sum" && Number(state.map) < layers.length ? state.map : "sum";
  const c = mapClass(r, cls);
  // per-head maps come for the predicted class with heads=true; other classes send an empty list
  const heads = c && c.heads && c.heads.length && layerSel.value !== "sum" ? c.heads[Number(layerSel.value)].length : 0;
  const headSel = $("#map-head");
  headSel.replaceChildren(el("option", { value: "all", text: "all heads" }),
    ...Array.from({ length: heads }, (_, h) => el("option", { value: String(h), text: `head ${h}` })));
  headSel.value = heads && state.head && state.head !== "all" && Number(state.head) < heads ? state.head : "all";
  headSel.disabled = heads === 0 || total;
  layerSel.disabled = !c || total;  // the total-effect map is one map per class: no layers, no heads
}

function currentGrid(r, state) {
  const cls = Math.min(Number(state.cls || 0), r.top.length - 1);
  if (state.kind === "total") {
    const te = r.total_effect;
    if (!te) return { grid: null, note: app.info.patches == null ? "this bundle states no patch grid: no total-effect map"
      : REPORT ? "this report has no total-effect map (cltvit-explain --total-effect --html)" : "no total-effect map in this answer" };
    const t = totalEffectClass(r, cls);
    if (!t) return { grid: null, note: `no total-effect map for this class (measured for the top ${te.classes.length} classes)` };
    return { grid: toRows(t.total, te.grid), kind: "total",
             note: `${t.label}: total effect, each patch alone on the fill (${te.rows} edited copies of the image, one batch); ` +
                   `logit ${fmt(t.logit)} on the image, ${fmt(t.fill_logit)} on the all-fill image` };
  }
  const c = mapClass(r, cls);
  if (!c) return { grid: null, note: r.spatial ? "no map for this class (the bundle maps its top " + r.spatial.classes.length + " classes)" : "this bundle has no spatial maps" };
  const layer = $("#map-layer").value, head = $("#map-head").value;
  const shape = (cells) => toRows(cells, r.spatial.grid);
  if (layer === "sum") return { grid: shape(c.total), note: `${c.label}: all attention layers, patch cells summed (attention total ${fmt(c.attention)})` };
  const l = Number(layer);
  const clsCell = c.cls_cell;
  const headCell = c.heads_cls_cell && c.heads_cls_cell.length ? c.heads_cls_cell : null;
  if (head !== "all") {
    return { grid: shape(c.heads[l][Number(head)]), note: `${c.label}: layer ${l}, head ${head}` + (headCell ? ` (CLS->CLS cell ${fmt(headCell[l][Number(head)])})` : "") };
  }
  return { grid: shape(c.layers[l]), note: `${c.label}: layer ${l} (CLS->CLS cell ${fmt(clsCell[l])}, biases ${fmt(c.value_bias[l] + c.output_bias[l])})` };
}

// a map as [rows][columns]: the API sends flat row-major cells (grid = [rows, columns])
function toRows(cells, grid) {
  if (Array.isArray(cells[0])) return cells;
  const [rows, cols] = grid;
  return Array.from({ length: rows }, (_, i) => cells.slice(i * cols, (i + 1) * cols));
}

function drawMap(state) {
  const r = app.result;
  const canvas = $("#heatmap");
  const ctx = canvas.getContext("2d");
  const [H, W] = app.info.image_size;
  canvas.width = 320; canvas.height = Math.round((320 * H) / W);
  ctx.imageSmoothingEnabled = false;
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  const img = app.imageEl;
  if (img) {  // the region the model saw: the shorter side resized, the centre cropped to the model's aspect
    const s = Math.max(H / img.naturalHeight, W / img.naturalWidth);
    const sw = W / s, sh = H / s;
    ctx.drawImage(img, (img.naturalWidth - sw) / 2, (img.naturalHeight - sh) / 2, sw, sh, 0, 0, canvas.width, canvas.height);
  }
  const { grid, note, kind } = currentGrid(r, state);
  $("#map-note").textContent = note;
  canvas.dataset.kind = kind || "direct";
  if (!grid) { $("#map-scale-text").textContent = ""; canvas.dataset.max = "0"; canvas.dataset.cells = ""; drawDeleted(ctx, canvas, state); return; }
  const rows = grid.length, cols = grid[0].length;
  const max = Math.max(1e-12, ...grid.flat().map(Math.abs));
  const cw = canvas.width / cols, ch = canvas.height / rows;
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) {
      const v = grid[i][j] / max;
      ctx.fillStyle = v >= 0 ? `rgba(200,49,43,${0.7 * v})` : `rgba(44,98,201,${-0.7 * v})`;
      ctx.fillRect(Math.floor(j * cw), Math.floor(i * ch), Math.ceil(cw), Math.ceil(ch));
    }
  }
  canvas.dataset.max = String(max);
  canvas.dataset.cells = JSON.stringify(grid.flat());  // what is drawn, for scripts and tests
  $("#map-scale-text").textContent = `${fmt(-max, 4)} … ${fmt(max, 4)} logits per patch`;
  drawDeleted(ctx, canvas, state);
}

// ------------------------------------------------------------------ feature (atlas) page
async function renderFeature(state) {
  const view = $("#view-feature");
  const [layer, index] = (state.f || "0:0").split(":").map(Number);
  view.replaceChildren(el("p", { class: "muted", text: "loading..." }));
  let p;
  try { p = await getFeature(layer, index); } catch (e) { view.replaceChildren(el("p", { text: e.message })); showError(e.message); return; }
  const nav = el("p", {},
    el("a", { href: hashOf({ view: "feature", f: `${layer}:${Math.max(0, index - 1)}` }), text: "← previous" }), " · ",
    el("a", { href: hashOf({ view: "feature", f: `${layer}:${index + 1}` }), text: "next →" }), " · ",
    el("a", { href: hashOf({ view: "atlas", layer }), text: `layer ${layer} in the atlas` }),
    REPORT ? null : [" · ", el("a", { href: "#view=explain", text: "explain an image" })]);
  const q = p.activation.quantiles.filter((x) => x.value !== null);
  const hist = p.activation.histogram;
  const hmax = Math.max(1, ...hist.counts);
  const effect = p.direct_effect.classes;
  const emax = Math.max(1e-12, ...effect.map((c) => Math.abs(c.logit)));
  const patch = (t) => {
    if (!p.patch_grid || t.row === undefined) return null;
    const [gh, gw] = p.patch_grid;
    return el("div", { class: "patch", style: `left:${(100 * t.col) / gw}%;top:${(100 * t.row) / gh}%;width:${100 / gw}%;height:${100 / gh}%` });
  };
  const figures = (list) => el("div", { class: "top-images" }, ...list.map((t) => el("figure", {},
    el("div", { class: "pic" }, el("img", { src: t.thumbnail, alt: t.class || "" }), patch(t)),
    el("figcaption", {}, `${t.activation.toFixed(3)}`, el("br"), t.class || ""))));
  view.replaceChildren(...[
    nav,
    el("div", { class: "panel" },
      el("h2", { id: "feature-title" }, `Layer ${p.layer} · feature ${p.index}: `, el("span", { class: "label", id: "feature-label", text: p.label || "(no label)" }), ...sourceBadge(p)),
      el("p", { class: "muted", text: p.label_explained }),
      el("p", {}, p.live ? `Active at the CLS token on ${p.fire_count} of ${p.images} images (${pct(p.firing_rate)})` : `Never active on the ${p.images} atlas images`,
        p.patch_firing_rate !== undefined ? `; on ${pct(p.patch_firing_rate)} of patch tokens` : "", ".")),
    p.live ? el("div", { class: "columns" },
      el("div", { class: "panel" }, el("h2", { text: "Activation" }),
        el("p", {}, `mean ${p.activation.mean.toFixed(3)}, max ${p.activation.max.toFixed(3)}`),
        el("table", {}, el("tr", {}, ...q.map((x) => el("th", { text: `q${Math.round(100 * x.q)}` }))), el("tr", {}, ...q.map((x) => el("td", { text: x.value.toFixed(3) })))),
        el("div", { class: "hist", title: "activation histogram, log-spaced bins" }, ...hist.counts.map((c, i) => el("div", {
          style: `height:${(100 * c) / hmax}%`, title: `${hist.edges[i].toPrecision(3)}–${hist.edges[i + 1].toPrecision(3)}: ${c}` }))),
        el("p", { class: "muted" }, hist.edges.length ? `${hist.edges[0].toPrecision(3)} … ${hist.edges[hist.edges.length - 1].toPrecision(3)} (log scale)` : "")),
      el("div", { class: "panel" }, el("h2", { text: "Direct effect on each class" }),
        el("p", { class: "muted" }, `mean contribution to each logit when active (logits); strength ${fmt(p.direct_effect.strength, 4)}${p.direct_effect.weak ? " (weak)" : ""}`),
        ...effect.map((c) => el("div", { class: "effect-row", "data-label": c.label },
          el("span", { text: c.label }),
          el("div", { class: "track" }, el("div", { class: "seg " + (c.logit >= 0 ? "pos" : "neg"),
            style: `left:${50 + Math.min(0, (50 * c.logit) / emax)}%;width:${(50 * Math.abs(c.logit)) / emax}%` })),
          el("span", { class: "num", text: fmt(c.logit, 4) }))))) : null,
    p.live ? el("div", { class: "panel" }, el("h2", { text: "Text matches" }),
      el("table", {}, ...p.text.matches.map((m) => el("tr", {}, el("td", { text: m.word }), el("td", { text: m.score.toFixed(4) })))),
      el("p", { class: "muted" }, `margin (top-1 minus top-2) ${p.text.margin === null ? "n/a" : p.text.margin.toFixed(4)}`,
        p.image_classes ? `; top images: ${pct(p.image_classes.fraction)} ${p.image_classes.class}` : "")) : null,
    p.top_images.length ? el("div", { class: "panel" }, el("h2", { text: "Top activating images (CLS token)" }), figures(p.top_images)) : null,
    p.top_patches && p.top_patches.length ? el("div", { class: "panel" }, el("h2", { text: "Top patches" }), figures(p.top_patches)) : null,
  ].filter(Boolean));
}

// ------------------------------------------------------------------ atlas list
async function renderAtlasList(state) {
  const view = $("#view-atlas");
  if (REPORT) { view.replaceChildren(el("p", { text: "This report holds the atlas pages of its top features only." })); return; }
  const params = new URLSearchParams({ limit: "200", sort: state.sort || "firing_rate" });
  if (state.layer !== undefined && state.layer !== "") params.set("layer", state.layer);
  if (state.q) params.set("q", state.q);
  let a;
  try { a = await getAtlas("?" + params); } catch (e) { showError(e.message); return; }
  if (!a) { view.replaceChildren(el("p", { text: "This bundle has no feature atlas (build one with cltvit-atlas)." })); return; }
  const layerSel = el("select", { id: "atlas-layer" }, el("option", { value: "", text: "all layers" }),
    ...a.layers.map((l) => el("option", { value: String(l.layer), text: `layer ${l.layer} (${l.live} active)`, selected: String(l.layer) === state.layer })));
  const search = el("input", { id: "atlas-q", type: "search", placeholder: "label contains...", value: state.q || "" });
  layerSel.onchange = () => setState({ view: "atlas", layer: layerSel.value }, { push: true });
  search.onchange = () => setState({ view: "atlas", q: search.value }, { push: true });
  view.replaceChildren(
    el("div", { class: "panel" }, el("h2", { text: "Feature atlas" }),
      el("p", {}, `${a.n_layers} layers × ${a.n_features} features, measured on ${a.images.toLocaleString()} images of ${a.dataset.name || "a dataset"} (${a.mode} mode). `,
        `Labels: ${a.vocab.source}; ${a.vocab.size.toLocaleString()} words.`),
      el("div", { class: "controls" }, layerSel, search)),
    el("div", { class: "panel" }, el("p", { class: "muted", text: `${a.total} features (showing ${a.features.length})` }),
      el("table", { class: "atlas-list" }, el("tr", {}, ...["feature", "label", "", "firing rate", "strength"].map((h) => el("th", { text: h }))),
        ...a.features.map((f) => el("tr", {},
          el("td", {}, el("a", { href: hashOf({ view: "feature", f: `${f.layer}:${f.index}` }), text: `${f.layer}:${f.index}` })),
          el("td", { text: f.label || "" }), el("td", {}, ...sourceBadge(f)),
          el("td", { text: pct(f.firing_rate) }), el("td", { text: fmt(f.strength, 4) }))))));
}

// ------------------------------------------------------------------ wiring
function route() {
  const state = readState();
  const view = state.view || "explain";
  for (const v of ["explain", "feature", "atlas"]) $("#view-" + v).hidden = v !== view;
  if (view === "feature") renderFeature(state);
  else if (view === "atlas") renderAtlasList(state);
  else renderExplain(state);
}

function wireInputs() {
  $("#file").addEventListener("change", (ev) => useFile(ev.target.files[0]));
  const drop = $("#drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); useFile(ev.dataTransfer.files[0]); });
  $("#labels").addEventListener("change", () => setState({ labels: parseLabels($("#labels").value).join(","), cls: "" }, { push: true }));
  $("#rerun").addEventListener("click", () => { app.resultKey = null; route(); });
  $("#map-kind").addEventListener("change", (ev) => { setState({ kind: ev.target.value === "total" ? "total" : "" }); renderExplain(readState()); });
  $("#map-class").addEventListener("change", (ev) => { setState({ cls: ev.target.value }); drawResult(readState()); });
  $("#map-layer").addEventListener("change", (ev) => { setState({ map: ev.target.value, head: "all" }); drawResult(readState()); });
  $("#map-head").addEventListener("change", (ev) => { setState({ head: ev.target.value }); drawResult(readState()); });
  $("#heatmap").addEventListener("click", (ev) => {  // delete (or bring back) the patch under the pointer
    if (!canEdit() || !app.info.patches || !app.result) return;
    const [rows, cols] = app.info.patches.grid, c = ev.currentTarget;
    const col = Math.min(cols - 1, Math.max(0, Math.floor((ev.offsetX / c.clientWidth) * cols)));
    const row = Math.min(rows - 1, Math.max(0, Math.floor((ev.offsetY / c.clientHeight) * rows)));
    toggleEdit("del", String(row * cols + col));
  });
  $("#check-linearity").addEventListener("click", checkLinearity);
  $("#reset-edits").addEventListener("click", () => setState({ ablate: "", del: "" }, { push: true }));
  window.addEventListener("hashchange", () => { if (app.info) route(); });  // before start() has /info, start() routes
}

async function drawExamples() {
  const list = (app.atlas && app.atlas.example_list) || [];
  $("#examples-box").hidden = list.length === 0;
  const buttons = list.map((ex) => {
    const b = el("button", { type: "button", title: ex.class || `example ${ex.example}`, "data-example": String(ex.example) });
    b.addEventListener("click", () => setState({ view: "explain", example: String(ex.example), img: "", ablate: "", del: "" }, { push: true }));
    exampleBlob(ex.example).then((blob) => b.append(el("img", { src: URL.createObjectURL(blob), alt: ex.class || "" }))).catch(() => {});
    return b;
  });
  $("#examples").replaceChildren(...buttons);
}

// the graph variant served and how it was chosen (/info's variant_choice: auto's gate figures and speed-up)
function variantLabel(info) {
  const c = info.variant_choice;
  if (!c) return info.variant ? `variant ${info.variant}` : "";
  const served = c.candidates.find((x) => x.variant === c.variant);
  const parts = [c.requested === "auto" ? "auto" : "asked for"];
  if (served && c.variant !== "fp32" && served.top1_agreement != null) parts.push(`${(100 * served.top1_agreement).toFixed(2)}% top-1 agreement with fp32`);
  if (served && c.variant !== "fp32" && served.score != null) parts.push(`${served.score.toFixed(2)}x fp32`);
  if (c.requested === "auto" && c.variant === "fp32") parts.push(c.reason.replace(/^fp32 served: /, ""));
  return `variant ${c.variant} (${parts.join(", ")})`;
}

async function start() {
  showError("");
  try {
    app.info = await getInfo();
  } catch (e) {
    if (e.status !== 401) showError("cannot reach the server: " + e.message);
    return;
  }
  $("#model").textContent = `${app.info.backbone.model} · ${app.info.mode} mode · ${app.info.labels.length} labels`;
  $("#variant").textContent = variantLabel(app.info);
  $("#variant").title = app.info.variant_choice ? app.info.variant_choice.reason : "";
  try { app.atlas = await getAtlas("?limit=1"); } catch (e) { app.atlas = null; }
  $("#atlas-link").hidden = !app.atlas;
  if (REPORT) { $("#source").hidden = true; }
  else drawExamples();
  route();
}

wireInputs();
start();
