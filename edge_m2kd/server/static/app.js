// edge-m2kd serve: the page. Plain JavaScript, no build step. Everything it shows comes from
// /api/ (the CLI's --json reports); every text a client supplied (class names, file names) goes
// into the page through textContent, never as HTML.
"use strict";

const timings = (window.edgeTimings = {}); // read by the browser test: page load, prediction round trip
const $ = (id) => document.getElementById(id);

// -- the token: every /api/ call needs it. It comes in the URL `serve` printed (#token=..., or
// ?token=...), is kept in this tab's session storage and dropped from the address bar (so it is
// not in the history or a copied link), or is typed into the bar that a 401 shows.
function takeTokenFromUrl() {
  const m = (location.hash.slice(1) + "&" + location.search.slice(1)).match(/(?:^|&)token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("edge-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
}
takeTokenFromUrl();

function token() {
  return sessionStorage.getItem("edge-token") || "";
}

function headers(extra) {
  const t = token();
  return Object.assign(t ? { "X-Edge-Token": t } : {}, extra || {});
}

async function api(path, options) {
  const res = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  if (res.status === 401) $("token-bar").hidden = false;
  const type = res.headers.get("content-type") || "";
  const body = type.includes("json") ? await res.json() : await res.blob();
  if (!res.ok) throw new Error(body && body.detail ? body.detail : `${res.status} ${res.statusText}`);
  return body;
}

async function imageUrl(path) {
  // <img src> cannot send the token header: fetch the image, show it from a blob URL.
  return URL.createObjectURL(await api(path));
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function showError(e) {
  const box = $("error");
  box.textContent = e ? String(e.message || e) : "";
  box.hidden = !e;
}

const pct = (x) => (x === null || x === undefined ? "-" : `${(100 * x).toFixed(1)}%`);
function bytes(n) {
  if (n === null || n === undefined) return "-";
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  return `${(n / 1024).toFixed(1)} KiB`;
}
function seconds(s) {
  if (s === null || s === undefined) return "-";
  return s >= 60 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${s.toFixed(1)} s`;
}

// -- tabs ------------------------------------------------------------------------------------------
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
    for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== tab.dataset.tab;
  });
}

// -- overview --------------------------------------------------------------------------------------------
let known = [];

async function loadOverview() {
  const [ws, history, memory, snaps] = await Promise.all([
    api("/api/workspace"), api("/api/history"), api("/api/memory"), api("/api/snapshots"),
  ]);
  known = ws.classes.map((c) => c.name);
  $("ws-name").textContent = ws.workspace;
  const summary = $("summary");
  summary.replaceChildren(
    el("div", {}, el("b", { text: ws.classes.length }), "classes"),
    el("div", {}, el("b", { text: ws.steps }), "steps"),
    el("div", {}, el("b", { text: `${ws.config.backbone} ${ws.config.input_size}px` }), `${ws.config.snapshots} snapshots`),
    el("div", {}, el("b", { text: snaps.free_fraction === null ? "-" : pct(snaps.free_fraction) }), "free capacity"),
    el("div", {}, el("b", { text: ws.memory_budget_bytes ? bytes(ws.memory_budget_bytes) : "none" }), "memory budget"),
  );
  await Promise.all([renderClasses(ws.classes), renderSteps(history), renderMemory(memory), renderSnapshots(snaps)]);
  if (ws.job && !["done", "refused", "failed", "cancelled"].includes(ws.job.status)) followJob(ws.job);
  document.body.dataset.overview = `steps-${ws.steps}`; // the browser test waits on this
}

async function renderClasses(classes) {
  const box = $("classes");
  if (!classes.length) {
    box.replaceChildren(el("p", { class: "muted", text: "No classes yet: teach the first one." }));
    return;
  }
  const cards = await Promise.all(classes.map(async (c) => {
    const img = el("img", { alt: c.name });
    try { img.src = await imageUrl(`/api/classes/${c.id}/thumbnail.png`); } catch (e) { /* no exemplar kept */ }
    return el("div", { class: "cls", "data-class": c.name }, img, el("div", { text: c.name }),
      el("div", { class: "muted", text: `step ${c.step}` }));
  }));
  box.replaceChildren(...cards);
}

async function renderSteps(history) {
  const box = $("steps");
  const plot = $("history-plot");
  if (!history.steps.length) {
    box.replaceChildren(el("p", { class: "muted", text: "No steps yet." }));
    plot.hidden = true;
    return;
  }
  const groups = history.steps.length;
  const head = el("tr", {}, el("th", { text: "step" }), el("th", { class: "left", text: "classes" }),
    el("th", { text: "accuracy" }), el("th", { text: "NME" }),
    ...Array.from({ length: groups }, (_, g) => el("th", { text: `group ${g + 1}` })), el("th", { text: "time" }));
  const rows = history.steps.map((s) => el("tr", {},
    el("td", { text: s.step }), el("td", { class: "left", text: s.classes.join(", ") }),
    el("td", { text: pct(s.accuracy) }), el("td", { text: pct(s.nme_accuracy) }),
    ...Array.from({ length: groups }, (_, g) => el("td", { text: g < s.accuracy_per_group.length ? pct(s.accuracy_per_group[g]) : "" })),
    el("td", { text: seconds(s.seconds) })));
  box.replaceChildren(el("p", { class: "muted", text: "Held-out accuracy after each step, per class group (the accuracy matrix):" }),
    el("table", { class: "grid" }, head, ...rows));
  plot.src = await imageUrl("/api/history.png");
  plot.hidden = false;
}

function gauge(label, value, whole, note) {
  const bar = el("div", { class: "bar" + (value > whole ? " over" : "") }, el("div"));
  bar.firstChild.style.width = `${Math.min(100, (100 * value) / Math.max(whole, 1)).toFixed(2)}%`;
  return el("div", { class: "gauge" },
    el("div", { class: "label" }, el("span", { text: label }), el("span", { text: `${bytes(value)}${note ? " " + note : ""}` })), bar);
}

function renderMemory(m) {
  const peak = m.next_step.predicted_peak;
  const whole = m.budget || peak.total;
  const against = m.budget ? `of the ${bytes(m.budget)} budget` : `of the predicted peak ${bytes(peak.total)} (no budget set)`;
  const parts = [
    ["weights (student)", m.weights],
    ...m.snapshots.map((s) => [`snapshot ${s.step}`, s.bytes]),
    ["exemplars", m.exemplars],
    ["statistics (analytic head)", m.statistics || 0],
    ["optimizer state", m.optimizer_state],
    ["activations (predicted)", m.activations],
    ["exports (ONNX / engine)", m.exported_engine || 0],
  ];
  const verdict = m.budget === null ? "" : m.fits ? "fits" : "does NOT fit";
  $("memory").replaceChildren(
    el("p", { class: "muted", text: `Each part ${against}.` }),
    ...parts.map(([label, v]) => gauge(label, v, whole)),
    gauge(`next step's predicted peak (${m.next_step.new_images} images, batch ${m.next_step.batch_size})`, peak.total, whole, verdict),
  );
}

function renderSnapshots(s) {
  const rows = s.snapshots.map((r) => el("tr", {},
    el("td", { text: r.step }), el("td", { class: "left", text: r.classes.join(", ") }), el("td", { text: bytes(r.bytes) }),
    el("td", { text: `${((100 * r.bytes) / r.full_copy_bytes).toFixed(1)}%` }),
    el("td", { class: r.verified === null ? "muted" : r.verified ? "ok" : "bad",
      text: r.verified === null ? "not checked" : r.verified ? `verified (${r.max_abs_diff.toExponential(1)})` : "FAILED" })));
  $("snapshots").replaceChildren(
    el("p", { class: "muted", text: `${s.policy} snapshots` + (s.free_fraction === null ? "" : `; free weights left for later steps: ${pct(s.free_fraction)}`) }),
    el("table", { class: "grid" }, el("tr", {}, el("th", { text: "step" }), el("th", { class: "left", text: "classes" }),
      el("th", { text: "bytes" }), el("th", { text: "of a full copy" }), el("th", { text: "check" })), ...rows));
}

$("verify").addEventListener("click", async () => {
  $("verify").disabled = true;
  try { renderSnapshots(await api("/api/snapshots?verify=true")); showError(null); } catch (e) { showError(e); }
  $("verify").disabled = false;
});

// -- teach -------------------------------------------------------------------------------------------------
const teachRows = [];

function addTeachRow() {
  const files = [];
  const name = el("input", { type: "text", placeholder: "class name", maxlength: "64", class: "class-name" });
  const input = el("input", { type: "file", accept: "image/*", multiple: "", class: "class-files" });
  const count = el("span", { class: "count muted", text: "0 images" });
  const drop = el("div", { class: "drop" }, input, el("span", { text: "or drop images here" }));
  const add = (list) => {
    for (const f of list) files.push(f);
    count.textContent = `${files.length} images`;
  };
  input.addEventListener("change", () => { add(input.files); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); add(e.dataTransfer.files); });
  name.addEventListener("input", () => {
    name.title = known.includes(name.value.trim()) ? "already a known class: the step will be refused" : "";
  });
  $("teach-classes").append(el("div", { class: "teach-class" }, name, drop, count));
  teachRows.push({ name, files });
}
addTeachRow();
$("add-class").addEventListener("click", addTeachRow);

$("start").addEventListener("click", async () => {
  const form = new FormData();
  teachRows.filter((r) => r.name.value.trim() || r.files.length).forEach((r, i) => {
    form.append("class", r.name.value.trim());
    for (const f of r.files) form.append(`images-${i}`, f, f.name);
  });
  if ($("epochs").value) form.append("epochs", $("epochs").value);
  $("start").disabled = true;
  showJob({ status: "uploading", phase: "", epoch: 0, epochs: 0 });
  try {
    const job = await api("/api/steps", { method: "POST", body: form });
    showError(null);
    followJob(job);
  } catch (e) {
    showJob({ status: "refused", reason: e.message, epoch: 0, epochs: 0 });
    $("start").disabled = false;
  }
});

let following = null;

function showJob(job) {
  $("progress").hidden = false;
  $("job-status").textContent = job.status;
  $("job-status").dataset.status = job.status;
  $("job-phase").textContent = job.phase ? `phase: ${job.phase}` + (job.classes ? `, classes ${job.classes.join(", ")}` : "") : "";
  const done = job.status === "done";
  $("job-bar").style.width = `${done ? 100 : job.epochs ? (100 * job.epoch) / job.epochs : 0}%`;
  $("job-epoch").textContent = job.epochs ? `${job.epoch} / ${job.epochs} (${job.phase})` : "-";
  $("job-loss").textContent = job.loss == null ? "-" : job.loss.toFixed(3);
  $("job-ips").textContent = job.images_per_second == null ? "-" : job.images_per_second.toFixed(0);
  $("job-left").textContent = done ? "0 s" : job.time_left == null ? "estimating..." : seconds(job.time_left);
  $("job-reason").textContent = job.reason && job.status !== "done" ? job.reason : "";
  $("cancel").hidden = !["starting", "running"].includes(job.status);
  const banner = $("job-banner");
  banner.hidden = !["starting", "running", "cancelling"].includes(job.status);
  banner.textContent = `A step is running (${(job.classes || []).join(", ")}): ${job.phase || ""} ${job.epochs ? job.epoch + "/" + job.epochs : ""}. Predictions keep answering from the last committed step.`;
  const result = $("job-result");
  if (done && job.result) {
    const h = job.result.holdout || {};
    result.replaceChildren(el("p", { class: "ok",
      text: `Step ${job.result.step}: learned ${job.result.classes.join(", ")} from ${job.result.train_images} images in ` +
            `${seconds(job.result.seconds)}; held-out accuracy ${pct(h.deployed_accuracy)} ` +
            `(deployed: ${job.result.deployed_classifier || "-"}).` +
            (job.result.forward_images_per_second == null ? "" :
              ` Forward pass ${job.result.forward_images_per_second.toFixed(0)} img/s; ` +
              `analytic head solved in ${seconds(job.result.solve_seconds)}.`) }));
  } else result.replaceChildren();
}

async function followJob(job) {
  if (following === job.id) return;
  following = job.id;
  $("start").disabled = true;
  showJob(job);
  let last = job;
  try {
    // Server-sent events, read through fetch so the token can travel in a header.
    const res = await fetch(`/api/jobs/${job.id}/events`, { headers: headers() });
    if (!res.ok) throw new Error(`${res.status}`);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = chunk.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data) { last = JSON.parse(data); showJob(last); }
      }
    }
  } catch (e) {
    // The stream broke (a proxy, a sleeping laptop): poll until the job ends.
    while (!["done", "refused", "failed", "cancelled"].includes(last.status)) {
      await new Promise((r) => setTimeout(r, 1000));
      try { last = await api(`/api/jobs/${job.id}`); showJob(last); } catch (err) { /* keep trying */ }
    }
  }
  following = null;
  $("start").disabled = false;
  if (last.status === "done") {
    for (const row of teachRows) { row.files.length = 0; row.name.value = ""; }
    for (const c of document.querySelectorAll(".count")) c.textContent = "0 images";
  }
  loadOverview().catch(showError);
}

$("cancel").addEventListener("click", async () => {
  if (!following) return;
  try { showJob(await api(`/api/jobs/${following}/cancel`, { method: "POST" })); } catch (e) { showError(e); }
});

// -- try it ---------------------------------------------------------------------------------------------------
async function predict(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("images", f, f.name);
  form.append("top_k", "3");
  $("try-meta").textContent = "predicting...";
  const start = performance.now();
  try {
    const out = await api("/api/predict", { method: "POST", body: form });
    const roundTrip = performance.now() - start;
    timings.predict_ms = roundTrip;
    timings.predictions = (timings.predictions || []).concat([roundTrip]);
    showError(null);
    $("try-meta").textContent = `${out.backend} on ${out.device}, model of step ${out.steps}: inference ` +
      `${out.inference_ms.toFixed(1)} ms, round trip through the page ${roundTrip.toFixed(0)} ms`;
    $("try-meta").title = out.passed_over.join("\n"); // why not a faster backend, on hover
    $("predictions").replaceChildren(...out.results.map((r, i) => el("div", { class: "prediction", "data-top": r.predictions[0].class },
      el("img", { src: URL.createObjectURL(files[i]), alt: r.image }),
      el("div", { class: "scores" }, el("div", { text: r.image }),
        ...r.predictions.map((p) => {
          const bar = el("div", { class: "bar" }, el("div"));
          bar.firstChild.style.width = `${(100 * p.score).toFixed(1)}%`;
          return el("div", { class: "score" }, el("span", { text: p.class }), bar, el("span", { text: pct(p.score) }));
        })))));
  } catch (e) {
    $("try-meta").textContent = "";
    showError(e);
  }
}
$("try-files").addEventListener("change", () => {
  const files = Array.from($("try-files").files);
  $("try-files").value = ""; // so choosing the same file again asks again
  predict(files);
});
const tryDrop = $("try-drop");
tryDrop.addEventListener("dragover", (e) => { e.preventDefault(); tryDrop.classList.add("over"); });
tryDrop.addEventListener("dragleave", () => tryDrop.classList.remove("over"));
tryDrop.addEventListener("drop", (e) => { e.preventDefault(); tryDrop.classList.remove("over"); predict(Array.from(e.dataTransfer.files)); });

// -- export ---------------------------------------------------------------------------------------------------
$("export-run").addEventListener("click", async () => {
  const box = $("export-result");
  const trt = $("export-trt").checked;
  $("export-run").disabled = true;
  box.replaceChildren(el("p", { class: "muted", text: "exporting (the parity check runs first)..." }));
  try {
    const out = await api("/api/export", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ tensorrt: trt, precision: trt ? $("export-precision").value : "fp32" }) });
    const p = out.parity;
    const row = (k, v, cls) => el("tr", {}, el("th", { class: "left", text: k }), el("td", { class: "left " + (cls || ""), text: v }));
    box.replaceChildren(el("table", { class: "grid", id: "export-table" },
      row("ONNX model", out.onnx), row("metadata", out.metadata),
      row("parity vs PyTorch", `${p.passed ? "passed" : "FAILED (forced)"} on ${p.samples} images`, p.passed ? "ok" : "bad"),
      row("max abs logit difference", p.max_abs_diff.toExponential(2)), row("top-1 agreement", pct(p.top1_agreement)),
      row("TensorRT engine", out.tensorrt || "not built"), row("model hash", out.model_hash)));
    showError(null);
  } catch (e) {
    box.replaceChildren(el("p", { class: "reason", text: e.message }));
  }
  $("export-run").disabled = false;
});

// -- start ------------------------------------------------------------------------------------------------------
$("token-save").addEventListener("click", () => {
  sessionStorage.setItem("edge-token", $("token-input").value.trim());
  $("token-bar").hidden = true;
  loadOverview().then(() => showError(null)).catch(showError);
});

loadOverview()
  .then(() => { timings.overview_ms = performance.now(); }) // from navigation start to the overview drawn
  .catch(showError);
