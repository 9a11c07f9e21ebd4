// The answer panel: the text as it streams (always as text), the queued / prompt
// indicator, tokens/s and time left, the done's timings and the error.
import { byId, el, ms, num } from "./dom.js";

/** The status line (read out by screen readers: aria-live). */
export function setStatus(state, text) {
  const out = byId("answer-status");
  out.dataset.state = state;
  out.textContent = text;
}

/** Blank the panel for a new request. */
export function resetAnswer(id) {
  byId("answer").textContent = "";
  byId("answer").dataset.state = "pending";
  byId("tool-calls").hidden = true;
  byId("tool-calls").textContent = "";
  byId("answer-error").hidden = true;
  byId("timings").hidden = true;
  byId("timings").replaceChildren();
  byId("prompt-progress").hidden = true;
  byId("request-id").textContent = id ?? "–";
  for (const m of ["rate", "eta", "tokens"]) byId(m).textContent = "–";
  setStatus("sending", "sent, waiting for the bridge");
}

/** The start: queued (n-th in line) or its prompt being processed. */
export function showStart(msg) {
  if (msg.queue > 0) setStatus("queued", `queued: ${msg.queue}. in line`);
  else setStatus("prompt", "processing the prompt");
}

/** A heartbeat: how long queued, how long the backend has had the prompt, or (no field,
 * mid-answer) that the bridge is alive while the backend is slow. */
export function showProgress(msg) {
  const bar = byId("prompt-progress");
  if (msg.prompt_progress !== undefined) {
    const waited = msg.prompt_progress?.waiting_ms;
    bar.hidden = false;
    bar.removeAttribute("value"); // indeterminate: llama-server does not say how far it is
    setStatus("prompt", waited === undefined ? "processing the prompt"
      : `processing the prompt for ${ms(waited)}`);
  } else if (msg.queued_ms !== undefined) {
    setStatus("queued", `queued for ${ms(msg.queued_ms)}`);
  } else if (byId("answer").textContent) {
    setStatus("slow", "generating: the backend is slow, the bridge is alive");
  } else {
    setStatus("waiting", "waiting: the bridge is alive");
  }
}

/** More text: appended as a text node, never parsed. */
export function appendText(text) {
  byId("prompt-progress").hidden = true;
  byId("answer").append(text);
  setStatus("generating", "generating");
}

/** The answer started again after a resend: keep only `text`. */
export function replaceText(text) {
  byId("answer").textContent = text;
}

/** Live meters: tokens/s and the time left to max_tokens at that rate. */
export function showRate(call, maxTokens) {
  const rate = call.tokensPerSecond;
  const tokens = call.estimatedTokens;
  byId("rate").textContent = num(rate);
  byId("tokens").textContent = `≈${Math.round(tokens)}${maxTokens ? ` / ${maxTokens}` : ""}`;
  if (rate && maxTokens) {
    byId("eta").textContent = `≤ ${ms(Math.max(0, maxTokens - tokens) / rate * 1000)}`;
  }
}

/** The end: finish reason, usage and timings. */
export function showDone(msg, call) {
  const answer = byId("answer");
  answer.dataset.state = msg.finish_reason ?? "done";
  const local = msg.local ? " (no word from the bridge)" : "";
  setStatus(msg.finish_reason === "cancelled" ? "cancelled" : "done",
    `${msg.type} (${msg.finish_reason ?? "?"})${local}`);
  if (msg.tool_calls?.length) {
    byId("tool-calls").hidden = false;
    byId("tool-calls").textContent = JSON.stringify(msg.tool_calls, null, 2);
  }
  byId("rate").textContent = num(call.tokensPerSecond);
  byId("eta").textContent = "0 s";
  if (msg.usage?.completion_tokens !== undefined) byId("tokens").textContent = String(msg.usage.completion_tokens);
  const facts = { ...(msg.timings ?? {}), ...(msg.usage ?? {}) };
  const list = byId("timings");
  list.replaceChildren(...Object.entries(facts).map(([key, value]) =>
    el("div", {}, el("dt", {}, key), el("dd", {}, key.endsWith("_ms") ? ms(value) : num(value)))));
  list.hidden = list.children.length === 0;
}

/** An error of the bridge, of the client (local) or of the form. */
export function showError(err) {
  byId("answer").dataset.state = "error";
  byId("prompt-progress").hidden = true;
  byId("answer-error").hidden = false;
  byId("error-code").textContent = err.code ?? "error";
  byId("error-message").textContent = err.message ?? "";
  byId("error-retryable").textContent = err.retryable
    ? `retryable${err.retryAfterMs ? ` after ${ms(err.retryAfterMs)}` : ""}`
    : "not retryable";
  byId("error-retryable").dataset.retryable = String(Boolean(err.retryable));
  setStatus("error", `error: ${err.code ?? "error"}${err.local ? " (local)" : ""}`);
}
