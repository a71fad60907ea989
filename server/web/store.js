// The chat page's storage. Conversations and settings live in localStorage; the API key in sessionStorage (this tab only)
// unless the user asks to remember it, then in localStorage. The key is only ever sent as a header.

export const KEYS = {
  conversations: "tokenferry.conversations",
  current: "tokenferry.current",
  settings: "tokenferry.settings",
  apiKey: "tokenferry.apiKey",
};
export const DEFAULT_SETTINGS = { system: "", temperature: 0.7, top_p: 1, max_tokens: 512 };

export function readJson(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback; // unreadable or corrupted: start afresh rather than break the page
  }
}

export function writeJson(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (error) {
    console.warn("could not save to localStorage", error); // full or disabled: the chat still works
  }
}

export function getApiKey() {
  return sessionStorage.getItem(KEYS.apiKey) || localStorage.getItem(KEYS.apiKey) || "";
}

export function setApiKey(key, remember) {
  sessionStorage.removeItem(KEYS.apiKey);
  localStorage.removeItem(KEYS.apiKey);
  if (key) (remember ? localStorage : sessionStorage).setItem(KEYS.apiKey, key);
}

export function newConversation() {
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  return { id, title: "New chat", messages: [], updated: Date.now() };
}
