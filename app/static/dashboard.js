// The Trellis dashboard: plain JavaScript, no framework, no build step.
//
// How it works, in three parts:
//  1. State. `server` holds what the server-wide stream (GET /api/events/stream) says: the
//     limits, the counts, the runs holding a slot and the queue in start order. A `snapshot`
//     frame replaces it whole; `status`, `limits`, `conversation` and `step` frames change it.
//  2. Rendering. Any change calls `render()` (batched to one per animation frame), which
//     rebuilds the tables from the state. Server text only ever goes through `textContent`,
//     never `innerHTML`, so nothing a conversation says can become markup.
//  3. The conversation view follows one conversation's own stream
//     (GET /api/conversations/{id}/events/stream): events as they are stored, and `delta`
//     frames (token text before the message is stored) as a "typing" line.
//
// EventSource reconnects by itself and resends the last `id:` as Last-Event-ID, so a dropped
// connection resumes without gap; when the server cannot replay, it sends a snapshot.

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

const QUEUE_ROWS_SHOWN = 100; // the queue can hold thousands; the page shows its head
const RECENT_CONVERSATIONS = 10;
const EVENTS_SHOWN = 500; // the conversation view keeps the newest ones
const STATISTICS_EVERY_MS = 2000; // I/O and tool gauges are sampled (the stream has no frame)
const ACTIVE = new Set(["running", "pausing"]);

const server = {
  limits: null, // {max_concurrent_runs, max_queued_runs, io_threads, tool_threads}
  counts: { running: 0, queued: 0 },
  threads: null, // {io_borrowed, io_total, tool_borrowed, tool_total}
  running: new Map(), // run_id -> {conversation_id, run_id, started_at, steps, status}
  queue: [], // runs waiting for a slot, in start order: {conversation_id, run_id, queued_at}
  held: [], // queued runs that wait for an earlier run of their own conversation
};
const conversations = new Map(); // id -> {id, title, status, created_at}, filled lazily

// -- talking to the API -------------------------------------------------------------------

async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json"; // the guards accept JSON bodies only
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = response.status === 204 ? null : await response.json();
  if (!response.ok) {
    throw new Error(data?.error?.message ?? `${method} ${path}: HTTP ${response.status}`);
  }
  return data;
}

function notify(error) {
  const notice = $("notice");
  notice.textContent = error ? String(error.message ?? error) : "";
  notice.hidden = !error;
}

async function act(work) {
  try {
    notify(null);
    await work();
  } catch (error) {
    notify(error);
  }
}

// -- conversation titles: fetched once per id, on first sight ------------------------------

const fetching = new Set();

function remember(record) {
  const known = conversations.get(record.id) ?? {};
  const merged = { ...known, ...record };
  // A status frame that came while the record was on its way is newer than the record.
  if (known.statusTime && Date.parse(known.statusTime) > Date.parse(record.updated_at)) {
    merged.status = known.status;
  }
  conversations.set(record.id, merged);
  render();
}

function setStatus(id, status, time) {
  const known = conversations.get(id);
  if (known?.statusTime && Date.parse(known.statusTime) > Date.parse(time)) return; // older
  conversations.set(id, { ...known, id, status, statusTime: time });
}

function conversation(id) {
  if (!conversations.get(id)?.created_at && !fetching.has(id)) {
    fetching.add(id);
    api("GET", `/api/conversations/${encodeURIComponent(id)}`)
      .then((record) => remember(record))
      .catch(() => {}) // deleted meanwhile: the row shows the id
      .finally(() => fetching.delete(id));
  }
  return conversations.get(id);
}

function titleOf(id) {
  return conversation(id)?.title || id.slice(0, 8);
}

// -- the server-wide stream ----------------------------------------------------------------

function applySnapshot(snapshot) {
  server.limits = snapshot.limits;
  const stats = snapshot.statistics;
  server.counts = { running: stats.running, queued: stats.queued };
  server.threads = stats;
  server.running = new Map(
    snapshot.running.map((run) => [run.run_id, { ...run, status: "running" }]),
  );
  server.queue = snapshot.queued.filter((run) => run.position !== null);
  server.held = snapshot.queued.filter((run) => run.position === null);
  loadRecent(); // statuses may have changed while the page was away
  render();
}

function applyStatus(frame) {
  server.counts = frame.counts;
  setStatus(frame.conversation_id, frame.status, frame.time);
  const before = server.running.get(frame.run_id);
  forgetRun(frame.run_id);
  if (frame.status === "queued") {
    const { conversation_id, run_id } = frame;
    const entry = { conversation_id, run_id, queued_at: frame.time };
    if (frame.position === null) {
      server.held.push(entry);
    } else {
      server.queue.splice(Math.min(frame.position - 1, server.queue.length), 0, entry);
    }
  } else if (ACTIVE.has(frame.status)) {
    server.running.set(frame.run_id, {
      conversation_id: frame.conversation_id,
      run_id: frame.run_id,
      started_at: before?.started_at ?? frame.time,
      steps: before?.steps ?? 0,
      status: frame.status,
    });
  }
  if (view.id === frame.conversation_id) showStatus(frame.status);
  render();
}

function forgetRun(runId) {
  server.running.delete(runId);
  server.queue = server.queue.filter((run) => run.run_id !== runId);
  server.held = server.held.filter((run) => run.run_id !== runId);
}

function applyConversation(frame) {
  if (frame.change === "deleted") {
    conversations.delete(frame.conversation_id);
    if (view.id === frame.conversation_id) closeConversation();
  } else {
    conversation(frame.conversation_id); // fetch its title and status
  }
  render();
}

function followServer() {
  const source = new EventSource("/api/events/stream");
  const on = (type, handler) =>
    source.addEventListener(type, (message) => handler(JSON.parse(message.data)));
  source.onopen = () => setConnection("live");
  source.onerror = () =>
    setConnection(source.readyState === EventSource.CLOSED ? "offline" : "reconnecting");
  on("snapshot", applySnapshot);
  on("status", applyStatus);
  on("limits", (frame) => {
    server.limits = { ...server.limits, ...frame };
    render();
  });
  on("conversation", applyConversation);
  on("step", (frame) => {
    const run = server.running.get(frame.run_id);
    if (run) run.steps = frame.steps;
    render();
  });
  // The server closes the stream after `end`; EventSource then reconnects with the last id.
  on("end", (frame) =>
    setConnection(frame.reason === "shutdown" ? "server stopped" : "reconnecting"),
  );
}

function setConnection(state) {
  const badge = $("connection");
  badge.textContent = state;
  badge.dataset.state = state;
}

async function sampleThreads() {
  try {
    const info = await api("GET", "/api/server");
    $("version").textContent = `v${info.version}`;
    server.threads = info.statistics;
    render();
  } catch {
    // the connection badge already says the server is away
  }
}

// -- rendering -----------------------------------------------------------------------------

let renderPending = false;

function render() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    renderGauges();
    renderRunning();
    renderQueue();
    renderConversations();
  });
}

function gauge(name, used, total) {
  const box = $(`gauge-${name}`);
  $(`gauge-${name}-value`).textContent = total === undefined ? "–" : `${used} / ${total}`;
  const meter = box.querySelector("meter");
  meter.max = Math.max(total ?? 1, 1);
  meter.value = used;
  box.classList.toggle("full", total !== undefined && used >= total);
}

function renderGauges() {
  const limits = server.limits ?? {};
  const threads = server.threads ?? {};
  gauge("running", server.counts.running, limits.max_concurrent_runs);
  gauge("queued", server.counts.queued, limits.max_queued_runs);
  gauge("io", threads.io_borrowed ?? 0, threads.io_total);
  gauge("tool", threads.tool_borrowed ?? 0, threads.tool_total);
  const input = $("max-concurrent-input");
  if (document.activeElement !== input && limits.max_concurrent_runs !== undefined) {
    input.value = limits.max_concurrent_runs;
  }
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function row(testid, conversationId, runId, cells) {
  const tr = document.createElement("tr");
  tr.dataset.testid = testid;
  tr.dataset.conversationId = conversationId;
  if (runId) tr.dataset.runId = runId;
  tr.classList.toggle("selected", conversationId === view.id);
  tr.append(...cells);
  return tr;
}

function fillTable(testid, rows) {
  $(testid).tBodies[0].replaceChildren(...rows);
}

function renderRunning() {
  const rows = [...server.running.values()]
    .sort((a, b) => (a.started_at ?? "").localeCompare(b.started_at ?? ""))
    .map((run) =>
      row("running-row", run.conversation_id, run.run_id, [
        cell(titleOf(run.conversation_id), "title"),
        cell(run.run_id.slice(0, 8), "id"),
        cell(run.status, `status ${run.status}`),
        cell(String(run.steps + 1), "number"),
        cell(since(run.started_at), "number"),
      ]),
    );
  fillTable("running-table", rows);
  $("running-empty").hidden = rows.length > 0;
}

function renderQueue() {
  const line = [
    ...server.queue.map((run, i) => [String(i + 1), run]),
    ...server.held.map((run) => ["–", run]), // behind an earlier run of their conversation
  ];
  const rows = line.slice(0, QUEUE_ROWS_SHOWN).map(([position, run]) =>
    row("queue-row", run.conversation_id, run.run_id, [
      cell(position, "number"),
      cell(titleOf(run.conversation_id), "title"),
      cell(run.run_id.slice(0, 8), "id"),
      cell(since(run.queued_at), "number"),
    ]),
  );
  fillTable("queue-table", rows);
  $("queue-empty").hidden = line.length > 0;
  const more = $("queue-more");
  more.hidden = server.counts.queued <= rows.length;
  more.textContent = `… and ${server.counts.queued - rows.length} more`;
}

function renderConversations() {
  const recent = [...conversations.values()]
    .filter((c) => c.created_at)
    .sort((a, b) => b.created_at.localeCompare(a.created_at))
    .slice(0, RECENT_CONVERSATIONS);
  const rows = recent.map((c) =>
    row("conversation-row", c.id, null, [
      cell(c.title || c.id.slice(0, 8), "title"),
      cell(c.status, `status ${c.status}`),
      cell(new Date(c.created_at).toLocaleTimeString(), "number"),
    ]),
  );
  fillTable("conversations-table", rows);
}

function since(isoTime) {
  const seconds = Math.max(0, Math.floor((Date.now() - Date.parse(isoTime)) / 1000));
  const m = Math.floor(seconds / 60);
  return m ? `${m}m ${String(seconds % 60).padStart(2, "0")}s` : `${seconds}s`;
}

// -- the conversation view -----------------------------------------------------------------

const view = { id: null, source: null };

function openConversation(id) {
  closeConversation();
  view.id = id;
  $("conversation-view").hidden = false;
  $("conversation-title").textContent = titleOf(id);
  $("conversation-id").textContent = id;
  showStatus(conversation(id)?.status ?? "");
  const source = new EventSource(`/api/conversations/${encodeURIComponent(id)}/events/stream`);
  source.onmessage = (message) => addEvent(JSON.parse(message.data));
  source.addEventListener("delta", (message) => addDelta(JSON.parse(message.data)));
  source.addEventListener("end", (message) => {
    if (JSON.parse(message.data).reason === "deleted") closeConversation();
  });
  view.source = source;
  render();
}

function closeConversation() {
  view.source?.close();
  view.id = null;
  view.source = null;
  $("conversation-view").hidden = true;
  $("event-list").replaceChildren();
  $("typing").hidden = true;
  render();
}

function showStatus(status) {
  const badge = $("conversation-status");
  badge.textContent = status;
  badge.className = `status ${status}`;
}

function describe(payload) {
  switch (payload.kind) {
    case "message":
      return payload.text;
    case "status":
      return `${payload.previous} → ${payload.status} (${payload.reason})`;
    case "error":
      return `${payload.error_type}: ${payload.message}`;
    case "action":
      return `${payload.tool} ${JSON.stringify(payload.arguments)}`;
    case "observation":
      return `${payload.tool}${payload.is_error ? " (error)" : ""}: ${payload.content}`;
    case "llm_call":
      return (
        `${payload.model}: ${payload.prompt_tokens} + ${payload.completion_tokens} tokens,` +
        ` ${Math.round(payload.duration_ms)} ms`
      );
    default:
      return JSON.stringify(payload);
  }
}

function addEvent(event) {
  const item = document.createElement("li");
  item.dataset.testid = "event";
  item.dataset.kind = event.kind;
  const meta = document.createElement("span");
  meta.className = "meta";
  const time = new Date(event.timestamp).toLocaleTimeString();
  meta.textContent = `#${event.seq} ${time} ${event.source} ${event.kind}`;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = describe(event.payload);
  item.append(meta, text);
  const list = $("event-list");
  list.append(item);
  while (list.childElementCount > EVENTS_SHOWN) list.firstElementChild.remove();
  if (event.kind === "status") {
    showStatus(event.payload.status);
    setStatus(event.conversation_id, event.payload.status, event.timestamp);
  }
  if (event.kind === "message" && event.run_id === typing.runId) clearTyping();
  item.scrollIntoView({ block: "nearest" });
}

// Token deltas arrive before their message is stored; the stored message replaces them.
const typing = { runId: null };

function addDelta(delta) {
  const line = $("typing");
  if (typing.runId !== delta.run_id) line.textContent = "";
  typing.runId = delta.run_id;
  line.textContent += delta.text;
  line.hidden = false;
}

function clearTyping() {
  typing.runId = null;
  $("typing").textContent = "";
  $("typing").hidden = true;
}

// -- controls ------------------------------------------------------------------------------

const DEMO_AGENT = {
  kind: "script",
  steps: [
    { say: "Hello! I am a demo script: a few steps, a pause between each." },
    { sleep: 3 },
    { say: "Still working…" },
    { sleep: 3 },
    { finish: "Done." },
  ],
};
let demoNumber = 0;

function wireControls() {
  $("new-run").addEventListener("click", () =>
    act(async () => {
      demoNumber += 1;
      const body = { agent: DEMO_AGENT, title: `demo ${demoNumber}`, run: true };
      remember(await api("POST", "/api/conversations", body));
    }),
  );
  $("limits-form").addEventListener("submit", (submit) => {
    submit.preventDefault();
    const value = Number($("max-concurrent-input").value);
    act(() => api("PATCH", "/api/server/limits", { max_concurrent_runs: value }));
  });
  for (const testid of ["running-table", "queue-table", "conversations-table"]) {
    $(testid).addEventListener("click", (click) => {
      const tr = click.target.closest("tr[data-conversation-id]");
      if (tr) openConversation(tr.dataset.conversationId);
    });
  }
  $("conversation-close").addEventListener("click", closeConversation);
  const paths = { start: "runs", pause: "pause", interrupt: "interrupt" };
  for (const button of document.querySelectorAll("[data-action]")) {
    button.addEventListener("click", () => {
      const action = button.dataset.action;
      const path = `/api/conversations/${encodeURIComponent(view.id)}/${paths[action]}`;
      act(() => (action === "start" ? api("POST", path, {}) : api("POST", path)));
    });
  }
}

async function loadRecent() {
  try {
    const page = await api("GET", `/api/conversations?limit=${RECENT_CONVERSATIONS}`);
    for (const item of page.items) if (!item.error) remember(item);
  } catch (error) {
    notify(error);
  }
}

wireControls();
followServer();
sampleThreads();
setInterval(sampleThreads, STATISTICS_EVERY_MS);
setInterval(render, 1000); // waiting and elapsed times tick
