// The async-iterator forms of an ask (client.stream, client.streamText), built on the
// callbacks of a Call.

import { checkHandlers } from "./call.js";
import { BridgeError } from "./error.js";
import { textOf } from "./exchange.js";

/**
 * The async-iterator form of an ask: yields every new reply message in seq order (start,
 * chunk, progress, done or reply) and `{type: "restart", kept, keptReasoning}` when the
 * answer starts again; an `error` reply (or a local failure) is thrown as a BridgeError.
 * Leaving the loop early cancels the request. `call` is the Call (the request is sent when
 * the stream is made).
 */
export class AnswerStream {
  constructor(ask, request, handlers) {
    this._queue = [];
    this._wake = null;
    this._ended = false;
    this._failure = null;
    const push = (ev) => { this._queue.push(ev); this._poke(); };
    this.call = ask(request, {
      ...checkHandlers(handlers),
      onEvent: (msg) => { if (msg.type !== "error") push(msg); handlers?.onEvent?.(msg); },
      onRestart: (kept, keptReasoning) => {
        push({ type: "restart", id: this.call.id, kept, keptReasoning });
        handlers?.onRestart?.(kept, keptReasoning);
      },
    });
    this.call.done.then(() => { this._ended = true; this._poke(); },
      (error) => { this._failure = error; this._ended = true; this._poke(); });
  }

  _poke() {
    const wake = this._wake;
    this._wake = null;
    if (wake) wake();
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  async next() {
    for (;;) {
      if (this._queue.length) return { value: this._queue.shift(), done: false };
      if (this._ended) {
        const failure = this._failure;
        this._failure = null;
        if (failure) throw failure;
        return { value: undefined, done: true };
      }
      await new Promise((resolve) => { this._wake = resolve; });
    }
  }

  async return(value) {
    if (!this.call.finished) this.call.cancel();
    this._queue.length = 0;
    this._ended = true;
    this._failure = null;
    return { value, done: true };
  }
}

/**
 * The text-only async-iterator form: yields the text of each chunk (and a reply's content).
 * An answer that starts again and differs from text already yielded throws BridgeError
 * "answer_changed" (yielded text cannot be taken back).
 */
export class TextStream {
  constructor(ask, request, handlers) {
    this._events = new AnswerStream(ask, request, handlers);
    this.call = this._events.call;
    this._given = 0;
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  async next() {
    for (;;) {
      const { value: ev, done } = await this._events.next();
      if (done) return { value: undefined, done: true };
      if (ev.type === "restart" && ev.kept < this._given) {
        await this._events.return();
        throw new BridgeError({ code: "answer_changed", retryable: true, local: true,
          id: this.call.id, message: `the answer started again and differs after character `
            + `${ev.kept} of the ${this._given} given out` });
      }
      if (ev.type === "restart") this._given = ev.kept;
      const text = textOf(ev);
      if (text) {
        this._given += text.length;
        return { value: text, done: false };
      }
    }
  }

  return(value) {
    return this._events.return(value);
  }
}
