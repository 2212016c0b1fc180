// The API key of this tab: kept, sent, asked for, forgotten.
//
// A server with `api_keys` answers 401 to every /api call without `Authorization: Bearer
// <key>`. The page then shows the key form; a key is tried once (GET /api/conversations?
// limit=1, which any valid key may read) before it is kept, so a wrong one is refused on
// the spot. The key only ever travels in the Authorization header, never in a URL.
//
// Where it is kept: sessionStorage, not localStorage. sessionStorage belongs to this tab
// and is gone when the tab closes; localStorage would write the key to disk for good and
// hand it to every later visitor of this browser profile and every tab of the origin. (A
// cookie would be worse still: the browser would attach it to requests other sites make
// to this server.) Any script of this origin could read either storage, which is why the
// page allows no script but its own files (Content-Security-Policy) and never turns server
// text into markup.

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);
const STORAGE_NAME = "trellis.api_key";
const PROBE = "/api/conversations?limit=1";

let memoryKey = null; // when the browser refuses storage (some private modes), this tab only
const accepted = new Set(); // callbacks once a key was accepted
const needed = new Set(); // callbacks once the page has no (valid) key: 401, or "sign out"

export function currentKey() {
  try {
    return sessionStorage.getItem(STORAGE_NAME) ?? memoryKey;
  } catch {
    return memoryKey;
  }
}

function keep(key) {
  memoryKey = key;
  try {
    if (key === null) sessionStorage.removeItem(STORAGE_NAME);
    else sessionStorage.setItem(STORAGE_NAME, key);
  } catch {
    // storage unavailable: memoryKey serves this page load
  }
}

// Headers that carry `key` (by default the current one), if there is one.
export function authorization(key = currentKey()) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export function onKeyAccepted(callback) {
  accepted.add(callback);
}

export function onKeyNeeded(callback) {
  needed.add(callback);
}

// A call answered 401: without a key, or with one the server no longer accepts (rotated).
// `sentKey` is the key that call carried: when another has been accepted since (the call
// was on its way while the user signed in), the answer is stale and changes nothing.
export function askForKey(sentKey) {
  if (sentKey !== currentKey()) return;
  const asking = !$("key-form").hidden;
  keep(null);
  showForm(true);
  if (!asking) for (const callback of needed) callback();
}

function showForm(visible, message = "") {
  $("key-form").hidden = !visible;
  $("key-error").textContent = message;
  $("key-error").hidden = message === "";
  $("sign-out").hidden = visible || currentKey() === null;
  if (visible) $("key-input").focus();
}

async function tryKey(key) {
  const headers = { Accept: "application/json", ...authorization(key) };
  const response = await fetch(PROBE, { headers });
  await response.body?.cancel();
  if (response.status === 401) return "That key was refused.";
  if (!response.ok) return `The server answered ${response.status}; try again.`;
  return null;
}

async function submitKey(submit) {
  submit.preventDefault();
  const input = $("key-input");
  const key = input.value.trim();
  if (key === "") return;
  let problem;
  try {
    problem = await tryKey(key);
  } catch {
    problem = "The server cannot be reached.";
  }
  if (problem) {
    showForm(true, problem);
    input.select();
    return;
  }
  input.value = "";
  keep(key);
  showForm(false);
  for (const callback of accepted) callback();
}

function signOut() {
  keep(null);
  showForm(true);
  for (const callback of needed) callback();
}

export function wireKeyForm() {
  $("key-form").addEventListener("submit", submitKey);
  $("sign-out").addEventListener("click", signOut);
  $("sign-out").hidden = currentKey() === null;
}
