// The conversation view: one conversation's own stream, live
// (GET /api/conversations/{id}/events/stream): its events as they are stored, and `delta`
// frames (token text before the message is stored) as a "typing" line.
//
// One view at a time: opening another, closing it, or the page stopping (no valid key)
// closes its stream. The page passes in what the view reports back (`hooks`).

import { askForKey, authorization, currentKey } from "./api_key.js";
import { ApiError, notify } from "./api.js";
import { followStream } from "./event_stream.js";

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

const EVENTS_SHOWN = 500; // the view keeps the newest ones

// id: the conversation shown (null: none); stream: its followStream.
export const view = { id: null, stream: null };

// onStatus(conversationId, status, time): a status event arrived; onChange(): the view
// opened or closed (rows mark the conversation shown).
const hooks = { onStatus: () => {}, onChange: () => {} };

export function setViewHooks(given) {
  Object.assign(hooks, given);
}

export function openConversation(id, { title, status }) {
  closeConversation();
  view.id = id;
  $("conversation-view").hidden = false;
  $("conversation-title").textContent = title;
  $("conversation-id").textContent = id;
  showStatus(status ?? "");
  view.stream = followStream(`/api/conversations/${encodeURIComponent(id)}/events/stream`, {
    headers: authorization,
    on: {
      message: addEvent,
      delta: addDelta,
      end: (frame) => frame.reason === "deleted" && closeConversation(),
    },
    onRefused: (status, error) => {
      if (status === 401) return askForKey(currentKey());
      closeConversation(); // 404: deleted, or not this key's to see
      if (status !== 404) notify(new ApiError(error?.message ?? `HTTP ${status}`, status));
    },
  });
  hooks.onChange();
}

export function closeConversation() {
  view.stream?.close();
  view.id = null;
  view.stream = null;
  $("conversation-view").hidden = true;
  $("event-list").replaceChildren();
  clearTyping();
  hooks.onChange();
}

export function showStatus(status) {
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
    hooks.onStatus(event.conversation_id, event.payload.status, event.timestamp);
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
