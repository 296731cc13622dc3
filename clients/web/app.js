// streamvz web client: protocol v1 over a websocket (docs/protocol.md).
// Server videos and URLs are opened by the server; a local file or the camera is played
// here and pushed as JPEG frames (binary messages) at the chosen fps.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// window.svz is what the page test reads: counts and the text of the last answer.
const svz = (window.svz = { session: null, tokens: 0, answers: {}, done: {}, errors: [], frames: 0,
                            camera: null, preview: null });
let ws = null, pushTimer = null, nextId = 1, stream = null;

function log(cls, text) {
  const div = document.createElement("div");
  div.className = cls;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function connect() {
  return new Promise((resolve, reject) => {
    const token = params.get("token");
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${scheme}://${location.host}/ws` + (token ? `?token=${encodeURIComponent(token)}` : ""));
    ws.binaryType = "arraybuffer";
    ws.onopen = () => resolve();
    ws.onerror = () => reject(new Error("websocket failed"));
    ws.onclose = (e) => { $("status").textContent = `disconnected (${e.code} ${e.reason || ""})`; stopPush(); };
    ws.onmessage = (e) => onMessage(JSON.parse(e.data));
  });
}

const answerDivs = {};
function onMessage(m) {
  switch (m.op) {
    case "opened":
      svz.session = m.session;
      $("status").textContent = `session ${m.session}${m.resumed ? " (resumed)" : ""}`;
      break;
    case "token":
      svz.tokens++;
      svz.answers[m.id] = (svz.answers[m.id] || "") + m.text;
      answerDivs[m.id].textContent = svz.answers[m.id];
      break;
    case "done": {
      svz.done[m.id] = m.usage;
      const u = m.usage || {};
      log("meta", `${u.completion_tokens ?? u.deltas} tokens, first after ${fmt(u.ttft_s)} s, ${u.tokens_per_s == null ? "" : fmt(u.tokens_per_s) + " tok/s, "}${u.finish_reason || ""}`);
      break;
    }
    case "closed":
      svz.session = null;
      $("camera").className = "";
      $("status").textContent = `session ${m.session} closed`;
      break;
    case "status":
      // The periodic poll only updates the counts; the camera badge changes on source events only.
      $("status").textContent = `session ${m.session}: ${m.frames_seen} frames seen, ${m.frames_in_window} in window, ${m.frames_dropped} dropped`;
      if (m.event) cameraEvent(m);
      break;
    case "preview":
      showPreview(m);
      break;
    case "error":
      svz.errors.push(m);
      log("err", `error ${m.code}: ${m.message}`);
      if (m.code === "unreachable_url" || m.code === "source_stalled") setCamera("gone");
      break;
  }
}
// Camera badge: live / reconnecting (gone since HH:MM:SS) / gone since HH:MM:SS / ended.
const clock = (d) => d.toTimeString().slice(0, 8);
function setCamera(state, detail) {
  const prev = svz.camera;
  const since = state === "live" || state === "connecting" ? null : (prev && prev.since) || new Date();
  svz.camera = { state, since, detail: detail || "" };
  const b = $("camera");
  b.className = state === "connecting" ? "reconnecting" : state;
  const text = {
    live: () => "● camera live",
    connecting: () => "camera connecting…",
    reconnecting: () => `camera reconnecting${detail ? " " + detail : ""}, gone since ${clock(since)}`,
    gone: () => `camera gone since ${clock(since)}`,
    ended: () => "video ended",
  }[state];
  b.textContent = text();
}
function cameraEvent(m) {
  if (m.event === "source_connected") {
    setCamera("live");
    if (m.rtsp_transport) log("meta", `camera connected (RTSP over ${m.rtsp_transport.toUpperCase()})`);
  } else if (m.event === "source_disconnected" || m.event === "source_stalled") {
    if (!svz.camera || svz.camera.state === "live") log("meta", `camera lost at ${clock(new Date())}`);
    setCamera("reconnecting");
  } else if (m.event === "source_reconnecting") {
    setCamera("reconnecting", `(attempt ${m.attempt})`);
  } else if (m.event === "source_ended") {
    setCamera("ended");
  }
}

// What the model sees: the latest frame and thumbnails of the frames in its window.
function showPreview(m) {
  svz.preview = { t: m.latest ? m.latest.t : null, window: m.window.length };
  if (!m.latest) return;
  $("sees").className = "on";
  $("latest").src = "data:image/jpeg;base64," + m.latest.jpeg;
  $("latest-caption").textContent = `what the model sees: the latest frame, t = ${m.latest.t.toFixed(1)} s`;
  const strip = $("strip");
  strip.replaceChildren(...m.window.map((f) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/jpeg;base64," + f.jpeg;
    const cap = document.createElement("figcaption");
    cap.textContent = `${f.t.toFixed(1)} s`;
    fig.append(img, cap);
    return fig;
  }));
}

const fmt = (x) => (typeof x === "number" ? x.toFixed(2) : "?");
const send = (obj) => ws.send(JSON.stringify({ v: 1, ...obj }));

async function start() {
  $("start").disabled = true;
  try {
    if (!ws || ws.readyState !== WebSocket.OPEN) await connect();
    const kind = document.querySelector("input[name=kind]:checked").value;
    const fps = parseFloat($("fps").value) || 1;
    const open = { op: "open", fps };
    if (kind === "server") open.source = $("server-video").value;
    if (kind === "url") open.source = $("url").value;
    if (kind === "url" && /^rtsps?:\/\//i.test(open.source)) open.rtsp_transport = $("rtsp-transport").value;
    send(open);
    if (open.source && /^[a-z]+:\/\//i.test(open.source)) setCamera("connecting");
    if (kind === "file" || kind === "camera") await startPush(kind, fps);
    $("stop").disabled = false;
  } catch (e) {
    log("err", String(e));
    $("start").disabled = false;
  }
}

async function startPush(kind, fps) {
  const video = $("video");
  video.style.display = "block";
  if (kind === "camera") {
    stream = await navigator.mediaDevices.getUserMedia({ video: true });
    video.srcObject = stream;
  } else {
    const f = $("file").files[0];
    if (!f) throw new Error("pick a file first");
    video.src = URL.createObjectURL(f);
  }
  await video.play();
  const canvas = document.createElement("canvas");
  pushTimer = setInterval(() => {
    if (!video.videoWidth || ws.readyState !== WebSocket.OPEN) return;
    const scale = Math.min(1, 640 / video.videoWidth);
    canvas.width = Math.round(video.videoWidth * scale);
    canvas.height = Math.round(video.videoHeight * scale);
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    canvas.toBlob((b) => b && b.arrayBuffer().then((buf) => { ws.send(buf); svz.frames++; }), "image/jpeg", 0.8);
  }, 1000 / fps);
}

function stopPush() {
  clearInterval(pushTimer);
  pushTimer = null;
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
}

function stop() {
  stopPush();
  if (ws && ws.readyState === WebSocket.OPEN) send({ op: "close" });
  $("start").disabled = false;
  $("stop").disabled = true;
}

function ask(text) {
  if (!ws || ws.readyState !== WebSocket.OPEN || !svz.session) return log("err", "start a session first");
  const id = `q${nextId++}`;
  log("q", text);
  answerDivs[id] = log("a", "");
  send({ op: "ask", id, text, max_tokens: parseInt(params.get("max_tokens") || "128") });
  return id;
}

$("start").onclick = start;
$("stop").onclick = stop;
$("ask").onsubmit = (e) => {
  e.preventDefault();
  const q = $("question").value.trim();
  if (q) ask(q);
  $("question").value = "";
};
setInterval(() => svz.session && ws.readyState === WebSocket.OPEN && send({ op: "status" }), 2000);
setInterval(() => svz.session && ws.readyState === WebSocket.OPEN && send({ op: "preview" }), 1500);

// The video list needs the same bearer token as the websocket when the server has one.
const auth = params.get("token") ? { headers: { Authorization: `Bearer ${params.get("token")}` } } : {};
fetch("/api/videos", auth).then((r) => (r.ok ? r.json() : [])).then((names) => {
  for (const n of names) $("server-video").add(new Option(n, n));
  // ?source=NAME&ask=QUESTION starts a session on a server video and asks once frames arrived.
  if (params.get("source")) {
    $("server-video").add(new Option(params.get("source"), params.get("source"), true, true));
    start().then(() => {
      const q = params.get("ask");
      if (q) setTimeout(() => ask(q), parseFloat(params.get("ask_after") || "1") * 1000);
    });
  }
});
