// tokenferry's chat page. Plain JavaScript, no build step and nothing fetched from elsewhere: it talks to
// this server's own /v1/chat/completions with streaming, exactly as any other OpenAI client does.
//
// Modules, loaded by the browser as they are: markdown.js (escape first, then format), store.js (localStorage),
// api.js (fetch and SSE), and this one, the page.

import { renderMarkdown } from "./markdown.js";
import { KEYS, DEFAULT_SETTINGS, readJson, writeJson, getApiKey, setApiKey, newConversation } from "./store.js";
import { ApiError, authHeaders, unreachable, streamChat } from "./api.js";

// ---------------------------------------------------------------------------------------------------------
// The page.

const $ = (id) => document.getElementById(id);

const state = {
  conversations: [],
  current: null, // the conversation shown
  model: null, // the served model's id, from /v1/models
  streaming: null, // { controller, message } while an answer streams
  renderQueued: false,
};

function currentConversation() {
  return state.conversations.find((c) => c.id === state.current);
}

function saveConversations() {
  // Empty conversations are not worth keeping across reloads.
  writeJson(KEYS.conversations, state.conversations.filter((c) => c.messages.length > 0));
  writeJson(KEYS.current, state.current);
}

function settings() {
  const number = (id, fallback) => {
    const value = Number($(id).value);
    return $(id).value.trim() === "" || !Number.isFinite(value) ? fallback : value;
  };
  return {
    system: $("system-prompt").value,
    temperature: number("temperature", DEFAULT_SETTINGS.temperature),
    top_p: number("top-p", DEFAULT_SETTINGS.top_p),
    max_tokens: Math.round(number("max-tokens", DEFAULT_SETTINGS.max_tokens)),
  };
}

function loadSettings() {
  const saved = { ...DEFAULT_SETTINGS, ...readJson(KEYS.settings, {}) };
  $("system-prompt").value = saved.system;
  $("temperature").value = saved.temperature;
  $("top-p").value = saved.top_p;
  $("max-tokens").value = saved.max_tokens;
}

// The messages sent for the next answer: the system prompt, then every user turn and every answer that
// has text (a stopped answer counts with what it had; error notes are for the reader, not the model).
function historyFor(conversation) {
  const messages = [];
  const system = settings().system.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of conversation.messages) {
    if (m.role === "user" || (m.role === "assistant" && m.content)) messages.push({ role: m.role, content: m.content });
  }
  return messages;
}

function messageElement(message) {
  const element = document.createElement("div");
  element.className = "message " + message.role;
  const content = document.createElement("div");
  content.className = "content";
  element.append(content);
  fillMessage(element, message);
  return element;
}

function fillMessage(element, message) {
  const content = element.querySelector(".content");
  if (message.role === "assistant") {
    content.innerHTML = renderMarkdown(message.content); // escaped inside renderMarkdown
  } else {
    content.textContent = message.content;
  }
  element.classList.toggle("pending", message.content === "" && !message.error && !message.stopped);
  let note = element.querySelector(".note");
  const text = message.error || (message.stopped ? "Stopped." : "");
  if (text && !note) {
    note = document.createElement("p");
    note.className = "note";
    element.append(note);
  }
  if (note) {
    note.textContent = text;
    note.classList.toggle("error", Boolean(message.error));
    note.setAttribute("role", message.error ? "alert" : "status");
  }
}

function renderMessages() {
  const list = $("messages");
  const conversation = currentConversation();
  list.replaceChildren(...(conversation ? conversation.messages.map(messageElement) : []));
  if (!conversation || conversation.messages.length === 0) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Ask anything. Enter sends, Shift+Enter starts a new line.";
    list.append(empty);
  }
  list.scrollTop = list.scrollHeight;
}

function renderConversationList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conversation of [...state.conversations].sort((a, b) => b.updated - a.updated)) {
    if (conversation.messages.length === 0 && conversation.id !== state.current) continue;
    const item = document.createElement("li");
    item.classList.toggle("current", conversation.id === state.current);
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = conversation.title;
    open.addEventListener("click", () => switchTo(conversation.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.title = "Delete this conversation";
    remove.setAttribute("aria-label", "Delete " + conversation.title);
    remove.addEventListener("click", () => deleteConversation(conversation.id));
    item.append(open, remove);
    list.append(item);
  }
}

function render() {
  renderMessages();
  renderConversationList();
  // The header shows the figures of this conversation's last answer, also after a reload.
  const answered = (currentConversation()?.messages ?? []).filter((m) => m.stats);
  if (answered.length) showStats(answered[answered.length - 1].stats);
  else $("stats").textContent = "";
}

function showMenu(open) {
  document.body.classList.toggle("menu-open", open);
  $("menu").setAttribute("aria-expanded", String(open));
}

function switchTo(id) {
  stop();
  state.current = id;
  saveConversations();
  render();
  showMenu(false);
}

function startNewChat() {
  const existing = currentConversation();
  if (existing && existing.messages.length === 0) {
    switchTo(existing.id);
  } else {
    const conversation = newConversation();
    state.conversations.push(conversation);
    switchTo(conversation.id);
  }
  $("input").focus();
}

function deleteConversation(id) {
  if (state.streaming && id === state.current) stop();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (id === state.current) {
    const conversation = newConversation();
    state.conversations.push(conversation);
    state.current = conversation.id;
  }
  saveConversations();
  render();
}

function setStreaming(streaming) {
  $("send").hidden = streaming;
  $("stop").hidden = !streaming;
}

// Repaint the streaming answer at most once per frame, however fast tokens arrive.
function queueRender(element, message) {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(() => {
    state.renderQueued = false;
    const list = $("messages");
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    fillMessage(element, message);
    if (atBottom) list.scrollTop = list.scrollHeight;
  });
}

function showStats(stats) {
  const parts = [];
  if (stats.tokens !== null) parts.push(stats.tokens + " tokens");
  if (stats.ttft !== null) parts.push("first token " + (stats.ttft / 1000).toFixed(2) + " s");
  if (stats.rate !== null) parts.push(stats.rate.toFixed(1) + " tok/s");
  $("stats").textContent = parts.join(" · ");
}

async function send(text) {
  const conversation = currentConversation();
  if (state.streaming || !text.trim() || !conversation) return;
  const user = { role: "user", content: text };
  conversation.messages.push(user);
  if (conversation.title === "New chat") conversation.title = text.trim().slice(0, 40);
  const { temperature, top_p, max_tokens } = settings();
  const body = {
    messages: historyFor(conversation),
    stream: true,
    stream_options: { include_usage: true }, // the last chunk then carries the token counts
    temperature,
    top_p,
    max_tokens,
  };
  if (state.model) body.model = state.model;

  const answer = { role: "assistant", content: "" };
  conversation.messages.push(answer);
  conversation.updated = Date.now();
  saveConversations();
  render();
  $("stats").textContent = "";
  const element = $("messages").lastElementChild;

  const controller = new AbortController();
  state.streaming = { controller, answer };
  setStreaming(true);
  const started = performance.now();
  let first = null;
  let last = null;
  let chunks = 0;
  let usage = null;
  try {
    await streamChat(body, controller.signal, (payload) => {
      if (payload.usage) usage = payload.usage;
      const delta = payload.choices && payload.choices[0] && payload.choices[0].delta;
      if (delta && delta.content) {
        last = performance.now();
        if (first === null) first = last;
        chunks++;
        answer.content += delta.content;
        queueRender(element, answer);
      }
    });
  } catch (error) {
    if (error.name === "AbortError") {
      answer.stopped = true;
    } else {
      answer.error = error instanceof ApiError ? error.message : "Unexpected error: " + error.message;
      if (error.status === 401) showKeyForm("The server refused the API key.");
    }
  } finally {
    state.streaming = null;
    setStreaming(false);
  }
  fillMessage(element, answer);
  $("messages").scrollTop = $("messages").scrollHeight;
  // Without a usage chunk (a stopped answer), the number of text chunks stands in for the token count.
  const tokens = usage ? usage.completion_tokens : chunks;
  const rate = first !== null && last > first && tokens > 1 ? ((tokens - 1) * 1000) / (last - first) : null;
  answer.stats = { tokens: first === null ? null : tokens, ttft: first === null ? null : first - started, rate };
  showStats(answer.stats);
  conversation.updated = Date.now();
  saveConversations();
  renderConversationList();
}

// Stop the answer that is streaming: aborting the fetch closes the connection, and the server cancels the
// request (its row leaves the batch at the next step).
function stop() {
  if (state.streaming) state.streaming.controller.abort();
}

function showKeyForm(message) {
  $("key-form").hidden = false;
  $("key-prompt").textContent = message || "This server needs an API key.";
  $("remember-key").checked = Boolean(localStorage.getItem(KEYS.apiKey));
  $("api-key").focus();
}

// Ask /v1/models for the served model: it names the model and tells whether the key (if any) is accepted.
async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: authHeaders() });
  } catch {
    $("model").textContent = "server unreachable";
    setTimeout(loadModel, 5000);
    return;
  }
  if (response.status === 401) {
    $("model").textContent = "API key needed";
    const hadKey = Boolean(getApiKey());
    showKeyForm(hadKey ? "The server refused this API key." : "This server needs an API key.");
    $("key-status").textContent = hadKey ? "Error 401: wrong API key. Check it and try again." : "";
    return;
  }
  if (!response.ok) {
    $("model").textContent = response.status === 503 ? "model loading…" : "error " + response.status;
    setTimeout(loadModel, 2000);
    return;
  }
  const models = await response.json();
  state.model = models.data && models.data[0] ? models.data[0].id : null;
  $("model").textContent = state.model || "unknown model";
  $("key-form").hidden = true;
  $("key-status").textContent = "";
}

function bindEvents() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.streaming) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    // Enter sends; Shift+Enter (and Enter while an input method composes) stays a newline.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", startNewChat);
  // On a phone the sidebar covers the ☰ button: a tap beside it or Escape closes it again.
  $("menu").addEventListener("click", (event) => {
    event.stopPropagation();
    showMenu(!document.body.classList.contains("menu-open"));
  });
  document.querySelector("main").addEventListener("click", () => showMenu(false));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") showMenu(false);
  });
  for (const id of ["system-prompt", "temperature", "top-p", "max-tokens"]) {
    $(id).addEventListener("change", () => writeJson(KEYS.settings, settings()));
  }
  $("change-key").addEventListener("click", () => showKeyForm("Enter the API key for this server."));
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    setApiKey($("api-key").value.trim(), $("remember-key").checked);
    $("api-key").value = "";
    $("key-status").textContent = "Checking…";
    await loadModel();
  });
}

function init() {
  loadSettings();
  state.conversations = readJson(KEYS.conversations, []).filter((c) => c && Array.isArray(c.messages));
  state.current = readJson(KEYS.current, null);
  if (!currentConversation()) {
    const conversation = newConversation();
    state.conversations.push(conversation);
    state.current = conversation.id;
  }
  bindEvents();
  render();
  loadModel();
  $("input").focus();
}

// For the tests and the browser console: the renderer can be checked against hostile text directly.
window.tokenferry = { renderMarkdown };

init();
