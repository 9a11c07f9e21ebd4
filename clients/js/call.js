// One request in flight (Call), and the checks of what an ask is given. The MQTT side lives
// in llm-bridge.js; the seq rules in exchange.js; the iterator forms in stream.js.

import { BridgeError } from "./error.js";
import {
  Exchange, NAME_RE, ReplyTimeout, SequenceError, digest, parseReply, randomHex,
  reasoningOf, textOf,
} from "./exchange.js";
import { packetBytes, receivedPacketBytes } from "./packet.js";

const HANDLERS = ["onStart", "onText", "onReasoning", "onProgress", "onDone", "onReply",
  "onError", "onMessage", "onRestart", "onEvent", "onResend"];

/**
 * The JSON request an ask sends: a string becomes one user message; an object is copied and
 * gets an id when it has none.
 * @param {unknown} request
 * @returns {object}
 * @throws {TypeError} for anything else, an empty string, or an id the bridge would refuse.
 */
export function buildRequest(request) {
  let body;
  if (typeof request === "string") {
    if (request.trim() === "") throw new TypeError("request: an empty text cannot be asked");
    body = { messages: [{ role: "user", content: request }] };
  } else if (request !== null && typeof request === "object"
      && [Object.prototype, null].includes(Object.getPrototypeOf(request))) {
    body = { ...request };
  } else {
    const what = request === null ? "null" : Array.isArray(request) ? "an array" : typeof request;
    throw new TypeError(`request must be a string or a plain object (a JSON request), got ${what}`);
  }
  if (body.id === undefined || body.id === null) body.id = randomHex(6);
  if (typeof body.id !== "string" || !NAME_RE.test(body.id)) {
    throw new TypeError(`request id must be 1 to 64 of [A-Za-z0-9_.-], got ${JSON.stringify(body.id)}`);
  }
  return body;
}

/** Check the handlers object of an ask. */
export function checkHandlers(handlers) {
  if (handlers === undefined || handlers === null) return {};
  if (typeof handlers !== "object") throw new TypeError("handlers must be an object of callbacks");
  for (const name of HANDLERS) {
    if (handlers[name] !== undefined && typeof handlers[name] !== "function") {
      throw new TypeError(`handlers.${name} must be a function`);
    }
  }
  const { signal } = handlers;
  if (signal !== undefined && (signal === null || typeof signal.addEventListener !== "function")) {
    throw new TypeError("handlers.signal must be an AbortSignal");
  }
  return handlers;
}

function report(error) {
  // A caller's callback threw where nothing can take the error: report it like an event
  // listener's exception (the console, or Node's uncaught-exception handling).
  queueMicrotask(() => { throw error; });
}

/**
 * One request and its answer. Made by BridgeClient.ask; never constructed directly.
 * `done` resolves with the terminal message (done/reply) or rejects with a BridgeError.
 */
export class Call {
  constructor(client, body, payload, handlers) {
    this.client = client;
    this.request = body;
    this.id = body.id;
    this.payload = payload; // the exact bytes, sent again on a resend
    this.handlers = handlers;
    this.topic = `${client.topics.replyNs}${this.id}`;
    const bound = body.max_packet ?? body.chunk_bytes;
    this.bound = Number.isInteger(bound) ? bound : null;
    this.boundKind = Number.isInteger(body.max_packet) ? "packet"
      : Number.isInteger(body.chunk_bytes) ? "chunk" : null;
    this.text = "";
    this.reasoning = "";
    this.chunks = 0;
    this.restarts = 0;
    this.start = null; // the start message
    this.terminal = null; // the done/reply message
    this.error = null;
    this.finished = false;
    this.cancelled = false;
    this.createdAt = client.clock.now();
    this.firstTextAt = null;
    this.finalTokensPerSecond = null;
    this._lens = []; // [text length, reasoning length] by seq, for a restart's `kept`
    this._timer = null;
    this._cancelTimer = null;
    this._asker = (req, h) => client.ask(req, h);
    this.exchange = new Exchange({
      requestId: this.id, now: this.createdAt, resendAfterMs: client.resendAfterMs,
      maxResends: client.maxResends, idleTimeoutMs: client.idleTimeoutMs,
    });
    this.done = new Promise((resolve, reject) => { this._resolve = resolve; this._reject = reject; });
    this.done.catch(() => {}); // callers using callbacks only need not await `done`
  }

  /** Resends of this request so far. */
  get resends() {
    return this.exchange.resends;
  }

  /** The answer's rate: the bridge's tokens_per_s once done, an estimate from characters before. */
  get tokensPerSecond() {
    if (this.finalTokensPerSecond !== null) return this.finalTokensPerSecond;
    if (this.firstTextAt === null) return null;
    const s = (this.client.clock.now() - this.firstTextAt) / 1000;
    return s > 0 ? this.estimatedTokens / s : null;
  }

  /** Tokens received so far, estimated from the characters (learnt from earlier answers). */
  get estimatedTokens() {
    return this.text.length / this.client.charsPerToken;
  }

  /** Ask the bridge to stop; the answer ends with done, finish_reason "cancelled". */
  cancel() {
    if (this.finished || this.cancelled) return;
    this.cancelled = true;
    this.exchange.stopResending(); // a resend could start the cancelled request again
    this.client._publishCancel(this);
    this._armCancelTimer();
  }

  _armCancelTimer() {
    // A bridge that no longer holds the request sends nothing: end the call here once it
    // was silent for as long as a resend would wait.
    const { clock } = this.client;
    if (this._cancelTimer !== null) clock.clearTimeout(this._cancelTimer);
    this._cancelTimer = clock.setTimeout(() => this._finish({
      type: "done", id: this.id, seq: null, finish_reason: "cancelled", local: true,
    }), this.client.resendAfterMs);
  }

  /**
   * The same request again with a new id (and the same handlers unless given).
   * @param {object} [handlers]
   * @returns {Call}
   */
  retry(handlers = this.handlers) {
    const request = { ...this.request };
    delete request.id;
    return this._asker(request, handlers);
  }

  _call(name, ...args) {
    const fn = this.handlers[name];
    if (!fn) return;
    try {
      fn(...args);
    } catch (error) {
      if (this.finished) {
        report(error);
      } else {
        this.client._publishCancel(this); // nobody takes the rest of the answer
        this._fail(error);
      }
    }
  }

  _schedule() {
    const { clock } = this.client;
    if (this._timer !== null) clock.clearTimeout(this._timer);
    this._timer = null;
    if (this.finished) return;
    const wait = Math.max(0, this.exchange.deadline() - clock.now());
    this._timer = clock.setTimeout(() => this._onSilence(), wait);
  }

  _onSilence() {
    this._timer = null;
    if (this.finished) return;
    let resend;
    try {
      resend = this.exchange.onSilence(this.client.clock.now());
    } catch (error) {
      if (!(error instanceof ReplyTimeout)) throw error;
      this._fail(new BridgeError({ code: "reply_timeout", message: error.message, retryable: true,
        local: true, id: this.id, cause: error }));
      return;
    }
    if (resend) {
      this.client.stats.resends += 1;
      this.client._publishRequest(this);
      this._call("onResend", this.exchange.resends);
    }
    this._schedule();
  }

  /** One PUBLISH on this call's reply topic. */
  _onPublish(payload, packet) {
    const now = this.client.clock.now();
    const stats = this.client.stats;
    const msg = parseReply(payload);
    if (msg === null || msg.id !== this.id) {
      stats.undecodable += 1;
      return;
    }
    let delivery = null;
    let gap = null;
    try {
      delivery = this.exchange.onMessage(msg, digest(payload), now);
    } catch (error) {
      if (!(error instanceof SequenceError)) throw error;
      gap = error;
    }
    const correlation = packet?.properties?.correlationData;
    const info = {
      seq: msg.seq, type: msg.type, bytes: payload.length,
      packetBytes: packetBytes(this.topic, payload.length, correlation ? correlation.length : null),
      wireBytes: receivedPacketBytes(packet),
      bound: this.bound, boundKind: this.boundKind,
      duplicate: delivery !== null && delivery.duplicate, gap: gap !== null, oversize: false,
      restarted: delivery !== null && delivery.restartedAt !== null,
    };
    info.oversize = this.boundKind === "packet" ? info.packetBytes > this.bound
      : this.boundKind === "chunk" && msg.type === "chunk" ? info.bytes > this.bound : false;
    this._call("onMessage", msg, info);
    if (this.finished) return;
    if (gap !== null) {
      stats.gaps += 1;
      this.client._publishCancel(this);
      this._fail(new BridgeError({ code: "sequence", message: gap.message, retryable: true,
        local: true, id: this.id, cause: gap }));
      return;
    }
    if (delivery.duplicate) {
      stats.duplicates += 1;
      return;
    }
    if (delivery.restartedAt !== null && !this._restart(delivery.restartedAt)) return;
    this._schedule();
    if (this.cancelled) this._armCancelTimer();
    this._deliver(msg, now);
  }

  /** The answer started again and differs from seq `at` on. False: the call failed. */
  _restart(at) {
    const kept = this._lens.slice(0, at).reduce((n, [t]) => n + t, 0);
    const keptReasoning = this._lens.slice(0, at).reduce((n, [, r]) => n + r, 0);
    const given = this.text.length;
    this._lens.length = at;
    this.text = this.text.slice(0, kept);
    this.reasoning = this.reasoning.slice(0, keptReasoning);
    this.restarts += 1;
    this.client.stats.restarts += 1;
    if (this.handlers.onRestart) {
      this._call("onRestart", kept, keptReasoning);
    } else if (this.handlers.onText && given > kept) {
      this.client._publishCancel(this);
      this._fail(new BridgeError({ code: "answer_changed", retryable: true, local: true, id: this.id,
        message: `the answer started again and differs after character ${kept} of the ${given} `
          + "given out; pass onRestart to follow it" }));
    }
    return !this.finished;
  }

  _deliver(msg, now) {
    const text = textOf(msg);
    const reasoning = reasoningOf(msg);
    this._lens[msg.seq] = [text.length, reasoning.length];
    if (text) {
      this.text += text;
      this.chunks += 1;
      if (this.firstTextAt === null) this.firstTextAt = now;
    }
    if (reasoning) this.reasoning += reasoning;
    this._call("onEvent", msg);
    if (this.finished) return;
    switch (msg.type) {
      case "start":
        this.start = msg;
        this._call("onStart", msg);
        break;
      case "chunk":
        if (text) this._call("onText", text, msg);
        if (reasoning) this._call("onReasoning", reasoning, msg);
        break;
      case "progress":
        this._call("onProgress", msg);
        break;
      case "reply":
        if (text) this._call("onText", text, msg);
        this._finish(msg);
        break;
      case "done":
        this._finish(msg);
        break;
      case "error":
        this._fail(BridgeError.fromReply(msg));
        break;
      default: // a type this client does not know: seen by onMessage and onEvent only
    }
  }

  _settle() {
    const { clock } = this.client;
    this.finished = true;
    if (this._timer !== null) clock.clearTimeout(this._timer);
    if (this._cancelTimer !== null) clock.clearTimeout(this._cancelTimer);
    this._timer = this._cancelTimer = null;
    this.client._forget(this);
  }

  _finish(msg) {
    if (this.finished) return;
    this._settle();
    this.terminal = msg;
    this.client._answered(this, msg);
    this._resolve(msg);
    this._call(msg.type === "reply" ? "onReply" : "onDone", msg);
  }

  _fail(error) {
    if (this.finished) return;
    this._settle();
    this.error = error;
    this.client.stats.errors += 1;
    this._reject(error);
    if (error instanceof BridgeError) this._call("onError", error);
  }
}
