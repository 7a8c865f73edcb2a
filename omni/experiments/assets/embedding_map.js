// The interactive embedding map (omni.embedding_page): inlined into embedding_map.html at run time.
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = id => document.getElementById(id), cv = $("cv"), ctx = cv.getContext("2d"), tip = $("tip");
const PAL = ["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b","#e377c2","#17becf","#bcbd22","#7f7f7f",
  "#aec7e8","#ffbb78","#98df8a","#ff9896","#c5b0d5","#c49c94","#f7b6d2","#9edae5","#dbdb8d","#393b79"];
const VIR = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
const STAGE = {1: "#e6862a", 2: "#2a6fd6"}, KIND = ["LM token", "before", "after"];
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"})[c]);
let R, P = [], pinned = -1, colours = null, legend = "";
D.runs.forEach((r, i) => $("run").add(new Option(r.name, i)));
function label(i, key) {
  const k = R.kind[i]; if (k === 0) return null;
  const c = R.clips[R.clip[i]], p = R.pos[i];
  if (key === "stage") return KIND[k];
  if (key === "word") { const w = c.tw[p]; return w >= 0 ? c.words[w].toLowerCase().replace(/[^\w']/g, "") : ""; }
  if (key === "position") return (p + 0.5) * R.spt;
  if (key === "clip") return R.clip[i];
  return c.labels[key] === undefined ? "" : c.labels[key];
}
function setRun() {
  R = D.runs[+$("run").value];
  $("proj").innerHTML = ""; Object.keys(R.xy).forEach(k => $("proj").add(new Option(k.toUpperCase(), k)));
  const keys = ["stage", "word", "position", "clip"].concat(Object.keys(R.clips[0] ? R.clips[0].labels : {}));
  const old = $("colour").value; $("colour").innerHTML = ""; keys.forEach(k => $("colour").add(new Option(k, k)));
  $("colour").value = keys.includes(old) ? old : "stage";
  stats(); setColour();
}
function setColour() {
  const key = $("colour").value, n = R.kind.length, vals = [];
  for (let i = 0; i < n; i++) vals.push(label(i, key));
  colours = new Array(n).fill("#c8c8c8"); legend = "";
  const audio = vals.filter((v, i) => R.kind[i] > 0);
  if (key === "stage") { for (let i = 0; i < n; i++) if (R.kind[i]) colours[i] = STAGE[R.kind[i]];
    legend = '<span><i style="background:#e6862a"></i>audio before training</span><span><i style="background:#2a6fd6"></i>audio after</span><span><i style="background:#c8c8c8"></i>LM tokens</span>';
  } else if (audio.length && audio.every(v => typeof v === "number") && key !== "clip") {
    const lo = Math.min(...audio), hi = Math.max(...audio);
    for (let i = 0; i < n; i++) if (R.kind[i]) { const t = hi > lo ? (vals[i] - lo) / (hi - lo) : 0.5, f = t * 4, j = Math.min(3, Math.floor(f)), u = f - j;
      colours[i] = "rgb(" + VIR[j].map((a, m) => Math.round(a + (VIR[j + 1][m] - a) * u)).join(",") + ")"; }
    legend = key + ": " + lo.toFixed(2) + ' <span style="display:inline-block;width:160px;height:10px;background:linear-gradient(90deg,' +
      VIR.map(c => "rgb(" + c + ")").join(",") + ')"></span> ' + hi.toFixed(2);
  } else {
    const count = {}; audio.forEach(v => { count[v] = (count[v] || 0) + 1; });
    const cats = Object.keys(count).filter(c => c !== "").sort((a, b) => count[b] - count[a] || (a < b ? -1 : 1)).slice(0, PAL.length);
    const col = {}; cats.forEach((c, j) => { col[c] = PAL[j]; });
    for (let i = 0; i < n; i++) if (R.kind[i]) colours[i] = col[vals[i]] || "#8a8a8a";
    legend = cats.map(c => '<span><i style="background:' + col[c] + '"></i>' + esc(c) + " (" + count[c] + ")</span>").join("") +
      (Object.keys(count).length > cats.length ? "<span>other / silence: grey</span>" : "");
  }
  $("legend").innerHTML = legend; draw();
}
const fmt = v => v === null || v === undefined ? "–" : (+v).toFixed(3);
function stats() {
  const st = R.stats, keys = Object.keys(st.before);
  let h = "<table><tr><th>statistic</th><th>before</th><th>after</th></tr>";
  keys.forEach(k => { h += "<tr><td>" + esc(k) + "</td><td>" + fmt(st.before[k]) + "</td><td>" + fmt(st.after[k]) + "</td></tr>"; });
  h += "</table>";
  if (R.timing && R.timing.clips) h += '<p class="note">Word timing check (chars vs espeak, ' + R.timing.clips + " clips): " +
    (100 * R.timing.token_agreement).toFixed(1) + "% of audio tokens get the same word, onset error " + (1000 * R.timing.onset_error_mean).toFixed(0) + " ms on average.</p>";
  $("stats").innerHTML = h;
}
function visible(i) {
  const s = $("show").value, k = R.kind[i];
  return k === 0 || s === "all" || (s === "before" && k === 1) || (s === "after" && k === 2);
}
function draw() {
  const xy = R.xy[$("proj").value], n = R.kind.length, W = cv.width, H = cv.height, pad = 20;
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (let i = 0; i < n; i++) { const x = xy[2 * i], y = xy[2 * i + 1];  // all points: the frame never moves
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  const sx = (W - 2 * pad) / ((x1 - x0) || 1), sy = (H - 2 * pad) / ((y1 - y0) || 1);
  P = new Array(n);
  for (let i = 0; i < n; i++) P[i] = [pad + (xy[2 * i] - x0) * sx, H - pad - (xy[2 * i + 1] - y0) * sy];
  ctx.clearRect(0, 0, W, H);
  const q = $("find").value.trim().toLowerCase(), hit = i => {
    if (!q) return false;
    if (R.kind[i] === 0) return (R.vocab[R.pos[i]] || "").replace(/·/g, "").toLowerCase() === q;
    return label(i, "word") === q; };
  for (const pass of [0, 1, 2]) for (let i = 0; i < n; i++) {
    if (!visible(i)) continue;
    const h = hit(i);  // passes: LM tokens, audio tokens, then whatever the search found, on top
    if (pass === 2 ? !h : h || (pass === 0) !== (R.kind[i] === 0)) continue;
    ctx.globalAlpha = q && !h ? 0.25 : 1;
    ctx.fillStyle = h ? "#d00" : colours[i];
    const r = h ? 4 : (R.kind[i] ? 2.2 : 1.6);
    ctx.beginPath(); ctx.arc(P[i][0], P[i][1], r, 0, 6.2832); ctx.fill();
  }
  ctx.globalAlpha = 1;
  if (pinned >= 0) for (const k of [1, 2]) {
    const idx = []; for (let i = 0; i < n; i++) if (R.kind[i] === k && R.clip[i] === pinned && visible(i)) idx.push(i);
    idx.sort((a, b) => R.pos[a] - R.pos[b]);
    ctx.strokeStyle = STAGE[k]; ctx.lineWidth = 1.2; ctx.beginPath();
    idx.forEach((i, j) => j ? ctx.lineTo(P[i][0], P[i][1]) : ctx.moveTo(P[i][0], P[i][1])); ctx.stroke();
    idx.forEach(i => { ctx.fillStyle = STAGE[k]; ctx.beginPath(); ctx.arc(P[i][0], P[i][1], 3.5, 0, 6.2832); ctx.fill(); });
  }
}
function nearest(ev) {
  const b = cv.getBoundingClientRect(), mx = (ev.clientX - b.left) * cv.width / b.width, my = (ev.clientY - b.top) * cv.height / b.height;
  let best = -1, bd = 64;
  for (let i = 0; i < P.length; i++) if (visible(i)) { const d = (P[i][0] - mx) ** 2 + (P[i][1] - my) ** 2;
    if (d < bd || (d === bd && R.kind[i] > 0)) { bd = d; best = i; } }
  return best;
}
function describe(i) {
  if (R.kind[i] === 0) { const t = R.pos[i]; const n = R.clips.filter(c => c.ids.includes(t)).length;
    return "<b>LM token</b> " + t + " <code>" + esc(R.vocab[t]) + "</code><br>in " + n + " of the " + R.clips.length + " transcripts"; }
  const c = R.clips[R.clip[i]], p = R.pos[i], w = c.tw[p];
  const text = c.words.map((x, j) => j === w ? "<b><u>" + esc(x) + "</u></b>" : esc(x)).join(" ");
  const lab = Object.entries(c.labels).map(([k, v]) => k + "=" + esc(v)).join(", ");
  const nn = R.nn[i].map((t, j) => "<code>" + esc(R.vocab[t]) + "</code> " + R.nns[i][j].toFixed(2)).join(", ");
  return "<b>audio token " + KIND[R.kind[i]] + " training</b>, clip " + R.clip[i] + ", token " + p + " (t=" + ((p + 0.5) * R.spt).toFixed(2) +
    " s, word " + (w >= 0 ? "<b>" + esc(c.words[w]) + "</b>" : "none") + ", timing " + c.timing + ")<br>" + text +
    '<br><span style="color:#666">' + lab + "</span><br>nearest LM tokens: " + nn;
}
cv.addEventListener("mousemove", ev => { const i = nearest(ev); if (i < 0) { tip.style.display = "none"; return; }
  tip.innerHTML = describe(i); tip.style.display = "block";
  const b = cv.getBoundingClientRect(), x = ev.clientX - b.left, y = ev.clientY - b.top;
  tip.style.left = Math.min(x + 14, cv.clientWidth - 430) + "px"; tip.style.top = (y + 14) + "px"; });
cv.addEventListener("mouseleave", () => { tip.style.display = "none"; });
cv.addEventListener("click", ev => { const i = nearest(ev); pinned = i >= 0 && R.kind[i] > 0 ? R.clip[i] : -1; draw(); });
$("run").onchange = () => { pinned = -1; setRun(); };
$("proj").onchange = draw; $("show").onchange = draw; $("colour").onchange = setColour; $("find").oninput = draw;
setRun();
