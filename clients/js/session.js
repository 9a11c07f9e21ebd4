// A conversation kept by the bridge (the request's `session` field), and its turns.

import { buildRequest } from "./call.js";
import { NAME_RE } from "./exchange.js";

/**
 * A conversation kept by the bridge (the request's `session`): ask sends only the new
 * message; `turns` are this client's asks on it, in order.
 */
export class Session {
  constructor(client, name) {
    if (typeof name !== "string" || !NAME_RE.test(name)) {
      throw new TypeError(`session name must be 1 to 64 of [A-Za-z0-9_.-], got ${JSON.stringify(name)}`);
    }
    this.client = client;
    this.name = name;
    /** @type {{id: string, request: unknown, call: Call, state: string, text: string, finishReason: string|null, error: Error|null}[]} */
    this.turns = [];
  }

  /**
   * One turn: a string (one user message) or a JSON request (its `session` is set).
   * @returns {Call}
   */
  ask(request, handlers) {
    const body = buildRequest(request);
    body.session = this.name;
    const call = this.client.ask(body, handlers);
    call._asker = (req, h) => this.ask(req, h);
    const turn = { id: call.id, request, call, state: "pending", text: "", finishReason: null,
      error: null };
    this.turns.push(turn);
    call.done.then((msg) => {
      Object.assign(turn, { state: "done", text: call.text, finishReason: msg.finish_reason ?? null });
    }, (error) => {
      Object.assign(turn, { state: "error", text: call.text, error });
    });
    return call;
  }

  /**
   * Forget the conversation (on the bridge, and `turns` once it answers "cleared").
   * @returns {Call}
   */
  clear(handlers) {
    const call = this.client.ask({ session: this.name, clear: true }, handlers);
    call.done.then(() => { this.turns.length = 0; }, () => {});
    return call;
  }
}
