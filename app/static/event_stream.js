// Server-Sent Events over fetch(): what EventSource does, plus an Authorization header.
//
// EventSource cannot send headers, and with API keys every /api stream needs
// `Authorization: Bearer <key>`. The key must never go into a URL (URLs end up in logs,
// history and Referer headers), so the page reads its streams with fetch() instead:
//
//  * `EventStreamParser` is the parser of the HTML standard's "event stream interpretation"
//    (https://html.spec.whatwg.org/multipage/server-sent-events.html): lines end with CRLF,
//    LF or CR (also across chunk boundaries); `:` starts a comment; `data` lines join with
//    "\n"; `event` names the type (default "message"); `id` sets the last event id, which
//    stays until another `id` line changes it (so ephemeral frames without one never move
//    it); an event is dispatched at a blank line, and one cut off by the end of the stream
//    is dropped.
//  * `followStream(path, options)` keeps one stream open the way EventSource does: after a
//    drop, or after the server ends the stream, it reconnects and sends the last event id
//    as `Last-Event-ID`, so the server resumes right after it (or sends a snapshot when it
//    cannot). Waits between attempts grow (with jitter) while attempts fail and start over
//    once a connection delivers something. A 4xx answer stops it: the caller decides (ask
//    for a key on 401, show "admin key needed" on 403, close a view on 404); a 5xx or a
//    network error is retried.
//
// Ownership: each call of followStream owns one fetch at a time and its timer; `close()`
// aborts both, and nothing is called back after it.

const FIRST_RETRY_MS = 500; // Chromium's EventSource waits 3 s; a dashboard wants sooner
const MAX_RETRY_MS = 15_000; // a server restarting is back well within this
const NEWLINE = /\r\n|\r|\n/;

export class EventStreamParser {
  // `dispatch({type, data, lastEventId})` is called once per complete event.
  constructor(dispatch) {
    this.dispatch = dispatch;
    this.pending = ""; // text after the last complete line
    this.started = false; // a byte order mark may open the stream (and only the stream)
    this.lastEventId = "";
    this.idBuffer = "";
    this.retryMs = null; // the last valid `retry:` field, if any
    this.resetEvent();
  }

  resetEvent() {
    this.type = "";
    this.data = "";
  }

  // Feed decoded text; complete lines are interpreted at once.
  push(text) {
    let buffer = this.pending + text;
    if (!this.started && buffer.length > 0) {
      this.started = true;
      if (buffer.startsWith("\uFEFF")) buffer = buffer.slice(1);
    }
    // A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
    const keepCr = buffer.endsWith("\r");
    const lines = (keepCr ? buffer.slice(0, -1) : buffer).split(NEWLINE);
    this.pending = lines.pop() + (keepCr ? "\r" : "");
    for (const line of lines) this.line(line);
  }

  // The stream ended: a CR left over ends a line; an event without its blank line is lost.
  end() {
    if (this.pending.endsWith("\r")) this.line(this.pending.slice(0, -1));
    this.pending = "";
    this.resetEvent();
  }

  line(line) {
    if (line === "") {
      this.dispatchEvent();
      return;
    }
    if (line.startsWith(":")) return; // a comment (heartbeats)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") {
      this.data += `${value}\n`;
    } else if (field === "event") {
      this.type = value;
    } else if (field === "id") {
      if (!value.includes("\0")) this.idBuffer = value;
    } else if (field === "retry" && /^[0-9]+$/.test(value)) {
      this.retryMs = Number(value);
    }
  }

  dispatchEvent() {
    this.lastEventId = this.idBuffer;
    if (this.data === "") {
      this.resetEvent();
      return;
    }
    const event = {
      type: this.type || "message",
      data: this.data.slice(0, -1),
      lastEventId: this.lastEventId,
    };
    this.resetEvent();
    this.dispatch(event);
  }
}

// Follow `path` until closed. Options:
//   headers()            -> extra request headers for each attempt (Authorization)
//   on: {type: handler}  -> handler(JSON-decoded data, event) for each event of that type
//   onState(state)       -> "live" once connected, "reconnecting" after a drop
//   onRefused(status, error) -> a 4xx answer (error: the JSON error body, or null); stopped
// Returns {close()}.
export function followStream(path, { headers = () => ({}), on = {}, onState, onRefused }) {
  const abort = new AbortController();
  // lastEventId: sent as Last-Event-ID; failures: attempts since one delivered something;
  // ended: the server sent `end` (it closed the stream on purpose).
  const state = { lastEventId: "", failures: 0, retryMs: null, ended: false };
  run(path, abort.signal, state, { headers, on, onState, onRefused }).catch((error) => {
    if (!abort.signal.aborted) throw error; // a bug, not a drop: let the console show it
  });
  return { close: () => abort.abort() };
}

async function run(path, signal, state, handlers) {
  while (!signal.aborted) {
    state.ended = false;
    let response;
    try {
      response = await fetch(path, { headers: requestHeaders(state, handlers), signal });
    } catch {
      if (signal.aborted) return;
      handlers.onState?.("reconnecting");
      await pause(state, signal);
      continue;
    }
    if (response.status >= 400 && response.status < 500) {
      const body = await response.json().catch(() => null);
      if (!signal.aborted) handlers.onRefused?.(response.status, body?.error ?? null);
      return;
    }
    if (response.ok && isEventStream(response)) {
      handlers.onState?.("live");
      const delivered = await read(response, signal, state, handlers.on);
      if (signal.aborted) return;
      if (delivered) state.failures = 0;
    } else {
      await response.body?.cancel().catch(() => {}); // 5xx, or not a stream: try again
    }
    if (!state.ended) handlers.onState?.("reconnecting");
    await pause(state, signal);
  }
}

function requestHeaders(state, handlers) {
  const headers = { Accept: "text/event-stream", ...handlers.headers() };
  if (state.lastEventId !== "") headers["Last-Event-ID"] = state.lastEventId;
  return headers;
}

function isEventStream(response) {
  return (response.headers.get("Content-Type") ?? "").startsWith("text/event-stream");
}

// Read one response to its end; true when at least one event arrived.
async function read(response, signal, state, on) {
  let delivered = false;
  const parser = new EventStreamParser((event) => {
    delivered = true;
    state.lastEventId = event.lastEventId;
    if (event.type === "end") state.ended = true;
    const handler = on[event.type];
    if (handler && !signal.aborted) deliver(handler, event);
  });
  parser.lastEventId = parser.idBuffer = state.lastEventId; // ids carry across connections
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch {
      break; // dropped mid-stream (or aborted): whatever was complete has been handled
    }
    if (chunk.done) {
      parser.end();
      break;
    }
    parser.push(chunk.value);
  }
  state.retryMs = parser.retryMs ?? state.retryMs;
  return delivered;
}

// Like EventSource: a handler that throws is reported (console, window "error") and the
// stream goes on.
function deliver(handler, event) {
  try {
    handler(JSON.parse(event.data), event);
  } catch (error) {
    reportError(error);
  }
}

// Wait before the next attempt: FIRST_RETRY_MS (or the server's `retry:`) doubling with
// each failed attempt up to MAX_RETRY_MS, between half and all of it (jitter, so pages
// that lost the same server do not all come back in the same millisecond).
function pause(state, signal) {
  const base = state.retryMs ?? FIRST_RETRY_MS;
  const ceiling = Math.min(MAX_RETRY_MS, base * 2 ** state.failures);
  state.failures += 1;
  const ms = ceiling / 2 + (Math.random() * ceiling) / 2;
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}
