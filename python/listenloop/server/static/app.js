// listenloop browser client: microphone -> AudioWorklet (16 kHz float32) -> WebSocket /v1/pcm,
// and the server's events -> replies, p_speak timeline, connection and drop status.
// Plain script, no dependencies; every asset comes from the same server.
"use strict";

(function () {
  const OUT_RATE = 16000;
  const BLOCK_MS = 50; // audio per binary frame
  const TIMELINE_S = 30; // seconds of decisions the timeline shows
  const MAX_BUFFERED_BYTES = 512 * 1024; // about 8 s of f32 audio waiting in the socket
  const MAX_REPLIES = 50;
  const MAX_NOTICES = 6;
  const EMOJI = {
    HAPPY: ["😊", "happy"],
    SAD: ["😢", "sad"],
    ANGRY: ["😠", "angry"],
    SURPRISE: ["😲", "surprised"],
    NORMAL: ["😐", "neutral"],
    URGENT: ["⚠️", "urgent"],
  };
  const NO_EMOTION = ["💬", "reply"];

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    start: $("start"),
    model: $("model"),
    replies: $("replies"),
    noReplies: $("no-replies"),
    timeline: $("timeline"),
    pLast: $("p-last"),
    dropSamples: $("drop-samples"),
    dropEvents: $("drop-events"),
    dropClipped: $("drop-clipped"),
    dropLocal: $("drop-local"),
    stats: $("stats"),
    notices: $("notices"),
  };

  // ---- state -------------------------------------------------------------------------

  let conn = null; // the active connection: {ws, audio, stream, node, stopping}
  let decisions = []; // {t, p, spoke}
  let currentReply = null; // the <li> of the reply being streamed
  const drops = { samples: 0, events: 0, clipped: 0, local: 0, statsSamples: 0, statsEvents: 0 };

  // ---- status --------------------------------------------------------------------------

  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text;
  }

  function setButton(running) {
    ui.start.textContent = running ? "Stop" : "Start listening";
    ui.start.setAttribute("aria-pressed", running ? "true" : "false");
    ui.start.classList.toggle("running", running);
  }

  function notice(text, kind) {
    const li = document.createElement("li");
    li.className = kind || "info";
    li.textContent = text;
    ui.notices.prepend(li);
    while (ui.notices.children.length > MAX_NOTICES) ui.notices.lastChild.remove();
  }

  function fmtCount(n) {
    return n.toLocaleString("en-US");
  }

  function renderDrops() {
    const samples = Math.max(drops.samples, drops.statsSamples);
    const events = Math.max(drops.events, drops.statsEvents);
    const set = (el, value, text) => {
      el.dataset.value = String(value);
      el.textContent = text;
      el.classList.toggle("bad", value > 0);
    };
    const seconds = samples ? ` (${(samples / OUT_RATE).toFixed(1)} s)` : "";
    set(ui.dropSamples, samples, `${fmtCount(samples)} samples${seconds}`);
    set(ui.dropEvents, events, fmtCount(events));
    set(ui.dropClipped, drops.clipped, `${fmtCount(drops.clipped)} samples`);
    set(ui.dropLocal, drops.local, `${fmtCount(drops.local)} samples`);
  }

  // ---- replies -------------------------------------------------------------------------

  function emotionOf(name) {
    return (name && EMOJI[name]) || NO_EMOTION;
  }

  function newReply(chunk, emotion, streamTime) {
    const li = document.createElement("li");
    li.className = "reply";
    li.dataset.state = "streaming";
    if (chunk !== undefined && chunk !== null) li.dataset.chunk = String(chunk);
    const icon = document.createElement("span");
    icon.className = "emoji";
    icon.setAttribute("role", "img");
    const body = document.createElement("div");
    body.className = "body";
    const text = document.createElement("p");
    text.className = "text";
    const meta = document.createElement("p");
    meta.className = "meta";
    body.append(text, meta);
    li.append(icon, body);
    li._text = text;
    li._meta = meta;
    li._icon = icon;
    li._streamTime = streamTime;
    setEmotion(li, emotion);
    ui.replies.prepend(li);
    while (ui.replies.children.length > MAX_REPLIES) ui.replies.lastChild.remove();
    ui.noReplies.hidden = true;
    return li;
  }

  function setEmotion(li, emotion) {
    const [emoji, label] = emotionOf(emotion);
    li.dataset.emotion = emotion || "";
    li._icon.textContent = emoji;
    li._icon.setAttribute("aria-label", label);
    li._icon.title = emotion || "no emotion";
    const at = typeof li._streamTime === "number" ? `at ${li._streamTime.toFixed(1)} s` : "";
    li._meta.textContent = [emotion ? emotion.toLowerCase() : "", at].filter(Boolean).join(" · ");
  }

  // ---- timeline ------------------------------------------------------------------------

  let drawPending = false;

  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      drawTimeline();
    });
  }

  function drawTimeline() {
    const canvas = ui.timeline;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(canvas.clientWidth * dpr));
    const h = Math.max(1, Math.round(canvas.clientHeight * dpr));
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w;
      canvas.height = h;
    }
    const ctx = canvas.getContext("2d");
    const css = getComputedStyle(document.documentElement);
    const color = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
    ctx.clearRect(0, 0, w, h);

    const pad = { left: 30 * dpr, right: 6 * dpr, top: 6 * dpr, bottom: 18 * dpr };
    const plotW = w - pad.left - pad.right;
    const plotH = h - pad.top - pad.bottom;
    const latest = decisions.length ? decisions[decisions.length - 1].t : 0;
    const end = Math.max(latest, TIMELINE_S);
    const begin = end - TIMELINE_S;
    const x = (t) => pad.left + ((t - begin) / TIMELINE_S) * plotW;
    const y = (p) => pad.top + (1 - p) * plotH;

    // grid and axis labels
    ctx.font = `${11 * dpr}px system-ui, sans-serif`;
    ctx.fillStyle = color("--muted", "#555");
    ctx.strokeStyle = color("--grid", "#ddd");
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (const p of [0, 0.5, 1]) {
      const yy = Math.round(y(p)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.left, yy);
      ctx.lineTo(w - pad.right, yy);
      ctx.stroke();
      ctx.fillText(p.toFixed(1), pad.left - 4 * dpr, yy);
    }
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText(`${begin.toFixed(0)} s`, pad.left, h - 4 * dpr);
    ctx.textAlign = "right";
    ctx.fillText(`${end.toFixed(0)} s`, w - pad.right, h - 4 * dpr);

    // one bar per decision, ending at the decision's stream time
    const barW = Math.max(1, (0.4 / TIMELINE_S) * plotW - 1 * dpr);
    const listen = color("--bar", "#2563eb");
    const spoke = color("--bar-spoke", "#c2410c");
    for (const d of decisions) {
      if (d.t <= begin) continue;
      const left = x(d.t) - barW;
      const top = Math.min(y(Math.min(1, Math.max(0, d.p))), y(0) - 2 * dpr); // 0 still shows a sliver
      ctx.fillStyle = d.spoke ? spoke : listen;
      ctx.fillRect(left, top, barW, y(0) - top);
    }

    if (decisions.length) {
      const d = decisions[decisions.length - 1];
      const summary = `p_speak ${d.p.toFixed(2)} at ${d.t.toFixed(1)} s` + (d.spoke ? ", replied" : "");
      canvas.setAttribute("aria-label", `Speak probability timeline; latest ${summary}`);
      ui.pLast.textContent = `latest: ${summary}`;
    } else {
      canvas.setAttribute("aria-label", "No decisions yet");
      ui.pLast.textContent = "";
    }
  }

  window.addEventListener("resize", scheduleDraw);

  // ---- events --------------------------------------------------------------------------

  function handleEvent(ev) {
    switch (ev.event) {
      case "Ready":
        ui.model.textContent = `Model ${ev.model} · microphone ${conn ? conn.audio.sampleRate : "?"} Hz, ` +
          `sent at ${OUT_RATE} Hz`;
        ui.model.title = `session ${ev.session}`;
        setStatus("listening", "listening");
        startAudio();
        break;
      case "Decision":
        decisions.push({ t: ev.stream_time, p: ev.p_speak, spoke: ev.spoke });
        if (decisions.length > 4 * (TIMELINE_S / 0.4)) decisions = decisions.slice(-2 * (TIMELINE_S / 0.4));
        scheduleDraw();
        break;
      case "ReplyStarted":
        currentReply = newReply(ev.chunk, ev.emotion, ev.stream_time);
        break;
      case "TextDelta":
        if (!currentReply) currentReply = newReply(null, null, ev.stream_time);
        currentReply._text.textContent += ev.text;
        break;
      case "ReplyEnded": {
        const li = currentReply || newReply(ev.chunk, null, ev.stream_time);
        li._text.textContent = ev.text;
        li.dataset.state = "done";
        if (ev.truncated) {
          li.dataset.truncated = "true";
          li._meta.textContent += " · truncated";
        }
        currentReply = null;
        break;
      }
      case "AudioDropped":
        drops.samples += ev.samples;
        renderDrops();
        notice(`${fmtCount(ev.samples)} samples dropped: ${ev.reason}`, "warn");
        break;
      case "AudioClipped":
        drops.clipped += ev.samples;
        renderDrops();
        if (ev.int_pcm_as_float) notice(`Clipped audio: ${ev.reason}`, "warn");
        break;
      case "EventsDropped":
        drops.events += ev.count;
        renderDrops();
        break;
      case "ContextReset":
        notice(`Context reset before chunk ${ev.chunk}: ${ev.reason}`, "info");
        break;
      case "Fault":
        notice(`Fault in ${ev.where}: ${ev.message}`, "warn");
        break;
      case "Stats":
        drops.statsSamples = ev.dropped_samples || 0;
        drops.statsEvents = ev.dropped_events || 0;
        renderDrops();
        ui.stats.textContent =
          `${fmtCount(ev.chunks)} chunks decided · step ${Number(ev.step_ms).toFixed(1)} ms · ` +
          `real-time factor ${Number(ev.real_time_factor).toFixed(2)}` +
          (ev.capacity ? ` · context ${ev.position}/${ev.capacity}` : "");
        break;
      case "Finished":
        setStatus("finished", `finished (${fmtCount(ev.chunks)} chunks)`);
        break;
      case "Error":
        notice(`Error${ev.code ? ` (${ev.code})` : ""}: ${ev.message}`, "error");
        if (conn) conn.error = ev.message;
        break;
      default:
        break; // events this page does not show
    }
  }

  // ---- audio and socket ----------------------------------------------------------------

  function socketUrl() {
    const page = new URLSearchParams(location.search);
    const query = new URLSearchParams({ rate: String(OUT_RATE), format: "f32" });
    for (const name of ["key", "speak_bias"]) {
      if (page.has(name)) query.set(name, page.get(name));
    }
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/v1/pcm?${query}`;
  }

  function sendBlock(block) {
    const c = conn;
    if (!c || c.stopping || c.ws.readyState !== WebSocket.OPEN) return;
    if (c.ws.bufferedAmount > MAX_BUFFERED_BYTES) {
      drops.local += block.length;
      renderDrops();
      return;
    }
    // Float32Array bytes are in the platform's order: little-endian on every browser platform.
    c.ws.send(block.buffer);
  }

  function startAudio() {
    const c = conn;
    if (!c || c.node || c.stopping) return;
    const source = c.audio.createMediaStreamSource(c.stream);
    const node = new AudioWorkletNode(c.audio, "pcm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { blockMs: BLOCK_MS },
    });
    node.port.onmessage = (event) => sendBlock(event.data);
    source.connect(node);
    c.source = source;
    c.node = node;
  }

  function stopAudio(c) {
    if (c.node) {
      c.node.port.postMessage({ type: "stop" });
      c.node.port.onmessage = null;
      c.source.disconnect();
    }
    if (c.stream) c.stream.getTracks().forEach((t) => t.stop());
    if (c.audio && c.audio.state !== "closed") c.audio.close().catch(() => {});
  }

  async function start() {
    if (conn) return;
    decisions = [];
    currentReply = null;
    Object.keys(drops).forEach((k) => (drops[k] = 0));
    renderDrops();
    scheduleDraw();
    setButton(true);
    setStatus("connecting", "connecting…");

    // Created inside the click handler: browsers only let a user gesture start audio.
    const audio = new AudioContext();
    const c = { ws: null, audio, stream: null, node: null, source: null, stopping: false, opened: false, error: null };
    conn = c;
    try {
      const resume = audio.resume();
      c.stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: false, channelCount: 1 },
      });
      await resume;
      await audio.audioWorklet.addModule("/static/worklet.js" + (window.LISTENLOOP_ASSET_QUERY || ""));
    } catch (err) {
      fail(c, `microphone unavailable: ${err && err.message ? err.message : err}`);
      return;
    }
    if (c.stopping) return;
    ui.model.textContent = `Capturing at ${audio.sampleRate} Hz, sending ${OUT_RATE} Hz.`;

    const ws = new WebSocket(socketUrl());
    ws.binaryType = "arraybuffer";
    c.ws = ws;
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") return;
      let ev;
      try {
        ev = JSON.parse(event.data);
      } catch (err) {
        notice("Unreadable message from the server", "error");
        return;
      }
      handleEvent(ev);
    };
    ws.onopen = () => {
      c.opened = true;
    };
    ws.onclose = async (event) => {
      stopAudio(c);
      if (conn === c) conn = null;
      setButton(false);
      if (ui.status.dataset.state === "finished") {
        setStatus("closed", `closed: ${ui.status.textContent}`);
        return;
      }
      let reason = event.reason || c.error || "";
      if (!c.opened && !c.stopping) {
        setStatus("closed", "closed: connection refused");
        reason = (await refusalReason()) || "connection refused or server unreachable";
      } else if (!reason) {
        reason = c.stopping ? "stopped" : event.code === 1006 ? "connection lost" : `code ${event.code}`;
      }
      if (!conn) setStatus("closed", `closed: ${reason}`);
    };
    ws.onerror = () => {
      c.error = c.error || "connection error";
    };
  }

  // Why the server refused the WebSocket (wrong key, foreign origin, session limit): the
  // browser hides the HTTP answer of a refused upgrade, a plain GET of the same URL shows it.
  async function refusalReason() {
    try {
      const url = socketUrl().replace(/^ws/, "http");
      const response = await fetch(url, { cache: "no-store" });
      if (response.ok) return null;
      const body = await response.json();
      return body && body.error && body.error.message ? `${body.error.message} (HTTP ${response.status})` : null;
    } catch (err) {
      return null;
    }
  }

  function fail(c, message) {
    stopAudio(c);
    if (conn === c) conn = null;
    setButton(false);
    setStatus("closed", `closed: ${message}`);
  }

  function stop() {
    const c = conn;
    if (!c || c.stopping) return;
    c.stopping = true;
    stopAudio(c);
    if (c.ws && c.ws.readyState === WebSocket.OPEN) {
      setStatus("finishing", "finishing…");
      c.ws.send(JSON.stringify({ type: "finish" }));
      // The server sends the remaining events and closes; close from here if it does not.
      setTimeout(() => {
        if (c.ws.readyState === WebSocket.OPEN) c.ws.close(1000, "stopped");
      }, 15000);
    } else {
      if (c.ws) c.ws.close();
      fail(c, "stopped");
    }
  }

  ui.start.addEventListener("click", () => (conn ? stop() : start()));
  renderDrops();
  scheduleDraw();
})();
