// Test doubles: a clock whose time moves only when a test says so, and an MQTT.js client
// double that records what is published and lets a test play the broker.

/** Timers that fire when advance() passes their time; no real waiting. */
export class FakeClock {
  constructor() {
    this.t = 1000;
    this.timers = new Map();
    this.nextId = 1;
  }

  now() {
    return this.t;
  }

  setTimeout(fn, ms) {
    const id = this.nextId++;
    this.timers.set(id, { at: this.t + Math.max(0, ms), fn });
    return id;
  }

  clearTimeout(id) {
    this.timers.delete(id);
  }

  /** Move time forward by `ms`, firing due timers in time order. */
  advance(ms) {
    const end = this.t + ms;
    for (;;) {
      let next = null;
      for (const [id, timer] of this.timers) {
        if (timer.at <= end && (next === null || timer.at < next[1].at)) next = [id, timer];
      }
      if (next === null) break;
      this.timers.delete(next[0]);
      this.t = next[1].at;
      next[1].fn();
    }
    this.t = end;
  }

  /** Time until the next timer (Infinity when none). */
  pending() {
    let at = Infinity;
    for (const timer of this.timers.values()) at = Math.min(at, timer.at);
    return at - this.t;
  }
}

/** An MQTT.js client double: the same events and the methods the BridgeClient calls. */
export class FakeMqtt {
  constructor(url, options) {
    this.url = url;
    this.options = { ...options };
    this.connected = false;
    this.published = [];
    this.subscribed = [];
    this.ended = null;
    this.listeners = new Map();
    this.subackCodes = null; // e.g. [128] to refuse a subscription
  }

  on(event, fn) {
    if (!this.listeners.has(event)) this.listeners.set(event, []);
    this.listeners.get(event).push(fn);
    return this;
  }

  emit(event, ...args) {
    for (const fn of this.listeners.get(event) ?? []) fn(...args);
  }

  publish(topic, payload, opts, cb) {
    const text = typeof payload === "string" ? payload : new TextDecoder().decode(payload);
    this.published.push({ topic, payload: text, qos: opts?.qos });
    cb?.(this.publishError ?? null);
  }

  subscribe(topic, opts, cb) {
    this.subscribed.push(topic);
    cb(null, [{ topic, qos: this.subackCodes ? this.subackCodes[0] : opts.qos }]);
  }

  end(force, opts, cb) {
    this.ended = { force, opts };
    this.connected = false;
    cb?.();
  }

  // ------------------------------------------------------------------ playing the broker

  /** CONNACK. */
  acceptConnection(sessionPresent = false) {
    this.connected = true;
    this.emit("connect", { sessionPresent });
  }

  /** The connection broke; MQTT.js emits close, then offline (arming its reconnect timer). */
  drop() {
    this.connected = false;
    this.emit("close");
    this.emit("offline");
  }

  /** A PUBLISH to the client; `message` is a reply object or a raw string. */
  deliver(topic, message, packet = {}) {
    const text = typeof message === "string" ? message : JSON.stringify(message);
    const payload = new TextEncoder().encode(text);
    this.emit("message", topic, payload, packet);
  }

  /** The requests published so far, parsed. */
  requests() {
    return this.published.filter((p) => p.topic.includes("/request/")).map((p) => JSON.parse(p.payload));
  }
}

/** A BridgeClient option set on the doubles; `made` collects the FakeMqtt instances. */
export function fakeOptions(extra = {}) {
  const clock = new FakeClock();
  const made = [];
  const transport = (url, options) => {
    const fake = new FakeMqtt(url, options);
    made.push(fake);
    return fake;
  };
  return { opts: { url: "mqtt://fake:1883", clientName: "unit", clock, transport, ...extra }, clock, made };
}

/** Reply messages of request `id`, numbered from `seq`. */
export function replies(id, seq, ...bodies) {
  return bodies.map((body, i) => ({ id, seq: seq + i, ...body }));
}
