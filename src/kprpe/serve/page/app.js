// kprpe serve's page: plain JS, no framework, nothing loaded from elsewhere.
// Names from users (file names, identities) only ever reach the page as textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const files = {}; // slot ("a", "b", "query", "enrol", "kprpe") -> File
const CROP = 112;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function call(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (exc) {
    throw new Error("cannot reach the server (" + exc.message + ")");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (exc) {
    body = null;
  }
  if (!response.ok) {
    const why = body && typeof body.error === "string" ? body.error : "HTTP " + response.status;
    throw new Error(why + " (" + response.status + ")");
  }
  return body;
}

async function guarded(work) {
  showError("");
  try {
    await work();
  } catch (exc) {
    showError(exc.message);
  }
}

// ------------------------------------------------------------------------------------------ file slots

function setFile(slot, file) {
  files[slot] = file;
  $("name-" + slot).textContent = file ? file.name : "";
  if (slot === "kprpe" && file) guarded(loadKprpePhoto);
}

function wireSlot(slot) {
  const input = $("file-" + slot);
  const zone = $("drop-" + slot);
  input.addEventListener("change", () => setFile(slot, input.files[0] || null));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) setFile(slot, event.dataTransfer.files[0]);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = src;
  });
}

// ---------------------------------------------------------------------------------------------- verify

const POINT_COLOURS = ["#00e5ff", "#00e5ff", "#ffea00", "#ff4081", "#ff4081"];

async function drawPhoto(canvas, file, face) {
  const url = URL.createObjectURL(file);
  try {
    const img = await loadImage(url);
    const scale = Math.min(1, 420 / img.naturalWidth, 420 / img.naturalHeight);
    canvas.width = Math.round(img.naturalWidth * scale);
    canvas.height = Math.round(img.naturalHeight * scale);
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    ctx.lineWidth = 2;
    if (face.box) {
      const [x0, y0, x1, y1] = face.box.map((v) => v * scale);
      ctx.strokeStyle = "#76ff03";
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    }
    face.landmarks.forEach(([x, y], i) => {
      ctx.fillStyle = POINT_COLOURS[i];
      ctx.beginPath();
      ctx.arc(x * scale, y * scale, 3.5, 0, 2 * Math.PI);
      ctx.fill();
    });
  } finally {
    URL.revokeObjectURL(url);
  }
}

async function verify() {
  if (!files.a || !files.b) throw new Error("choose two photos first");
  const form = new FormData();
  form.append("a", files.a);
  form.append("b", files.b);
  const answer = await call("/verify?visual=true", { method: "POST", body: form });
  $("verify-decision").textContent = answer.same ? "Same person" : "Different people";
  $("verify-decision").className = answer.same ? "same" : "different";
  $("verify-similarity").textContent = answer.similarity.toFixed(4);
  $("verify-threshold").textContent = answer.threshold.toFixed(4);
  $("verify-threshold-source").textContent = answer.threshold_source;
  for (const slot of ["a", "b"]) {
    await drawPhoto($("photo-" + slot), files[slot], answer.faces[slot]);
    $("crop-" + slot).src = answer.faces[slot].crop_png;
  }
  $("verify-result").hidden = false;
}

// ---------------------------------------------------------------------------------------------- search

function thumbnailStrip(urls, identity) {
  // the server's URLs (a hash key and a number, never a name); the name only ever goes into alt text
  const strip = document.createElement("span");
  strip.className = "thumbnails";
  for (const url of urls || []) {
    const img = document.createElement("img");
    img.className = "thumbnail";
    img.src = url;
    img.alt = "enrolled face of " + identity;
    strip.append(img);
  }
  if (!strip.childElementCount) {
    strip.textContent = "no thumbnail";
    strip.classList.add("muted");
  }
  return strip;
}

async function refreshGallery() {
  const answer = await call("/gallery");
  const list = $("gallery-list");
  list.replaceChildren();
  if (answer.identities === null) {
    $("search-gallery-note").textContent = "This server has no gallery index (start it with --gallery GALLERY).";
    return;
  }
  $("search-gallery-note").textContent =
    answer.identities.length + " identities in the gallery" +
    (answer.saved_to === "file" ? "; changes are saved to its file."
      : answer.saved_to === "database" ? "; changes are saved in the database as they are made."
      : "; changes last until the server stops.") +
    (answer.keeps_thumbnails ? "" : " This server keeps no thumbnails (see --thumbnails).");
  for (const name of answer.identities) {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "identity";
    label.textContent = name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "remove";
    remove.addEventListener("click", () => guarded(() => removeIdentity(name)));
    item.append(thumbnailStrip(answer.thumbnails[name], name), " ", label, " ", remove);
    list.append(item);
  }
}

function keyHeaders() {
  const key = $("api-key").value;
  return key ? { "X-API-Key": key } : {};
}

async function removeIdentity(name) {
  const form = new FormData();
  form.append("identity", name);
  await call("/gallery/remove", { method: "POST", body: form, headers: keyHeaders() });
  $("enrol-result").textContent = "removed " + name;
  await refreshGallery();
}

async function enrol() {
  const name = $("enrol-identity").value.trim();
  if (!name) throw new Error("type the identity's name first");
  if (!files.enrol) throw new Error("choose a photo to enrol");
  const form = new FormData();
  form.append("identity", name);
  form.append("image", files.enrol);
  const answer = await call("/gallery/enrol", { method: "POST", body: form, headers: keyHeaders() });
  $("enrol-result").textContent = "enrolled " + answer.identity + " (" + answer.faces + " face(s))";
  await refreshGallery();
}

async function search() {
  if (!files.query) throw new Error("choose a query photo first");
  const form = new FormData();
  form.append("image", files.query);
  form.append("k", $("search-k").value);
  const answer = await call("/search?visual=true", { method: "POST", body: form });
  $("search-crop").src = answer.face.crop_png;
  const body = $("search-matches").tBodies[0];
  body.replaceChildren();
  answer.matches.forEach((match, i) => {
    const row = body.insertRow();
    row.insertCell().textContent = String(i + 1);
    row.insertCell().textContent = match.identity;
    row.insertCell().append(thumbnailStrip(match.thumbnails, match.identity));
    row.insertCell().textContent = match.score.toFixed(4);
    row.insertCell().textContent = match.same ? "yes (>= " + answer.threshold.toFixed(3) + ")" : "no";
  });
  $("search-result").hidden = false;
}

// ---------------------------------------------------------------------------------------------- KP-RPE

const kp = { info: null, crop: null, points: null, query: null, drag: -1, pending: null, rows: null };

async function loadKprpeInfo() {
  kp.info = await call("/kprpe");
  if (!kp.info.available) {
    $("kprpe-unavailable").textContent = kp.info.reason;
    $("kprpe-unavailable").hidden = false;
    return;
  }
  const layer = $("kprpe-layer");
  for (let i = 0; i < kp.info.layers; i++) layer.add(new Option("layer " + i, String(i)));
  const head = $("kprpe-head");
  for (let i = 0; i < kp.info.heads; i++) head.add(new Option("head " + i, String(i)));
  kp.query = Math.floor(kp.info.grid / 2) * kp.info.grid + Math.floor(kp.info.grid / 2);
}

async function loadKprpePhoto() {
  if (!kp.info || !kp.info.available) throw new Error(kp.info ? kp.info.reason : "server not ready");
  const form = new FormData();
  form.append("image", files.kprpe);
  const answer = await call("/embed?visual=true", { method: "POST", body: form });
  kp.crop = await loadImage(answer.face.crop_png);
  kp.points = answer.face.crop_keypoints.map((p) => p.slice());
  $("kprpe-maps").hidden = false;
  await updateBias();
}

async function updateBias() {
  const head = $("kprpe-head").value;
  const request = {
    keypoints: kp.points,
    query: kp.query,
    layer: Number($("kprpe-layer").value),
    head: head === "mean" ? null : Number(head),
  };
  const answer = await call("/kprpe/bias", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(request),
  });
  kp.rows = answer;
  drawBias();
}

function colour(t) {
  // t in [0, 1] -> blue (low) .. white .. red (high)
  const r = t < 0.5 ? Math.round(510 * t) : 255;
  const b = t > 0.5 ? Math.round(510 * (1 - t)) : 255;
  const g = Math.round(255 * (1 - Math.abs(2 * t - 1)));
  return "rgba(" + r + "," + g + "," + b + ",0.6)";
}

function drawBias() {
  const rows = kp.rows;
  const all = rows.kprpe.flat().concat(rows.rpe.flat());
  const low = Math.min(...all);
  const high = Math.max(...all);
  const span = high - low || 1;
  for (const [canvasId, grid, points] of [["kprpe-canvas", rows.kprpe, kp.points], ["rpe-canvas", rows.rpe, null]]) {
    const canvas = $(canvasId);
    const ctx = canvas.getContext("2d");
    const cell = canvas.width / rows.grid;
    ctx.drawImage(kp.crop, 0, 0, canvas.width, canvas.height);
    grid.forEach((line, r) => line.forEach((value, c) => {
      ctx.fillStyle = colour((value - low) / span);
      ctx.fillRect(c * cell, r * cell, cell, cell);
    }));
    const qr = Math.floor(kp.query / rows.grid);
    const qc = kp.query % rows.grid;
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 3;
    ctx.strokeRect(qc * cell, qr * cell, cell, cell);
    if (points) {
      points.forEach(([x, y], i) => {
        ctx.fillStyle = POINT_COLOURS[i];
        ctx.strokeStyle = "#000";
        ctx.lineWidth = 1.5;
        ctx.beginPath();
        ctx.arc(x * canvas.width, y * canvas.height, 6, 0, 2 * Math.PI);
        ctx.fill();
        ctx.stroke();
      });
    }
  }
  $("kprpe-scale").textContent =
    "Colour scale shared by both maps: blue " + low.toFixed(4) + " .. red " + high.toFixed(4) +
    " (logit bias). Query patch " + kp.query + ", layer " + rows.layer + ", " +
    (rows.head === null ? "mean of heads" : "head " + rows.head) + ".";
  // what is drawn, for scripts and tests that read the page
  $("kprpe-canvas").dataset.state = JSON.stringify({ points: kp.points, query: kp.query });
  $("kprpe-canvas").dataset.bias = JSON.stringify(rows.kprpe);
  $("rpe-canvas").dataset.bias = JSON.stringify(rows.rpe);
}

function canvasPoint(event) {
  const canvas = $("kprpe-canvas");
  const rect = canvas.getBoundingClientRect();
  return [(event.clientX - rect.left) / rect.width, (event.clientY - rect.top) / rect.height];
}

function scheduleBias() {
  // one request at a time while dragging: the latest position wins
  if (kp.pending) {
    kp.pending.again = true;
    return;
  }
  kp.pending = { again: false };
  guarded(updateBias).finally(() => {
    const again = kp.pending.again;
    kp.pending = null;
    if (again) scheduleBias();
  });
}

function wireKprpeCanvas() {
  const canvas = $("kprpe-canvas");
  canvas.addEventListener("pointerdown", (event) => {
    if (!kp.rows) return;
    const [x, y] = canvasPoint(event);
    const grab = 10 / canvas.getBoundingClientRect().width;
    kp.drag = kp.points.findIndex(([px, py]) => Math.hypot(px - x, py - y) <= grab);
    if (kp.drag < 0) {
      const g = kp.rows.grid;
      const col = Math.min(g - 1, Math.max(0, Math.floor(x * g)));
      const row = Math.min(g - 1, Math.max(0, Math.floor(y * g)));
      kp.query = row * g + col;
      scheduleBias();
    } else {
      canvas.setPointerCapture(event.pointerId);
    }
  });
  canvas.addEventListener("pointermove", (event) => {
    if (kp.drag < 0) return;
    const [x, y] = canvasPoint(event);
    kp.points[kp.drag] = [Math.min(1, Math.max(0, x)), Math.min(1, Math.max(0, y))];
    drawBias();
    scheduleBias();
  });
  const release = () => {
    if (kp.drag >= 0) scheduleBias();
    kp.drag = -1;
  };
  canvas.addEventListener("pointerup", release);
  canvas.addEventListener("pointercancel", release);
  $("kprpe-layer").addEventListener("change", () => kp.rows && guarded(updateBias));
  $("kprpe-head").addEventListener("change", () => kp.rows && guarded(updateBias));
}

// ------------------------------------------------------------------------------------------------ start

function showView(name) {
  for (const view of ["verify", "search", "kprpe"]) {
    $("view-" + view).hidden = view !== name;
    $("tab-" + view).classList.toggle("active", view === name);
  }
  if (name === "search") guarded(refreshGallery);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const slot of ["a", "b", "query", "enrol", "kprpe"]) wireSlot(slot);
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      location.hash = tab.dataset.view; // hashchange shows it (and the address links to the view)
    });
  }
  $("verify-go").addEventListener("click", () => guarded(verify));
  $("search-go").addEventListener("click", () => guarded(search));
  $("enrol-go").addEventListener("click", () => guarded(enrol));
  wireKprpeCanvas();
  const fromHash = () => {
    const wanted = location.hash.slice(1);
    showView(["verify", "search", "kprpe"].includes(wanted) ? wanted : "verify");
  };
  window.addEventListener("hashchange", fromHash);
  fromHash();
  guarded(async () => {
    const health = await call("/health");
    $("server-info").textContent =
      "aligner " + health.aligner + " · threshold " + health.threshold.toFixed(4) +
      " (" + health.threshold_source + ")";
    await loadKprpeInfo();
  });
});
