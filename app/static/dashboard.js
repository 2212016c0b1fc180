// The Trellis dashboard: plain JavaScript, no framework, no build step.
//
// How it works, in three parts:
//  1. State. `server` holds what the server-wide stream (GET /api/events/stream) says: the
//     limits, the counts, the runs holding a slot and the queue in start order. A `snapshot`
//     frame replaces it whole; `status`, `limits`, `conversation` and `step` frames change it.
//  2. Rendering. Any change calls `render()` (batched to one per animation frame), which
//     rebuilds the tables from the state (tables.js). Server text only ever goes through
//     `textContent`, never `innerHTML`, so nothing a conversation says can become markup.
//  3. The conversation view (conversation_view.js) follows one conversation's own stream.
//
// Streams are read with fetch() (event_stream.js), which reconnects after a drop and resends
// the last `id:` as Last-Event-ID, so a dropped connection resumes without gap; when the
// server cannot replay, it sends a snapshot.
//
// API keys (api_key.js): every call carries the tab's key, if it has one. A 401 stops
// everything and shows the key form; once a key is accepted the page starts afresh. A 403
// from the admin-only parts — GET /api/server (version, gauges, the limits form) and the
// server-wide stream (running runs, the queue) — shows them as "admin key needed", while
// the conversations a tenant's key may see still work (the list is polled then).

import { act, ApiError, api, notify } from "./api.js";
import {
  askForKey,
  authorization,
  currentKey,
  onKeyAccepted,
  onKeyNeeded,
  wireKeyForm,
} from "./api_key.js";
import {
  closeConversation,
  openConversation,
  setViewHooks,
  showStatus,
  view,
} from "./conversation_view.js";
import { followStream } from "./event_stream.js";
import { RECENT_CONVERSATIONS, renderTables } from "./tables.js";

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

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
// live: the page follows the server (false while it waits for a key); epoch: counts starts
// and stops (an answer to a call of an earlier epoch is dropped); feed: the server stream;
// locked: the admin-only parts this key may not see ("server", "feed").
const session = { live: false, epoch: 0, feed: null, locked: new Set() };

// GET `path`: its answer, or null when the page stopped or changed keys meanwhile (the
// answer was for an earlier key: not this one's to show). Errors: as api().
async function read(path) {
  const epoch = session.epoch;
  try {
    const data = await api("GET", path);
    return epoch === session.epoch ? data : null;
  } catch (error) {
    if (epoch === session.epoch) throw error;
    return null;
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
    read(`/api/conversations/${encodeURIComponent(id)}`)
      .then((record) => record && remember(record))
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
  session.feed = followStream("/api/events/stream", {
    headers: authorization,
    onState: setConnection,
    onRefused: feedRefused,
    on: {
      snapshot: applySnapshot,
      status: applyStatus,
      limits: (frame) => {
        server.limits = { ...server.limits, ...frame };
        render();
      },
      conversation: applyConversation,
      step: (frame) => {
        const run = server.running.get(frame.run_id);
        if (run) run.steps = frame.steps;
        render();
      },
      // The server closes the stream after `end`; it is reopened with the last id.
      end: (frame) =>
        setConnection(frame.reason === "shutdown" ? "server stopped" : "reconnecting"),
    },
  });
}

function feedRefused(status, error) {
  if (status === 401) {
    askForKey(currentKey()); // shows the form; the page stops (onKeyNeeded)
  } else if (error?.code === "forbidden") {
    setConnection("admin key needed");
    lock("feed");
    loadRecent();
  } else {
    setConnection("offline");
    notify(new ApiError(error?.message ?? `the server stream answered ${status}`, status));
  }
}

function setConnection(state) {
  const badge = $("connection");
  badge.textContent = state;
  badge.dataset.state = state;
}

async function sampleThreads() {
  try {
    const info = await read("/api/server");
    if (!info) return;
    $("version").textContent = `v${info.version}`;
    server.threads = info.statistics;
    render();
  } catch (error) {
    if (error.code === "forbidden") lock("server");
    // otherwise the connection badge already says the server is away
  }
}

// -- keys and admin-only parts ---------------------------------------------------------------

// Show the parts of `part` ("server", "feed") as "admin key needed".
function lock(part) {
  session.locked.add(part);
  for (const element of document.querySelectorAll(`[data-admin-part="${part}"]`)) {
    element.dataset.locked = "";
  }
}

function unlockAll() {
  session.locked.clear();
  for (const element of document.querySelectorAll("[data-locked]")) {
    delete element.dataset.locked;
  }
}

// Follow the server: the stream, the sampled statistics (the list comes with the snapshot).
function start() {
  session.live = true;
  session.epoch += 1;
  unlockAll();
  followServer();
  sampleThreads();
}

// Forget everything this key could see; nothing runs until start() again.
function stop() {
  session.live = false;
  session.epoch += 1;
  setConnection("key needed");
  session.feed?.close();
  session.feed = null;
  closeConversation();
  Object.assign(server, { limits: null, counts: { running: 0, queued: 0 }, threads: null });
  Object.assign(server, { running: new Map(), queue: [], held: [] });
  conversations.clear();
  $("version").textContent = "…";
  render();
}

// Every STATISTICS_EVERY_MS: sample what no stream tells; without the server stream, poll
// the list of conversations instead.
function tick() {
  if (!session.live) return;
  if (!session.locked.has("server")) sampleThreads();
  if (session.locked.has("feed")) loadRecent();
}

// -- rendering -----------------------------------------------------------------------------

let renderPending = false;

function render() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    renderTables(server, conversations, { titleOf, selected: view.id });
  });
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
      if (!tr) return;
      const id = tr.dataset.conversationId;
      openConversation(id, { title: titleOf(id), status: conversation(id)?.status });
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
    const page = await read(`/api/conversations?limit=${RECENT_CONVERSATIONS}`);
    if (!page) return;
    if (session.locked.has("feed")) dropMissing(page); // no stream says "deleted"
    for (const item of page.items) if (!item.error) remember(item);
  } catch (error) {
    notify(error);
  }
}

// Forget the known conversations that `page` (newest first) would list but does not.
function dropMissing(page) {
  const listed = new Set(page.items.map((item) => item.id));
  const oldest = page.next_cursor === null ? "" : (page.items.at(-1)?.created_at ?? "");
  for (const [id, known] of conversations) {
    if (!listed.has(id) && (known.created_at ?? "") >= oldest) conversations.delete(id);
  }
}

setViewHooks({ onStatus: setStatus, onChange: render });
wireControls();
wireKeyForm();
onKeyAccepted(start);
onKeyNeeded(stop);
start();
setInterval(tick, STATISTICS_EVERY_MS);
setInterval(render, 1000); // waiting and elapsed times tick
