// omni chat page: one conversation per tab, clips uploaded as raw bodies, answers read as a
// server-sent-event stream from a POST (fetch + ReadableStream; EventSource only does GET).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { conv: null, clip: null, clipUrl: null, limits: null, busy: false, recorder: null };

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

async function api(path, options = {}) {
  const res = await fetch(path, options);
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try { message = (await res.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return res;
}

async function newConversation() {
  const { id } = await (await api("/api/conversations", { method: "POST" })).json();
  state.conv = id;
  sessionStorage.setItem("omni-chat-conversation", id);
  $("log").replaceChildren($("empty") || document.createElement("p"));
  $("empty").hidden = false;
  setClip(null);
  showError("");
}

// ---- clips ------------------------------------------------------------------------------------
function setClip(clip, url) {
  if (state.clipUrl && state.clipUrl !== url) URL.revokeObjectURL(state.clipUrl);
  state.clip = clip;
  state.clipUrl = clip ? url : null;
  $("attachment").hidden = !clip;
  $("clip-label").textContent = clip
    ? `♪ ${clip.name} · ${clip.seconds.toFixed(1)} s · ${clip.audio_tokens} audio tokens · encoded in ${Math.round(clip.encode_ms)} ms`
    : "";
}

async function uploadClip(blob, name) {
  showError("");
  const limit = state.limits ? state.limits.upload_bytes : Infinity;
  if (blob.size > limit) {
    showError(`${name}: ${(blob.size / 2 ** 20).toFixed(1)} MB is over the ${(limit / 2 ** 20).toFixed(0)} MB upload limit`);
    return;
  }
  $("attachment").hidden = false;
  $("clip-label").textContent = `Uploading and encoding ${name}…`;
  try {
    const res = await api(`/api/conversations/${state.conv}/clips?name=${encodeURIComponent(name)}`, {
      method: "POST", body: blob, headers: { "Content-Type": blob.type || "application/octet-stream" },
    });
    setClip(await res.json(), URL.createObjectURL(blob));
  } catch (e) {
    setClip(null);
    showError(e.message);
  }
}

// Chromium records WebM/Opus, which the server's libsndfile cannot read: decode the recording
// here and send 16 kHz mono 16-bit WAV.
async function toWav(blob) {
  const ctx = new AudioContext();
  const decoded = await ctx.decodeAudioData(await blob.arrayBuffer());
  ctx.close();
  const rate = 16000;
  const offline = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * rate)), rate);
  const src = offline.createBufferSource();
  src.buffer = decoded;
  src.connect(offline.destination);
  src.start();
  const pcm = (await offline.startRendering()).getChannelData(0);
  const view = new DataView(new ArrayBuffer(44 + pcm.length * 2));
  const text = (at, s) => [...s].forEach((c, i) => view.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + pcm.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true); view.setUint16(34, 16, true);
  text(36, "data"); view.setUint32(40, pcm.length * 2, true);
  pcm.forEach((x, i) => view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, x)) * 0x7fff, true));
  return new Blob([view], { type: "audio/wav" });
}

async function toggleRecording() {
  const button = $("record");
  if (state.recorder) { state.recorder.stop(); return; }
  showError("");
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    showError("This browser cannot record here (the microphone needs https or localhost). Upload a file instead.");
    return;
  }
  let stream;
  try {
    // the voice as it is: Whisper was trained on unprocessed audio, and noise suppression or automatic
    // gain would reshape the very texture (pitch, breathiness, loudness) the model is asked about
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (e) {
    showError(`Microphone unavailable: ${e.message}`);
    return;
  }
  const chunks = [];
  const recorder = new MediaRecorder(stream);
  const started = Date.now();
  const tick = setInterval(() => {
    const s = Math.floor((Date.now() - started) / 1000);
    button.textContent = `■ Stop (${s} s)`;
    if (state.limits && s >= state.limits.clip_seconds) recorder.stop();  // the model's longest clip
  }, 250);
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.onstop = async () => {
    clearInterval(tick);
    stream.getTracks().forEach((t) => t.stop());
    state.recorder = null;
    button.classList.remove("recording");
    button.textContent = "● Record";
    const raw = new Blob(chunks, { type: recorder.mimeType });
    let wav;
    try { wav = await toWav(raw); } catch (e) {
      showError(`Could not decode the recording in the browser (${e.message}); sending it as recorded.`);
      wav = raw;
    }
    await uploadClip(wav, wav === raw ? "recording" : "recording.wav");
  };
  state.recorder = recorder;
  recorder.start();
  button.classList.add("recording");
  button.textContent = "■ Stop (0 s)";
}

// ---- turns ------------------------------------------------------------------------------------
function addTurn(kind, text) {
  $("empty").hidden = true;
  const turn = document.createElement("div");
  turn.className = `turn ${kind}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;
  turn.append(bubble);
  $("log").append(turn);
  return { turn, bubble };
}

function settings() {
  const num = (id) => Number($(id).value);
  return { temperature: num("temperature"), top_k: num("top_k"), top_p: num("top_p"), max_new_tokens: num("max_new_tokens") };
}

async function send(event) {
  event.preventDefault();
  if (state.busy) return;
  const text = $("text").value.trim();
  if (!text && !state.clip) { showError("Type a question or attach a clip."); return; }
  showError("");
  const clip = state.clip;
  const user = addTurn("user", text || (clip ? "(no question: transcribe)" : ""));
  if (clip) {
    const label = document.createElement("div");
    label.className = "clip";
    label.textContent = `♪ ${clip.name} (${clip.seconds.toFixed(1)} s)`;
    const player = document.createElement("audio");
    player.controls = true;
    player.src = state.clipUrl;
    user.bubble.append(label, player);
    state.clipUrl = null;  // the player owns the URL now
  }
  const bot = addTurn("bot", "");
  bot.bubble.classList.add("streaming");
  const stats = document.createElement("div");
  stats.className = "stats";
  bot.turn.append(stats);
  $("log").scrollTop = $("log").scrollHeight;
  state.busy = true;
  $("send").disabled = true;
  try {
    const res = await api(`/api/conversations/${state.conv}/messages`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text, clip: clip ? clip.id : null, ...settings() }),
    });
    $("text").value = "";
    setClip(null);
    await readEvents(res, (ev) => {
      if (ev.event === "token") {
        bot.bubble.textContent += ev.text;
        $("log").scrollTop = $("log").scrollHeight;
      } else if (ev.event === "done") {
        bot.bubble.textContent = ev.text;  // the whole answer, exactly as decoded at once
        const rate = ev.tokens_per_s == null ? "" : ` · ${ev.tokens_per_s.toFixed(1)} tokens/s`;
        stats.textContent = `first token ${Math.round(ev.first_token_ms)} ms${rate} · ${ev.tokens} tokens`;
        if (!ev.text) bot.bubble.textContent = "(empty answer: the model stopped at once)";
      } else if (ev.event === "error") {
        throw new Error(ev.message);
      }
    });
  } catch (e) {
    bot.bubble.classList.add("failed");
    bot.bubble.textContent = e.message;
  } finally {
    bot.bubble.classList.remove("streaming");
    state.busy = false;
    $("send").disabled = false;
  }
}

async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

// ---- start ------------------------------------------------------------------------------------
async function start() {
  try {
    const info = await (await api("/api/info")).json();
    state.limits = info.limits;
    $("model").textContent = info.model;
    const L = info.limits;
    $("max_new_tokens").max = L.max_new_tokens;
    $("text").maxLength = L.message_chars;
    $("limits").textContent = `Clips up to ${L.clip_seconds} s and ${(L.upload_bytes / 2 ** 20).toFixed(0)} MB; ` +
      `questions up to ${L.message_chars} characters; clip + question + answer within ${L.sequence_len} positions.`;
    // a reload keeps this tab's conversation (the server holds its history)
    const saved = sessionStorage.getItem("omni-chat-conversation");
    const res = saved ? await fetch(`/api/conversations/${saved}`) : null;
    if (res && res.ok) {
      state.conv = saved;
      for (const t of (await res.json()).history) {
        addTurn("user", (t.question || "(no question)") + (t.clip ? `\n♪ ${t.clip}` : ""));
        const bot = addTurn("bot", t.answer);
        const stats = document.createElement("div");
        stats.className = "stats";
        stats.textContent = `first token ${Math.round(t.first_token_ms)} ms`;
        bot.turn.append(stats);
      }
    } else {
      await newConversation();
    }
  } catch (e) {
    showError(`The server did not answer: ${e.message}`);
  }
}

for (const id of ["temperature", "top_p"]) {
  $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
}
$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  $("file").value = "";  // choosing the same file again still fires change
  if (file) uploadClip(file, file.name);
});
$("record").addEventListener("click", toggleRecording);
$("detach").addEventListener("click", () => setClip(null));
$("new").addEventListener("click", () => newConversation().catch((e) => showError(e.message)));
$("composer").addEventListener("submit", send);
$("text").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
start();
