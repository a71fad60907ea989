// The chat page's client of this server's API: fetch with the key, errors in words, and the SSE stream read
// chunk by chunk.

import { getApiKey } from "./store.js";

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export function authHeaders() {
  const key = getApiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

// A failed HTTP answer -> a sentence for the user. The body has OpenAI's error shape when the server sent it.
async function describeFailure(response) {
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch {
    // not JSON (a proxy's page, say): the status alone will do
  }
  const detail = error.message || response.statusText || "no details";
  switch (response.status) {
    case 401:
      return "Error 401: the server refused the API key. Enter the right key above.";
    case 429: {
      const retry = response.headers.get("Retry-After");
      return "Error 429: the server is busy (its queue is full)" + (retry ? "; retry in " + retry + " s." : ".") +
        " " + detail;
    }
    case 400:
      if (error.code === "context_length_exceeded") {
        return "Error 400: this conversation is too long for the model's context. Start a new chat or " +
          "shorten your message. (" + detail + ")";
      }
      return "Error 400: " + detail;
    case 503:
      return "Error 503: the server is not ready (" + detail + "). Try again shortly.";
    default:
      return "Error " + response.status + ": " + detail;
  }
}

export function unreachable(error) {
  return "Cannot reach the server at " + location.origin + " (" + error.message + "). Is it running?";
}

// POST a streaming chat completion and call `onEvent` with every parsed `data:` payload until [DONE].
// Throws ApiError for HTTP failures, for an error sent mid-stream and for a stream cut before [DONE];
// an AbortError when `signal` is aborted (the Stop button).
export async function streamChat(body, signal, onEvent) {
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(unreachable(error), 0);
  }
  if (!response.ok) throw new ApiError(await describeFailure(response), response.status);

  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError("The connection broke before the answer finished (" + error.message + ").", 0);
    }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop(); // the last piece may be half a line
    for (const line of lines) {
      if (!line.startsWith("data:")) continue; // blank separators and SSE comments
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const payload = JSON.parse(data);
      if (payload.error) {
        throw new ApiError("The server reported an error during the answer: " + (payload.error.message || "unknown"), 200);
      }
      onEvent(payload);
    }
  }
  throw new ApiError("The connection closed before the answer finished.", 0);
}
