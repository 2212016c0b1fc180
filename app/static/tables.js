// The dashboard's tables and gauges, rebuilt from the page's state on each render.
//
// Pure functions of what they are given (the `server` and `conversations` state of
// dashboard.js, a `titleOf(id)` and the id of the conversation shown); server text only
// ever goes through `textContent`.

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

const QUEUE_ROWS_SHOWN = 100; // the queue can hold thousands; the page shows its head
export const RECENT_CONVERSATIONS = 10;

// Rebuild everything. `view`: {titleOf(id), selected: the id shown or null}.
export function renderTables(server, conversations, view) {
  renderGauges(server);
  renderRunning(server, view);
  renderQueue(server, view);
  renderConversations(conversations, view);
}

function gauge(name, used, total) {
  const box = $(`gauge-${name}`);
  $(`gauge-${name}-value`).textContent = total === undefined ? "–" : `${used} / ${total}`;
  const meter = box.querySelector("meter");
  meter.max = Math.max(total ?? 1, 1);
  meter.value = used;
  box.classList.toggle("full", total !== undefined && used >= total);
}

function renderGauges(server) {
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
  tr.append(...cells);
  return tr;
}

// Put `rows` into the table, marking those of the conversation shown (`selected`).
function fillTable(testid, rows, selected) {
  for (const tr of rows) tr.classList.toggle("selected", tr.dataset.conversationId === selected);
  $(testid).tBodies[0].replaceChildren(...rows);
}

function renderRunning(server, { titleOf, selected }) {
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
  fillTable("running-table", rows, selected);
  $("running-empty").hidden = rows.length > 0;
}

function renderQueue(server, { titleOf, selected }) {
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
  fillTable("queue-table", rows, selected);
  $("queue-empty").hidden = line.length > 0;
  const more = $("queue-more");
  more.hidden = server.counts.queued <= rows.length;
  more.textContent = `… and ${server.counts.queued - rows.length} more`;
}

function renderConversations(conversations, { selected }) {
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
  fillTable("conversations-table", rows, selected);
}

function since(isoTime) {
  const seconds = Math.max(0, Math.floor((Date.now() - Date.parse(isoTime)) / 1000));
  const m = Math.floor(seconds / 60);
  return m ? `${m}m ${String(seconds % 60).padStart(2, "0")}s` : `${seconds}s`;
}
