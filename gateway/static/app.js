/* tokenbus chat: one session over the gateway's WebSocket protocol (gateway/ws.py).
 *
 * The page keeps, in localStorage, the session (id, token, ws_url), the transcript and the
 * position (epoch, offset) of the last session event applied to it. Transcript and position
 * are saved together, so a reconnect or a reload resumes exactly where the transcript stands:
 * the gateway replays everything after that offset once, or says "resync" when it cannot.
 *
 * Every prompt carries an idempotency key, a fresh random one per message typed. A prompt the
 * gateway did not confirm before the connection dropped (it may or may not have enqueued it) is
 * sent again, with the same key, on the next connection: the gateway makes one job of all of
 * them, so the answer comes once either way.
 */
"use strict";

(() => {
  const STORE = "tokenbus.chat.v1";
  const KEY_STORE = "tokenbus.apiKey";
  const BACKOFF_MIN_MS = 250;
  const BACKOFF_MAX_MS = 5000;
  const STABLE_MS = 3000; // a connection that lived this long resets the backoff
  // Close codes of a gateway that stops on purpose (shared/close_codes.py): 1012 "service
  // restart" when it drains, 1001 from older ones. Reconnect at once: the address leads to
  // another gateway (or this one's replacement), and the offset resumes the answer there.
  const GONE = new Set([1012, 1001]);
  const SAVE_DELAY_MS = 200;
  const BUSY = new Set(["queued", "streaming"]);
  const MAX_SUBMITS = 5; // sends of one prompt (the first and its resends) before giving up
  const TERMINAL = new Set(["done", "stopped", "error"]);

  const $ = (id) => document.getElementById(id);
  const el = {
    app: $("app"),
    status: $("status"),
    transcript: $("transcript"),
    empty: $("empty"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    fresh: $("new-conversation"),
    keyForm: $("apikey-form"),
    keyInput: $("apikey-input"),
    keyError: $("apikey-error"),
  };

  // ---- state --------------------------------------------------------------------------------
  /** @type {{session: null | {session_id: string, token: string, ws_url: string},
   *          epoch: string | null, offset: number, seq: number, items: Array<object>}} */
  let state = blankState(null);
  let ws = null;
  let wsGen = 0; // bumped for every socket; events of an older one are ignored
  let connected = false;
  let openedAt = 0;
  let backoff = BACKOFF_MIN_MS;
  let retryTimer = null;
  let saveTimer = null;
  let creating = false;
  const nodes = new Map(); // item id -> its element

  // What tests (and curious people) can read.
  window.tokenbusReconnects = 0;
  window.tokenbusStatusLog = [];
  window.tokenbusCloseCodes = [];
  window.tokenbusDrainReconnects = 0; // reconnects made at once, on a draining gateway's word
  window.tokenbus = {
    get sessionId() {
      return state.session ? state.session.session_id : null;
    },
    get position() {
      return { epoch: state.epoch, offset: state.offset };
    },
    get connected() {
      return connected;
    },
  };

  function blankState(session) {
    return { v: 1, session, epoch: null, offset: 0, seq: 0, items: [] };
  }

  function load() {
    try {
      const saved = JSON.parse(localStorage.getItem(STORE) || "null");
      if (saved && saved.v === 1 && saved.session && Array.isArray(saved.items)) {
        // Socket generations restart with the page: nothing was sent on this page's sockets.
        for (const item of saved.items) item.sentOn = 0;
        return saved;
      }
    } catch (_) {
      /* unreadable: start over */
    }
    return blankState(null);
  }

  function saveNow() {
    clearTimeout(saveTimer);
    saveTimer = null;
    try {
      if (state.session) localStorage.setItem(STORE, JSON.stringify(state));
      else localStorage.removeItem(STORE);
    } catch (_) {
      /* storage full or blocked: the page still works, a reload just resumes less */
    }
  }

  function save() {
    if (saveTimer === null) saveTimer = setTimeout(saveNow, SAVE_DELAY_MS);
  }

  // ---- status and controls -----------------------------------------------------------------
  const STATUS_TEXT = {
    connecting: "connecting…",
    connected: "connected",
    reconnecting: "reconnecting…",
    "needs-key": "API key needed",
    offline: "offline",
  };

  function setStatus(status) {
    if (el.status.dataset.status === status) return;
    el.status.dataset.status = status;
    el.status.textContent = STATUS_TEXT[status] || status;
    window.tokenbusStatusLog.push(status);
    updateControls();
  }

  function busyItem() {
    for (let i = state.items.length - 1; i >= 0; i--) {
      const item = state.items[i];
      if (item.role === "assistant" && BUSY.has(item.state)) return item;
    }
    return null;
  }

  function updateControls() {
    const busy = busyItem();
    el.send.disabled = !connected || busy !== null || el.prompt.value.trim() === "";
    el.stop.disabled = !connected || busy === null || Boolean(busy.stopping);
    el.fresh.disabled = creating;
    el.app.dataset.sessionId = state.session ? state.session.session_id : "";
    el.app.dataset.busy = busy ? "true" : "false";
  }

  // ---- transcript rendering ----------------------------------------------------------------
  function nearBottom() {
    const t = el.transcript;
    return t.scrollHeight - t.scrollTop - t.clientHeight < 80;
  }

  function metaText(item) {
    const parts = [];
    if (item.state === "queued") parts.push(item.stopping ? "stopping…" : "waiting…");
    if (item.state === "streaming") parts.push(item.stopping ? "stopping…" : "streaming");
    if (item.state === "stopped") parts.push("stopped");
    if (item.finish_reason === "length") parts.push("length limit reached");
    if (item.incomplete) parts.push("may be incomplete");
    if (item.tokens) parts.push(`${item.tokens} tokens`);
    return parts.join(" · ");
  }

  function render(item) {
    const stick = nearBottom();
    let node = nodes.get(item.id);
    if (!node) {
      node = document.createElement("div");
      node.id = `msg-${item.id}`;
      if (item.role === "notice") {
        node.className = "notice";
        node.dataset.testid = "notice";
        node.setAttribute("role", "note");
      } else {
        node.className = `msg msg-${item.role}`;
        node.dataset.testid = "message";
        node.dataset.role = item.role;
        const bubble = document.createElement("div");
        bubble.className = "bubble";
        const text = document.createElement("div");
        text.className = "text";
        text.dataset.testid = "message-text";
        bubble.append(text);
        const err = document.createElement("div");
        err.className = "msg-error";
        err.dataset.testid = "message-error";
        const meta = document.createElement("div");
        meta.className = "meta";
        meta.dataset.testid = "message-meta";
        node.append(bubble, err, meta);
      }
      el.transcript.append(node);
      nodes.set(item.id, node);
    }
    if (item.role === "notice") {
      node.dataset.kind = item.kind || "info";
      node.textContent = item.text;
    } else {
      node.dataset.state = item.state;
      if (item.job_id) node.dataset.jobId = item.job_id;
      const text = node.querySelector(".text");
      if (text.textContent !== item.text) text.textContent = item.text;
      const err = node.querySelector(".msg-error");
      err.textContent = item.error ? `${item.error.code}: ${item.error.message}` : "";
      err.hidden = !item.error;
      const meta = node.querySelector(".meta");
      meta.textContent = item.role === "assistant" ? metaText(item) : "";
      meta.hidden = meta.textContent === "";
    }
    el.empty.hidden = state.items.length > 0;
    if (stick) el.transcript.scrollTop = el.transcript.scrollHeight;
    updateControls();
  }

  function renderAll() {
    for (const node of nodes.values()) node.remove();
    nodes.clear();
    for (const item of state.items) render(item);
    el.empty.hidden = state.items.length > 0;
    el.transcript.scrollTop = el.transcript.scrollHeight;
    updateControls();
  }

  function push(item) {
    item.id = ++state.seq;
    state.items.push(item);
    render(item);
    save();
    return item;
  }

  function notice(text, kind) {
    return push({ role: "notice", kind: kind || "info", text });
  }

  function remove(item) {
    state.items = state.items.filter((i) => i !== item);
    const node = nodes.get(item.id);
    if (node) node.remove();
    nodes.delete(item.id);
    el.empty.hidden = state.items.length > 0;
    updateControls();
  }

  // ---- the answer an event belongs to ------------------------------------------------------
  function byJob(jobId) {
    return state.items.find((i) => i.role === "assistant" && i.job_id === jobId) || null;
  }

  /** A fresh random idempotency key (crypto.getRandomValues: plain http pages have it too). */
  function newIdempotencyKey() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  /** The job is known: nothing of its prompt needs sending again. */
  function confirmed(item, jobId) {
    item.job_id = jobId;
    delete item.submit;
  }

  function unconfirmed(item) {
    return (
      item.role === "assistant" &&
      !item.job_id &&
      (item.state === "queued" || (item.error && item.error.code === "unconfirmed"))
    );
  }

  /** The answer of ``jobId``: its bubble, else the oldest prompt not yet confirmed (prompts are
   * queued in the order they were sent), else a new bubble (a job enqueued elsewhere). */
  function answerFor(jobId) {
    let item = byJob(jobId);
    if (item) return item;
    item = state.items.find(unconfirmed);
    if (item) {
      confirmed(item, jobId);
      item.error = null;
      item.state = "queued";
      render(item);
      return item;
    }
    return push({ role: "assistant", job_id: jobId, state: "queued", text: "" });
  }

  // ---- session events (they carry epoch and offset) ----------------------------------------
  function applyEvent(ev) {
    if (ev.type === "resync") {
      onResync(ev);
    } else {
      if (ev.epoch === state.epoch && ev.offset <= state.offset) return; // seen already
      if (ev.type === "stream_start") onStreamStart(ev);
      else if (ev.type === "delta") onDelta(ev);
      else if (ev.type === "stream_end") onStreamEnd(ev);
      else if (ev.type === "error") onJobError(ev);
      if (ev.epoch) state.epoch = ev.epoch;
    }
    state.offset = ev.offset;
    save();
  }

  function onStreamStart(ev) {
    const item = answerFor(ev.job_id);
    if (TERMINAL.has(item.state)) {
      item.replaying = true; // history replayed after a resync: we have this answer already
      return;
    }
    if (!ev.attempt && item.text) item.text = ""; // a replay from its start (after a resync)
    item.state = "streaming";
    render(item);
  }

  function onDelta(ev) {
    const item = answerFor(ev.job_id);
    if (item.replaying) return;
    item.text += ev.delta;
    item.state = "streaming";
    render(item);
  }

  function onStreamEnd(ev) {
    const item = answerFor(ev.job_id);
    if (item.replaying) {
      item.replaying = false;
      return;
    }
    item.state = ev.finish_reason === "cancelled" ? "stopped" : "done";
    item.finish_reason = ev.finish_reason;
    item.tokens = ev.usage ? ev.usage.completion_tokens : 0;
    item.stopping = false;
    render(item);
  }

  function onJobError(ev) {
    if (!ev.job_id) {
      notice(`${ev.code}: ${ev.message}`, "error");
      return;
    }
    const item = answerFor(ev.job_id);
    item.replaying = false;
    item.state = "error";
    item.error = { code: ev.code, message: ev.message };
    item.stopping = false;
    render(item);
  }

  function onResync(ev) {
    state.epoch = ev.epoch || null;
    const lost = ev.reason === "history_expired";
    for (const item of state.items) {
      if (item.role !== "assistant" || !BUSY.has(item.state)) continue;
      item.incomplete = true;
      if (lost && item.job_id) {
        item.state = "error";
        item.error = { code: "history_lost", message: "the rest of this answer is gone" };
      }
      render(item);
    }
    notice(
      `The gateway no longer had part of this conversation's history (${ev.reason}); ` +
        "what is shown above may be incomplete.",
      "warning",
    );
  }

  // ---- replies to this connection (no position) --------------------------------------------
  function onQueued(msg) {
    const placeholder = state.items.find((i) => i.ref !== undefined && i.ref === msg.ref);
    const existing = byJob(msg.job_id);
    if (existing) {
      if (placeholder && placeholder !== existing && !placeholder.job_id) remove(placeholder);
    } else if (placeholder && !placeholder.job_id) {
      confirmed(placeholder, msg.job_id);
      if (placeholder.error && placeholder.error.code === "unconfirmed") {
        placeholder.error = null;
        placeholder.state = "queued";
      }
      render(placeholder);
    }
    save();
  }

  function onConnectionError(msg) {
    if (msg.code === "unauthorized") {
      sessionGone();
      return;
    }
    const placeholder =
      msg.ref !== undefined ? state.items.find((i) => i.ref === msg.ref && !i.job_id) : null;
    if (placeholder) {
      placeholder.state = "error";
      placeholder.error = { code: msg.code, message: msg.message };
      render(placeholder);
      save();
    } else {
      notice(`${msg.code}: ${msg.message}`, "error");
    }
  }

  function onMessage(msg) {
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "connected") {
      onConnected();
    } else if (msg.type === "queued") {
      onQueued(msg);
    } else if (msg.type === "cancelling" || msg.type === "pong") {
      /* the stream_end that follows says it all */
    } else if (typeof msg.offset === "number") {
      applyEvent(msg);
    } else if (msg.type === "error") {
      onConnectionError(msg);
    }
  }

  // ---- the WebSocket -----------------------------------------------------------------------
  function wsUrl() {
    if (state.session.ws_url) return state.session.ws_url;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/v1/ws`;
  }

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (!state.session) return;
    const gen = ++wsGen;
    let sock;
    try {
      sock = new WebSocket(wsUrl());
    } catch (_) {
      scheduleReconnect();
      return;
    }
    ws = sock;
    sock.onopen = () => {
      if (gen !== wsGen) return;
      openedAt = Date.now();
      const hello = {
        type: "connect",
        session_id: state.session.session_id,
        token: state.session.token,
        offset: state.offset,
      };
      if (state.epoch) hello.epoch = state.epoch;
      sock.send(JSON.stringify(hello));
    };
    sock.onmessage = (event) => {
      if (gen !== wsGen) return;
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      onMessage(msg);
    };
    sock.onclose = (event) => {
      if (gen !== wsGen) return;
      ws = null;
      connected = false;
      window.tokenbusCloseCodes.push(event.code);
      if (openedAt && Date.now() - openedAt > STABLE_MS) backoff = BACKOFF_MIN_MS;
      openedAt = 0;
      if (event.code === 4401) {
        sessionGone();
        return;
      }
      if (GONE.has(event.code)) {
        // Sent elsewhere, not failing: no wait now; should that attempt fail, backoff resumes.
        backoff = BACKOFF_MIN_MS;
        window.tokenbusDrainReconnects += 1;
        scheduleReconnect(0);
        return;
      }
      scheduleReconnect();
    };
  }

  function onConnected() {
    connected = true;
    setStatus("connected");
    // Prompts sent on an earlier connection that the gateway never confirmed: sent again with
    // their idempotency key (one job however many arrived), a bounded number of times.
    for (const item of state.items) {
      if (item.role === "assistant" && !item.job_id && item.state === "queued") {
        if (item.sentOn === wsGen) continue;
        if (item.submit && item.submit.sends < MAX_SUBMITS && submit(item)) continue;
        delete item.submit;
        item.state = "error";
        item.error = {
          code: "unconfirmed",
          message: "the connection dropped before the gateway confirmed this message; " +
            "send it again if no answer appears",
        };
        render(item);
      }
    }
    updateControls();
  }

  function scheduleReconnect(delayMs) {
    connected = false;
    window.tokenbusReconnects += 1;
    setStatus(navigator.onLine === false ? "offline" : "reconnecting");
    clearTimeout(retryTimer);
    if (delayMs === 0) {
      retryTimer = setTimeout(connect, 0);
      return;
    }
    retryTimer = setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
  }

  function disconnect() {
    wsGen += 1; // whatever the old socket still says is ignored
    clearTimeout(retryTimer);
    retryTimer = null;
    if (ws) {
      try {
        ws.close(1000, "bye");
      } catch (_) {
        /* already closing */
      }
    }
    ws = null;
    connected = false;
    openedAt = 0;
  }

  function sendJson(message) {
    if (!ws || !connected || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(message));
    return true;
  }

  /** Send (or send again) the prompt of the answer ``item``; false when not connected. */
  function submit(item) {
    const { messages, idempotency_key } = item.submit;
    if (!sendJson({ type: "prompt", messages, idempotency_key, ref: item.ref })) return false;
    item.submit.sends += 1;
    item.sentOn = wsGen;
    save();
    return true;
  }

  // ---- sessions ----------------------------------------------------------------------------
  /** POST /v1/sessions; null when the gateway wants an API key (the form is shown then). */
  async function createSession() {
    const headers = {};
    const key = localStorage.getItem(KEY_STORE);
    if (key) headers.Authorization = `Bearer ${key}`;
    for (;;) {
      let response = null;
      try {
        response = await fetch("/v1/sessions", { method: "POST", headers, cache: "no-store" });
      } catch (_) {
        response = null;
      }
      if (response && response.status === 401) {
        askForKey(key ? "That key was not accepted." : "");
        return null;
      }
      if (response && response.ok) {
        const body = await response.json();
        backoff = BACKOFF_MIN_MS;
        return { session_id: body.session_id, token: body.token, ws_url: body.ws_url };
      }
      window.tokenbusReconnects += 1;
      setStatus(navigator.onLine === false ? "offline" : "reconnecting");
      await new Promise((resolve) => setTimeout(resolve, backoff));
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
  }

  /** Start a session; ``keep`` leaves the transcript in place (with a divider notice). */
  async function startSession(keep, why) {
    if (creating) return;
    creating = true;
    disconnect();
    setStatus("connecting");
    updateControls();
    try {
      const session = await createSession();
      if (!session) return;
      const items = keep ? state.items : [];
      for (const item of items) {
        if (item.role === "assistant" && BUSY.has(item.state)) {
          item.state = "error";
          item.error = { code: "session_ended", message: "the session ended before this answer" };
        }
      }
      state = { ...blankState(session), seq: keep ? state.seq : 0, items };
      renderAll();
      if (why) notice(why, "info");
      saveNow();
      connect();
    } finally {
      creating = false;
      updateControls();
    }
  }

  function sessionGone() {
    startSession(
      state.items.length > 0,
      "That session could not be resumed, so a new one started: earlier messages above are " +
        "not part of its context.",
    );
  }

  function askForKey(error) {
    setStatus("needs-key");
    el.keyForm.hidden = false;
    el.keyError.textContent = error;
    el.keyError.hidden = !error;
    el.keyInput.focus();
  }

  // ---- user actions ------------------------------------------------------------------------
  function send() {
    const text = el.prompt.value;
    if (!text.trim() || busyItem() || !connected) return;
    push({ role: "user", text, state: "done" });
    const answer = push({ role: "assistant", job_id: null, sentOn: wsGen, state: "queued", text: "" });
    answer.ref = `r${answer.id}`;
    const messages = [{ role: "user", content: text }];
    answer.submit = { messages, idempotency_key: newIdempotencyKey(), sends: 0 };
    if (!submit(answer)) {
      delete answer.submit;
      answer.state = "error";
      answer.error = { code: "not_connected", message: "not connected; send it again" };
      render(answer);
    }
    el.prompt.value = "";
    autosize();
    saveNow();
    updateControls();
  }

  function stop() {
    const item = busyItem();
    if (!item || item.stopping) return;
    const cancel = { type: "cancel" };
    if (item.job_id) cancel.job_id = item.job_id;
    if (sendJson(cancel)) {
      item.stopping = true;
      render(item);
    }
  }

  function newConversation() {
    if (creating) return;
    const item = busyItem();
    if (item && item.job_id) sendJson({ type: "cancel", job_id: item.job_id });
    localStorage.removeItem(STORE);
    state = blankState(null);
    renderAll();
    startSession(false, "");
    el.prompt.focus();
  }

  function autosize() {
    el.prompt.style.height = "auto";
    el.prompt.style.height = `${Math.min(el.prompt.scrollHeight, 220)}px`;
  }

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  el.prompt.addEventListener("input", () => {
    autosize();
    updateControls();
  });
  el.stop.addEventListener("click", stop);
  el.fresh.addEventListener("click", newConversation);
  el.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = el.keyInput.value.trim();
    if (!key) return;
    localStorage.setItem(KEY_STORE, key);
    el.keyInput.value = "";
    el.keyForm.hidden = true;
    startSession(state.items.length > 0, "");
  });
  window.addEventListener("pagehide", saveNow);
  window.addEventListener("online", () => {
    if (retryTimer !== null) {
      backoff = BACKOFF_MIN_MS;
      connect();
    }
  });

  // ---- start -------------------------------------------------------------------------------
  state = load();
  renderAll();
  if (state.session) {
    setStatus("connecting");
    connect();
  } else {
    startSession(false, "");
  }
  el.prompt.focus();
})();
