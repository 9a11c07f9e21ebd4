// The composer: the form's fields as one JSON request (checked here only as far as
// needed to build it; the bridge validates the rest and answers bad_request).
import { byId } from "./dom.js";

/** A mistake in the form, shown like an error but never sent. */
export class InputError extends Error {
  constructor(message) {
    super(message);
    this.code = "invalid_input";
    this.retryable = false;
    this.local = true;
  }
}

function numberField(id, name, { integer = true } = {}) {
  const raw = byId(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new InputError(`${name} must be ${integer ? "a whole number" : "a number"}`);
  }
  return value;
}

function jsonField(id, name) {
  const raw = byId(id).value.trim();
  if (raw === "") return undefined;
  try {
    return JSON.parse(raw);
  } catch (err) {
    throw new InputError(`${name} is not JSON: ${err.message}`);
  }
}

/**
 * The request the form describes, and the session name ("" for none).
 * @returns {{request: object, session: string}}
 * @throws {InputError}
 */
export function readRequest() {
  const mode = byId("mode").value;
  const text = byId("input").value;
  const request = {};
  if (mode === "messages") {
    const messages = jsonField("input", "messages");
    if (!Array.isArray(messages)) throw new InputError("messages must be a JSON array");
    request.messages = messages;
  } else if (text.trim() === "") {
    throw new InputError("the prompt is empty");
  } else if (mode === "prompt") {
    request.prompt = text;
  } else {
    request.messages = [{ role: "user", content: text }];
  }
  const profile = byId("profile").value.trim();
  if (profile) request.profile = profile;
  const fields = [["max-tokens", "max_tokens"], ["temperature", "temperature", false],
    ["chunk-bytes", "chunk_bytes"], ["max-packet", "max_packet"]];
  for (const [id, name, integer = true] of fields) {
    const value = numberField(id, name, { integer });
    if (value !== undefined) request[name] = value;
  }
  if (!byId("stream").checked) request.stream = false;
  const tools = jsonField("tools", "tools");
  if (tools !== undefined) {
    if (!Array.isArray(tools)) throw new InputError("tools must be a JSON array");
    request.tools = tools;
  }
  return { request, session: byId("session").value.trim() };
}

/** The label of the input box follows the mode. */
export function followMode() {
  const label = document.querySelector('label[for="input"]');
  const names = { chat: "Message", prompt: "Prompt", messages: "Messages (JSON)" };
  label.firstChild.textContent = `${names[byId("mode").value] ?? "Prompt"} `;
}
