// Calls to the JSON API: the tab's key attached, failures as ApiError, the notice line.
//
// A 401 hands over to api_key.js (which shows the key form and tells the page to stop);
// the caller still gets the error, and the notice line leaves it to the form.

import { askForKey, authorization, currentKey } from "./api_key.js";

// status: the HTTP status; code: the error shape's code ("forbidden": an admin key is needed).
export class ApiError extends Error {
  constructor(message, status, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function api(method, path, body) {
  const key = currentKey();
  const init = { method, headers: { Accept: "application/json", ...authorization(key) } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json"; // the guards accept JSON bodies only
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (response.status === 401) askForKey(key);
  if (!response.ok) {
    const message = data?.error?.message ?? `${method} ${path}: HTTP ${response.status}`;
    throw new ApiError(message, response.status, data?.error?.code ?? null);
  }
  return data;
}

// Show `error` in the notice line (null: clear it).
export function notify(error) {
  if (error?.status === 401) return; // the key form says it
  const notice = document.querySelector('[data-testid="notice"]');
  notice.textContent = error ? String(error.message ?? error) : "";
  notice.hidden = !error;
}

// Run `work` (a user's action); its failure goes to the notice line.
export async function act(work) {
  try {
    notify(null);
    await work();
  } catch (error) {
    notify(error);
  }
}
