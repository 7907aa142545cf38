// The review page: filters in the URL, one page of rows from /api/rows, a detail view, labels posted to
// /api/labels, keyboard shortcuts. Everything heavy (filtering, sorting, heatmaps) happens on the server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const FIELDS = ["date_from", "date_to", "product", "line", "verdict", "label", "score_min", "score_max", "q",
                "sort"];
const state = {rows: [], total: 0, offset: 0, limit: 50, sel: -1, open: false, detail: null};

function esc(text) {
  const d = document.createElement("div");
  d.textContent = text == null ? "" : String(text);
  return d.innerHTML;
}

function fmt(x, digits) { return x == null ? "-" : Number(x).toFixed(digits); }

function say(text, error) {
  const s = $("#status");
  s.textContent = text;
  s.className = error ? "error" : "";
}

async function getJSON(url, options) {
  const r = await fetch(url, options);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function imageURL(row, kind, size) {
  const q = new URLSearchParams({run_id: row.run_id, uri: row.uri, kind: kind, size: String(size)});
  return "/api/image?" + q.toString();
}

function fillSelect(name, values, labelOf) {
  const sel = document.querySelector(`#filters [name=${name}]`);
  for (const v of values) {
    const o = document.createElement("option");
    o.value = v;
    o.textContent = labelOf ? labelOf(v) : (v === "" ? "(none)" : v);
    sel.appendChild(o);
  }
}

function filtersFromURL() {
  const q = new URLSearchParams(location.search);
  for (const f of FIELDS) {
    const el = document.querySelector(`#filters [name=${f}]`);
    if (q.has(f)) el.value = q.get(f);
  }
  state.offset = Number(q.get("offset") || 0);
}

function query() {
  const q = new URLSearchParams();
  for (const f of FIELDS) {
    const v = document.querySelector(`#filters [name=${f}]`).value;
    if (v !== "" && !(f === "label" && v === "any") && !(f === "sort" && v === "score_desc")) q.set(f, v);
  }
  if (state.offset) q.set("offset", String(state.offset));
  return q;
}

async function load(keepSelection) {
  const q = query();
  history.replaceState(null, "", q.toString() ? "?" + q.toString() : location.pathname);
  q.set("limit", String(state.limit));
  document.body.dataset.loaded = "0";
  let page;
  try {
    page = await getJSON("/api/rows?" + q.toString());
  } catch (e) {
    say(e.message, true);
    return;
  }
  state.rows = page.rows;
  state.total = page.total;
  const first = page.total ? page.offset + 1 : 0;
  $("#count").textContent = `${first}-${page.offset + page.rows.length} of ${page.total.toLocaleString("en")}`;
  $("#prev").disabled = page.offset === 0;
  $("#next").disabled = page.offset + page.rows.length >= page.total;
  renderRows();
  select(keepSelection ? Math.min(state.sel, state.rows.length - 1) : (state.rows.length ? 0 : -1));
  document.body.dataset.loaded = "1";
}

function labelBadge(row) {
  return row.label ? `<span class="badge l-${row.label}" title="${esc(row.reviewer)} ${esc(row.labelled_at)}` +
    `${row.comment ? ": " + esc(row.comment) : ""}">${row.label}</span>` : "";
}

function renderRows() {
  const box = $("#rows");
  box.innerHTML = "";
  state.rows.forEach((row, i) => {
    const div = document.createElement("div");
    div.className = "row";
    div.dataset.i = String(i);
    div.dataset.uri = row.uri;
    div.dataset.label = row.label || "";
    // an error row has no heatmap, and its image could not be read when it was scored
    const pair = row.status === "error"
      ? `<span class="none">not scored</span><span class="none">no heatmap</span>`
      : `<img loading="lazy" alt="image" src="${imageURL(row, "image", 240)}">` +
        `<img loading="lazy" alt="overlay" src="${imageURL(row, "overlay", 240)}">`;
    div.innerHTML = pair +
      `<div class="meta"><span class="badge v-${row.verdict}">${row.verdict}</span>${labelBadge(row)}` +
      `<b>${fmt(row.score, 4)}</b> (normalised ${fmt(row.score_normalised, 2)})<br>` +
      `${esc(row.run_date)} &middot; ${esc(row.product || "-")} / ${esc(row.line || "-")}<br>` +
      `<code>${esc(row.uri)}</code>${row.error ? `<br><small>${esc(row.error)}</small>` : ""}</div>`;
    div.addEventListener("click", () => { select(i); openDetail(); });
    box.appendChild(div);
  });
}

function select(i) {
  const old = document.querySelector(".row.sel");
  if (old) old.classList.remove("sel");
  state.sel = i;
  if (i < 0) return;
  const el = document.querySelector(`.row[data-i="${i}"]`);
  el.classList.add("sel");
  el.scrollIntoView({block: "nearest"});
  if (state.open) showDetail();
}

function openDetail() {
  if (state.sel < 0) return;
  state.open = true;
  $("#detail").hidden = false;
  showDetail();
}

function closeDetail() {
  state.open = false;
  $("#detail").hidden = true;
}

async function showDetail() {
  const row = state.rows[state.sel];
  let d;
  try {
    d = await getJSON("/api/row?" + new URLSearchParams({run_id: row.run_id, uri: row.uri}).toString());
  } catch (e) {
    say(e.message, true);
    return;
  }
  if (state.rows[state.sel] !== row) return;          // moved on while it loaded
  state.detail = d;
  renderDetail(d);
}

function renderDetail(d) {
  const row = state.rows[state.sel];
  $("#detail").dataset.uri = d.uri;
  const hasMap = d.status !== "error";
  // an error row's image was never read: its content hash is that of no bytes, shared by every
  // unreadable image, so it offers no label (the server refuses one too)
  $("#d-actions").hidden = !hasMap;
  for (const [id, kind] of [["#d-image", "image"], ["#d-overlay", "overlay"]]) {
    if (hasMap) $(id).src = imageURL(row, kind, 800);
    else $(id).removeAttribute("src");
  }
  const peak = $("#d-peak");
  peak.hidden = !(hasMap && d.width > 0 && d.peak_x >= 0);
  peak.style.left = `${100 * (d.peak_x + 0.5) / d.width}%`;
  peak.style.top = `${100 * (d.peak_y + 0.5) / d.height}%`;
  const fields = [
    ["score", `${fmt(d.score, 4)} (normalised ${fmt(d.score_normalised, 2)}: 0 = normal mean, 1 = threshold)`],
    ["threshold", fmt(d.threshold, 4)], ["verdict", d.verdict],
    // null without --global-block; equal to the score when the whole image, not a patch, set it
    ["image-level term", d.image_term_score == null ? "-" : fmt(d.image_term_score, 4) +
      (d.image_term_score >= d.score ? " (set the score: the whole image, not a patch)" : "")],
    ["peak", d.peak_x >= 0 ? `x ${d.peak_x}, y ${d.peak_y} px of ${d.width} x ${d.height}` : "-"],
    ["model id", d.model_id], ["model fitted", d.model_created_at], ["run", `${d.run_id} (${d.run_date})`],
    ["product / line", `${d.product || "-"} / ${d.line || "-"}`], ["status", d.status + (d.error ? ": " + d.error : "")],
    ["uri", d.uri], ["content sha256", d.content_sha256]];
  $("#d-fields").innerHTML = fields.map(([k, v]) => `<tr><th>${k}</th><td>${esc(v)}</td></tr>`).join("");
  $("#d-history").innerHTML = d.labels.length
    ? d.labels.map((l) => `<li><span class="badge l-${l.label}">${l.label}</span>${esc(l.reviewer)}, ` +
                          `${esc(l.labelled_at)}${l.comment ? ": " + esc(l.comment) : ""}</li>`).join("")
    : "<li>none yet</li>";
}

async function label(value) {
  if (state.sel < 0) return;
  const row = state.rows[state.sel];
  if (row.status === "error") {
    say(`not labelled: ${row.uri} was not scored, so there is no image to label`, true);
    return;
  }
  const comment = $("#d-comment").value.trim();
  let d;
  try {
    d = await getJSON("/api/labels", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify({run_id: row.run_id, uri: row.uri, label: value,
                                                            comment: comment || null})});
  } catch (e) {
    say(e.message, true);
    return;
  }
  const now = d.labels[0];
  for (const [i, r] of state.rows.entries()) {        // every row of the same image carries the label
    if (r.uri !== row.uri) continue;
    Object.assign(r, {label: now.label, reviewer: now.reviewer, comment: now.comment, labelled_at: now.labelled_at});
    const el = document.querySelector(`.row[data-i="${i}"]`);
    el.dataset.label = now.label;
    el.querySelector(".meta").querySelectorAll(".badge.l-defect, .badge.l-normal").forEach((b) => b.remove());
    el.querySelector(".meta .badge").insertAdjacentHTML("afterend", labelBadge(r));
  }
  $("#d-comment").value = "";
  say(`labelled ${now.label}: ${row.uri}`);
  if (state.open && state.rows[state.sel] === row) renderDetail(d);
  if (state.sel + 1 < state.rows.length) select(state.sel + 1);
}

function page(step) {
  const next = state.offset + step * state.limit;
  if (next < 0 || next >= state.total) return;
  state.offset = next;
  load(false);
}

async function loadDrift() {
  let d;
  try {
    d = await getJSON("/api/drift");
  } catch (e) {
    $("#drift-summary").textContent = "Drift: " + e.message;
    return;
  }
  const drifted = d.nights.filter((n) => n.drifted);
  const box = $("#drift");
  box.classList.toggle("flagged", drifted.length > 0);
  $("#drift-summary").textContent = drifted.length
    ? `DRIFT on ${drifted.length} of ${d.nights.length} nights: ` +
      drifted.map((n) => `${n.run_date} (median ${fmt(n.median, 2)})`).join(", ")
    : `No drift: every night's median within ±${d.bound} of the calibration mean (${d.nights.length} nights)`;
  const q = ["p05", "p25", "median", "p75", "p95"];
  const ref = d.reference
    ? `<tr><td>calibration</td><td>${d.reference.images} held-out</td>${q.map((k) => `<td>${fmt(d.reference[k], 2)}</td>`).join("")}` +
      `<td>${d.reference.false_alarm_rate == null ? "" : (100 * d.reference.false_alarm_rate).toFixed(1) + "% target"}</td><td>${esc(d.reference.basis)}</td></tr>`
    : "";
  const rows = d.nights.map((n) => `<tr class="${n.drifted ? "drifted" : ""}"><td>${n.run_date}</td>` +
    `<td>${n.images} (${esc(n.model_id.slice(0, 8))})</td>${q.map((k) => `<td>${fmt(n[k], 2)}</td>`).join("")}` +
    `<td>${(100 * n.flagged_rate).toFixed(1)}%</td><td>${n.drifted ? "DRIFT" : "ok"}</td></tr>`).join("");
  $("#drift-body").innerHTML = `<img alt="drift" src="${d.figure}"><table><tr><th>night</th><th>images (model)</th>` +
    `${q.map((k) => `<th>${k}</th>`).join("")}<th>flagged</th><th>flag</th></tr>${ref}${rows}</table>` +
    `<p>Normalised scores: 0 = the model's mean held-out normal score, 1 = its threshold. A night is flagged when ` +
    `its median lies beyond ±${d.bound}.${d.reference ? "" : " Start with --model MODEL to see its calibration here."}</p>`;
}

function typing(e) {
  const t = e.target;
  return t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type !== "button") || t.tagName === "SELECT";
}

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (typing(e)) {
    if (e.key === "Escape") e.target.blur();
    return;
  }
  const keys = {
    j: () => state.sel + 1 < state.rows.length && select(state.sel + 1),
    k: () => state.sel > 0 && select(state.sel - 1),
    Enter: openDetail, o: openDetail, Escape: closeDetail,
    d: () => label("defect"), n: () => label("normal"),
    c: () => { openDetail(); $("#d-comment").focus(); },
    "]": () => page(1), "[": () => page(-1),
    "/": () => $("#filters [name=q]").focus(),
  };
  if (keys[e.key]) {
    e.preventDefault();
    keys[e.key]();
  }
});

async function init() {
  const f = await getJSON("/api/facets");
  $("#where").innerHTML = `<code>${esc(f.out)}</code> &middot; ${f.rows.toLocaleString("en")} rows, ` +
    `${esc(f.first)} to ${esc(f.last)} &middot; reviewer <b id="reviewer">${esc(f.reviewer)}</b>` +
    (f.model ? ` &middot; model ${esc(f.model.model_id)}` : "");
  fillSelect("product", f.products);
  fillSelect("line", f.lines);
  fillSelect("verdict", f.verdicts);
  fillSelect("label", f.label_filters);
  fillSelect("sort", f.sorts, (s) => s.replace("_", " "));
  $("#keys").innerHTML = f.shortcuts.map(([k, what]) => `<kbd>${esc(k)}</kbd> ${esc(what)}`).join(" &nbsp; ");
  state.limit = f.page_size;
  filtersFromURL();
  $("#filters").addEventListener("submit", (e) => { e.preventDefault(); state.offset = 0; load(false); });
  $("#filters").addEventListener("change", (e) => {
    if (e.target.tagName === "SELECT") e.target.blur();           // so that the keys work again at once
    state.offset = 0;
    load(false);
  });
  $("#prev").addEventListener("click", () => page(-1));
  $("#next").addEventListener("click", () => page(1));
  $("#b-defect").addEventListener("click", () => label("defect"));
  $("#b-normal").addEventListener("click", () => label("normal"));
  await load(false);
  loadDrift();
}

init().catch((e) => say(e.message, true));
