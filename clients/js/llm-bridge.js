// llm-bridge.js: ask a llamacpp-mqtt-bridge from a browser or Node, over MQTT.js.
//
//   import { BridgeClient } from "./llm-bridge.js";
//   const client = new BridgeClient({ url: "ws://127.0.0.1:9001", clientName: "dash-1" });
//   await client.connect();
//   const call = client.ask("Why is the sky blue?", { onText: (t) => out.append(t) });
//   await call.done;
//
// The wire protocol is docs/protocol.md of the bridge; README.md here describes the API.
// No Node-only API at module level: the same file runs in the browser (with an import map
// for "mqtt") and in Node (clients/js/node_modules/mqtt).

import mqtt from "mqtt";
import { Call, buildRequest, checkHandlers } from "./call.js";
import { BridgeError } from "./error.js";
import { CHARS_PER_TOKEN, EVENTS, freshStats, readOptions } from "./options.js";
import { Session } from "./session.js";
import { AnswerStream, TextStream } from "./stream.js";

export { Call } from "./call.js";
export { chatSessionStream, chatStream } from "./chat.js";
export { BridgeError } from "./error.js";
export { Backoff, Exchange, SequenceError, ReplyTimeout, parseReply } from "./exchange.js";
export { systemClock } from "./options.js";
export { packetBytes, receivedPacketBytes, topicBytes, varintBytes } from "./packet.js";
export { Session } from "./session.js";

/** A connection to the broker, asking the bridge(s) behind it as device `clientName`. */
export class BridgeClient {
  /**
   * @param {object} opts see README.md (Options).
   */
  constructor(opts = {}) {
    Object.assign(this, readOptions(opts, (u, o) => mqtt.connect(u, o)));
    /** @type {any} the MQTT.js client, once connect() was called */
    this.mqtt = null;
    /** @type {Map<string, object|null>} bridge id -> its retained status (watchStatus) */
    this.bridges = new Map();
    this.stats = freshStats();
    this.charsPerToken = CHARS_PER_TOKEN;
    this.noDelay = false; // TCP_NODELAY was set on the socket (Node, mqtt:// and mqtts://)
    this.calls = new Map();
    this._listeners = new Map(EVENTS.map((e) => [e, new Set()]));
    this._connecting = null;
    this._everConnected = false;
    this._closed = false;
  }

  /** The broker connection is up. */
  get connected() {
    return Boolean(this.mqtt && this.mqtt.connected);
  }

  /** Listen to "connect", "reconnect", "offline", "close", "error" or "status". */
  on(event, fn) {
    const set = this._listeners.get(event);
    if (!set) throw new TypeError(`unknown event ${JSON.stringify(event)}; known: ${EVENTS.join(", ")}`);
    if (typeof fn !== "function") throw new TypeError("listener must be a function");
    set.add(fn);
    return this;
  }

  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
    return this;
  }

  _emit(event, ...args) {
    for (const fn of this._listeners.get(event)) {
      try {
        fn(...args);
      } catch (error) {
        queueMicrotask(() => { throw error; });
      }
    }
  }

  /**
   * Connect, and subscribe to this client's reply topics. Resolves once both are
   * acknowledged; rejects with a BridgeError (connect_failed, connect_timeout) otherwise.
   * After that MQTT.js reconnects by itself, with backoff.
   * @returns {Promise<void>}
   */
  connect() {
    if (this._closed) return Promise.reject(new Error("this BridgeClient was closed"));
    if (this._connecting) return this._connecting;
    const client = this.transport(this.url, this.mqttOptions);
    this.mqtt = client;
    this._setNoDelay();
    this._connecting = new Promise((resolve, reject) => {
      const timer = this.clock.setTimeout(() => fail(new BridgeError({ code: "connect_timeout",
        local: true, retryable: true,
        message: `no connection to ${this.url} within ${this.connectTimeoutMs / 1000} s` })),
      this.connectTimeoutMs);
      const fail = (error) => {
        if (this._everConnected) return;
        this.clock.clearTimeout(timer);
        this._connecting = null;
        this.mqtt = null;
        client.end(true);
        reject(error);
      };
      this._firstConnect = () => {
        client.subscribe(this.topics.replies, { qos: 1 }, (error, granted) => {
          const refused = granted && granted.find((g) => g.qos >= 128);
          if (error || refused) {
            fail(new BridgeError({ code: "connect_failed", local: true, retryable: false,
              message: `subscribing to ${this.topics.replies} was refused`
                + `${error ? `: ${error.message}` : " (the broker's ACL?)"}`, cause: error }));
            return;
          }
          this.clock.clearTimeout(timer);
          this._everConnected = true;
          resolve();
          this._emit("connect", { reconnect: false });
        });
      };
      this._firstFail = (error) => fail(new BridgeError({ code: "connect_failed", local: true,
        retryable: !/auth|password|username|identifier/i.test(String(error?.message)),
        message: `could not connect to ${this.url}${error ? `: ${error.message}` : ""}`,
        cause: error }));
    });
    client.on("connect", (connack) => this._onConnect(connack));
    client.on("message", (topic, payload, packet) => this._onPublish(topic, payload, packet));
    client.on("offline", () => {
      // MQTT.js arms its reconnect timer with options.reconnectPeriod right after this
      // event (and again after every failed attempt): set the backed-off delay there.
      client.options.reconnectPeriod = this.backoff.next();
      this._emit("offline");
    });
    client.on("reconnect", () => {
      this.stats.reconnectAttempts += 1;
      client.options.reconnectPeriod = this.backoff.next();
      this._emit("reconnect", { attempt: this.backoff.attempt });
    });
    client.on("close", () => {
      if (!this._everConnected) this._firstFail(null);
      this._emit("close");
    });
    client.on("error", (error) => {
      if (!this._everConnected) this._firstFail(error);
      this._emit("error", error);
    });
    return this._connecting;
  }

  _setNoDelay() {
    // Node only: MQTT.js's stream for mqtt:// (mqtts://) is the net.Socket (TLSSocket).
    const stream = this.mqtt?.stream;
    if (stream && typeof stream.setNoDelay === "function") {
      stream.setNoDelay(true);
      this.noDelay = true;
    }
  }

  _onConnect(connack) {
    this._setNoDelay();
    this.backoff.reset();
    this.mqtt.options.reconnectPeriod = this.backoff.minMs;
    if (!this._everConnected) {
      this._firstConnect();
      return;
    }
    this.stats.reconnects += 1;
    if (!connack?.sessionPresent) {
      // The broker kept nothing for us: what a bridge sent meanwhile is gone. Resend every
      // open request now (same id) rather than after a silence: a bridge that finished it
      // replays the answer, one that runs it ignores the copy. Subscribed first, so that
      // a quick replay cannot arrive before the subscription (MQTT.js resubscribes too,
      // but only after flushing its queue).
      this.mqtt.subscribe(this.topics.replies, { qos: 1 }, () => {
        for (const call of this.calls.values()) {
          if (!call.cancelled && call.exchange.canResend()) {
            this.stats.resends += 1;
            this._publishRequest(call);
          }
        }
      });
    }
    this._emit("connect", { reconnect: true, sessionPresent: Boolean(connack?.sessionPresent) });
  }

  _onPublish(topic, payload, packet) {
    if (topic.startsWith(this.topics.replyNs)) {
      this.stats.messages += 1;
      this.stats.bytes += payload.length;
      const call = this.calls.get(topic.slice(this.topics.replyNs.length));
      if (call) call._onPublish(payload, packet);
      else this.stats.unmatched += 1; // an earlier request's, or another page's
    } else if (topic.startsWith(this.topics.statusNs)) {
      const id = topic.slice(this.topics.statusNs.length);
      let status = null;
      if (payload.length) {
        try {
          status = JSON.parse(new TextDecoder().decode(payload));
        } catch {
          return;
        }
      }
      if (status === null) this.bridges.delete(id);
      else this.bridges.set(id, status);
      this._emit("status", id, status);
    }
  }

  /**
   * Follow the bridges' retained status (P/status/+): `bridges` and the "status" event.
   * @returns {Promise<void>} resolved when subscribed.
   */
  watchStatus() {
    if (!this.mqtt) return Promise.reject(new Error("call connect() first"));
    return new Promise((resolve, reject) => {
      const timer = this.clock.setTimeout(() => reject(new BridgeError({ code: "connect_timeout",
        local: true, retryable: true, message: "no SUBACK for the status topic" })), this.connectTimeoutMs);
      this.mqtt.subscribe(`${this.topics.statusNs}+`, { qos: 1 }, (error, granted) => {
        this.clock.clearTimeout(timer);
        if (error || granted?.some((g) => g.qos >= 128)) {
          reject(new BridgeError({ code: "connect_failed", local: true,
            message: `subscribing to ${this.topics.statusNs}+ was refused`, cause: error }));
        } else {
          resolve();
        }
      });
    });
  }

  /**
   * Send a request; its answer comes to `handlers` and to the returned Call's `done`.
   * @param {string|object} request plain text (one user message) or a JSON request.
   * @param {object} [handlers] onStart, onText, onReasoning, onProgress, onDone, onReply,
   *   onError, onMessage, onRestart, onEvent, onResend; and `signal` (an AbortSignal: cancel).
   * @returns {Call}
   * @throws {TypeError} a request that is not a string or a plain object, a bad id, a bad handler.
   */
  ask(request, handlers) {
    const body = buildRequest(request);
    const checked = checkHandlers(handlers);
    if (!this.mqtt) throw new Error("call connect() before ask()");
    if (this._closed) throw new Error("this BridgeClient was closed");
    if (this.calls.has(body.id)) throw new TypeError(`request id ${body.id} is already being asked`);
    let payload;
    try {
      payload = new TextEncoder().encode(JSON.stringify(body));
    } catch (error) {
      throw new TypeError(`request is not JSON: ${error.message}`);
    }
    const call = new Call(this, body, payload, checked);
    this.calls.set(call.id, call);
    this.stats.requests += 1;
    this._publishRequest(call);
    call._schedule();
    const signal = checked.signal;
    if (signal) {
      if (signal.aborted) call.cancel();
      else signal.addEventListener("abort", () => call.cancel(), { once: true });
    }
    return call;
  }

  /** The async-iterator form of ask: `for await (const ev of client.stream(req))`. */
  stream(request, handlers) {
    return new AnswerStream((r, h) => this.ask(r, h), request, handlers);
  }

  /** Text only: `for await (const text of client.streamText(req))`. */
  streamText(request, handlers) {
    return new TextStream((r, h) => this.ask(r, h), request, handlers);
  }

  /** The conversation `name` kept by the bridge for this client. */
  session(name) {
    return new Session(this, name);
  }

  _publishRequest(call) {
    this.mqtt.publish(this.topics.request, call.payload, { qos: 1 }, (error) => {
      if (error && !call.finished) {
        call._fail(new BridgeError({ code: "publish_failed", local: true, retryable: false,
          id: call.id, message: `the broker refused the request: ${error.message}`, cause: error }));
      }
    });
  }

  _publishCancel(call) {
    this.mqtt?.publish(this.topics.cancel, JSON.stringify({ id: call.id }), { qos: 1 }, () => {});
  }

  _forget(call) {
    if (this.calls.get(call.id) === call) this.calls.delete(call.id);
  }

  _answered(call, msg) {
    this.stats.answers += 1;
    const tokens = msg.usage?.completion_tokens;
    if (Number.isInteger(tokens) && tokens > 0) {
      this.stats.tokens += tokens;
      if (call.text.length > 0) this.charsPerToken = call.text.length / tokens;
    }
    let rate = msg.timings?.tokens_per_s;
    if (typeof rate !== "number" && Number.isInteger(tokens) && call.firstTextAt !== null) {
      const s = (this.clock.now() - call.firstTextAt) / 1000; // max_packet may drop timings
      rate = s > 0 ? tokens / s : undefined;
    }
    if (typeof rate === "number" && Number.isFinite(rate)) {
      call.finalTokensPerSecond = rate;
      this.stats.tokensPerSecond = rate;
    }
  }

  /**
   * Fail every open call (BridgeError "closed"), end the MQTT session and the connection.
   * @returns {Promise<void>} resolved when the connection is closed (within connectTimeoutS).
   */
  close() {
    this._closed = true;
    for (const call of [...this.calls.values()]) {
      call._fail(new BridgeError({ code: "closed", local: true, retryable: true, id: call.id,
        message: "the client was closed" }));
    }
    const client = this.mqtt;
    if (!client) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = this.clock.setTimeout(() => client.end(true, {}, () => resolve()),
        this.connectTimeoutMs);
      const props = this._persistent && client.connected ? { properties: { sessionExpiryInterval: 0 } } : {};
      client.end(!client.connected, props, () => {
        this.clock.clearTimeout(timer);
        resolve();
      });
    });
  }
}
