// streamkd live page: microphone (getUserMedia + AudioWorklet) or a WAV
// file streamed at real-time pace, over the websocket protocol of
// docs/serve.md. No build step, no external code.
"use strict";

const $ = (id) => document.getElementById(id);
const page = { state: "idle", finals: [], partial: "", error: null };  // read by tests
window.streamkd = page;

function setState(state, text, isError) {
  page.state = state;
  document.body.dataset.state = state;
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function fmtTime(sec) { return sec.toFixed(2).padStart(6, " "); }

// Open a stream; resolves once the server said "ready".
function connect(sampleRate, format) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/`);
  ws.binaryType = "arraybuffer";
  page.finals = [];
  page.partial = "";
  page.error = null;
  $("finals").innerHTML = "";
  $("partial").textContent = "";
  return new Promise((resolve, reject) => {
    ws.onopen = () => ws.send(JSON.stringify({ sample_rate: sampleRate, format: format }));
    ws.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      if (msg.type === "ready") {
        setState("streaming", `streaming at ${sampleRate} Hz (${format})`);
        resolve(ws);
      } else if (msg.type === "partial") {
        page.partial = msg.text;
        $("partial").textContent = msg.text;
      } else if (msg.type === "final") {
        page.finals.push(msg);
        page.partial = "";
        $("partial").textContent = "";
        const li = document.createElement("li");
        const time = document.createElement("span");
        time.className = "time";
        time.textContent = `[${fmtTime(msg.start)} - ${fmtTime(msg.end)} s]`;
        li.append(time, document.createTextNode(msg.text));
        $("finals").append(li);
      } else if (msg.type === "done") {
        setState("done", `done: ${msg.segments} segment(s), ${msg.audio_sec.toFixed(2)} s of audio`);
      } else if (msg.type === "error") {
        page.error = msg;
        setState("error", `error (${msg.code}): ${msg.message}`, true);
        reject(new Error(msg.message));
      }
    };
    ws.onerror = () => { setState("error", "websocket error", true); reject(new Error("websocket error")); };
    ws.onclose = () => { if (page.state === "streaming") setState("closed", "connection closed"); };
  });
}

// ---- microphone ----------------------------------------------------------
let mic = null;

async function startMic() {
  try {
    // The stream is ready before the microphone opens, so no speech is lost.
    const ctx = new AudioContext();
    await ctx.audioWorklet.addModule("capture-worklet.js");
    const ws = await connect(ctx.sampleRate, "float32");
    const media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    const source = ctx.createMediaStreamSource(media);
    const node = new AudioWorkletNode(ctx, "capture");
    node.port.onmessage = (event) => { if (ws.readyState === WebSocket.OPEN) ws.send(event.data); };
    source.connect(node);
    node.connect(ctx.destination);  // a node nobody pulls may not be run; it outputs silence
    mic = { media, ctx, ws, source, node };
    $("mic-start").disabled = true;
    $("mic-stop").disabled = false;
  } catch (err) {
    setState("error", `microphone: ${err.message} (browsers allow it only on localhost or https)`, true);
  }
}

async function stopMic() {
  if (!mic) return;
  mic.source.disconnect();
  mic.node.port.onmessage = null;
  mic.media.getTracks().forEach((t) => t.stop());
  await mic.ctx.close();
  mic.ws.send(JSON.stringify({ type: "done" }));
  setState("finishing", "finishing");
  mic = null;
  $("mic-start").disabled = false;
  $("mic-stop").disabled = true;
}

// ---- WAV upload ----------------------------------------------------------
// PCM 16-bit or float 32-bit WAV -> {rate, format, samples}: mono int16 is
// sent as it is; several channels are averaged and sent as float32.
function parseWav(buffer) {
  const view = new DataView(buffer);
  const tag = (at) => String.fromCharCode(...new Uint8Array(buffer, at, 4));
  if (buffer.byteLength < 12 || tag(0) !== "RIFF" || tag(8) !== "WAVE") throw new Error("not a WAV file");
  let fmt = null;
  for (let at = 12; at + 8 <= buffer.byteLength; at += 8 + view.getUint32(at + 4, true) + (view.getUint32(at + 4, true) & 1)) {
    const size = view.getUint32(at + 4, true);
    if (tag(at) === "fmt ") {
      let code = view.getUint16(at + 8, true);
      if (code === 0xfffe) code = view.getUint16(at + 32, true);  // WAVE_FORMAT_EXTENSIBLE
      fmt = { code, channels: view.getUint16(at + 10, true), rate: view.getUint32(at + 12, true),
              bits: view.getUint16(at + 22, true) };
    } else if (tag(at) === "data" && fmt) {
      const bytes = buffer.slice(at + 8, at + 8 + Math.min(size, buffer.byteLength - at - 8));
      let data;
      if (fmt.code === 1 && fmt.bits === 16) data = new Int16Array(bytes);
      else if (fmt.code === 3 && fmt.bits === 32) data = new Float32Array(bytes);
      else throw new Error(`unsupported WAV encoding (format ${fmt.code}, ${fmt.bits} bits): use PCM 16-bit or float 32-bit`);
      if (fmt.channels === 1) return { rate: fmt.rate, format: fmt.code === 1 ? "int16" : "float32", samples: data };
      const frames = Math.floor(data.length / fmt.channels);
      const mono = new Float32Array(frames);
      const scale = fmt.code === 1 ? 1 / 32768 : 1;
      for (let i = 0; i < frames; i++) {
        let sum = 0;
        for (let c = 0; c < fmt.channels; c++) sum += data[i * fmt.channels + c];
        mono[i] = (sum / fmt.channels) * scale;
      }
      return { rate: fmt.rate, format: "float32", samples: mono };
    }
  }
  throw new Error("no fmt/data chunk in the WAV file");
}

async function streamFile() {
  const file = $("file").files[0];
  if (!file) { setState("error", "choose a WAV file first", true); return; }
  let wav;
  try { wav = parseWav(await file.arrayBuffer()); } catch (err) { setState("error", err.message, true); return; }
  const ws = await connect(wav.rate, wav.format);
  const piece = Math.round(wav.rate / 10);  // 100 ms per message
  const t0 = performance.now();
  for (let at = 0; at < wav.samples.length; at += piece) {
    const block = wav.samples.slice(at, at + piece);
    ws.send(block.buffer);
    // real-time pace: wait until the wall clock catches up with the audio sent
    const ahead = ((at + block.length) / wav.rate) * 1000 - (performance.now() - t0);
    if (ahead > 0) await new Promise((r) => setTimeout(r, ahead));
  }
  ws.send(JSON.stringify({ type: "done" }));
  setState("finishing", "finishing");
}

$("mic-start").onclick = startMic;
$("mic-stop").onclick = stopMic;
$("file-start").onclick = streamFile;
setState("idle", "idle: start the microphone or stream a WAV file");
