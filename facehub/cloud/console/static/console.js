// FaceHub console: confirmations, the live gallery and the live fleet table. No build step.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
  const gallery = document.getElementById("gallery");
  const fleet = document.getElementById("fleet");
  if (!(gallery && gallery.dataset.live === "on") && !fleet) return;
  const events = new EventSource("/events");
  if (gallery && gallery.dataset.live === "on") liveGallery(gallery, events);
  if (fleet) liveFleet(fleet, events);
});

function liveGallery(gallery, events) {
  const device = gallery.dataset.device;
  const start = gallery.dataset.start ? Number(gallery.dataset.start) : null;
  const end = gallery.dataset.end ? Number(gallery.dataset.end) : null;
  const max = Number(gallery.dataset.max) || 180;
  const status = document.getElementById("live-status");
  events.addEventListener("open", () => status && status.classList.add("on"));
  events.addEventListener("error", () => status && status.classList.remove("on"));
  events.addEventListener("face", (message) => {
    const face = JSON.parse(message.data);
    if (device && face.device !== device) return;
    if (start !== null && face.captured_ms < start) return;
    if (end !== null && face.captured_ms >= end) return;
    if (gallery.querySelector(`a[data-key="${CSS.escape(face.key)}"]`)) return;
    const tile = document.createElement("a");
    tile.className = "tile new";
    tile.href = face.url;
    tile.dataset.key = face.key;
    const img = document.createElement("img");
    img.src = face.image;
    img.alt = `face ${face.face_id} from ${face.device}`;
    const caption = document.createElement("span");
    caption.className = "caption";
    caption.title = face.captured;
    const name = document.createElement("b");
    name.textContent = face.device;
    caption.append(name, " " + face.captured.slice(5, 19));
    tile.append(img, caption);
    // newest first: before the first tile that is older
    const older = [...gallery.children].find((other) => other.dataset.key && keyTime(other.dataset.key) < keyTime(face.key));
    gallery.insertBefore(tile, older || null);
    while (gallery.children.length > max) gallery.lastElementChild.remove();
    const empty = document.getElementById("empty");
    if (empty) empty.remove();
  });
}

function keyTime(key) {  // "<device>/<YYYY>/<MM>/<DD>/<HHMMSS.mmm>-<id>" -> sortable text
  const parts = key.split("/");
  return parts.slice(1, 4).join("") + parts[4];
}

function liveFleet(fleet, events) {
  let timer = null;
  const refresh = async () => {
    timer = null;
    try {
      const answer = await fetch(fleet.dataset.refresh, {credentials: "same-origin"});
      if (answer.ok) fleet.innerHTML = await answer.text();
      else if (answer.status === 401 || answer.redirected) window.location.reload();
    } catch (error) { /* the next event or tick tries again */ }
  };
  const soon = () => { if (!timer) timer = setTimeout(refresh, 300); };
  events.addEventListener("fleet", soon);
  setInterval(soon, 10000);
}
