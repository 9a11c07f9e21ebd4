// The protocol logic of one request and its replies, without MQTT or timers: the same rules
// as the Python device clients (bridge/mqtt/exchange.py) and docs/protocol.md "Reply
// messages":
//
// * messages of one request come with seq 0, 1, 2 ...; an earlier seq again is a copy
//   (QoS 1 redelivery, or the bridge replaying a finished answer to a resend) and is
//   dropped; a later one than expected means messages were lost (a gap);
// * done, reply and error end the request;
// * the bridge sends a progress heartbeat every heartbeat_s while it holds a request, so
//   silence for 3 heartbeats means the bridge or the broker lost it: resend the same
//   request with the same id, at most maxResends times in a row, and give up after
//   idleTimeoutMs of silence;
// * a bridge that lost the request answers a resend anew from seq 0. Copies of seq 0, 1,
//   ... in order are held back until they either catch up (they were copies) or one
//   differs from what was handed over: from that seq on the answer is a new one (restart).
//
// Times are milliseconds on any monotonic clock, passed in by the caller.

/** Message types that end a request. */
export const TERMINAL_TYPES = new Set(["done", "reply", "error"]);

/** What the `id`, `session` and `profile` fields may be (docs/protocol.md, Request). */
export const NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;
/** What a `{client}` topic level may be (docs/protocol.md, Topics). */
export const CLIENT_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

const decoder = new TextDecoder("utf-8", { fatal: true });

/**
 * A fresh id of `bytes` random bytes in hex (12 hex digits by default, like the Python client).
 * @param {number} [bytes]
 * @returns {string}
 */
export function randomHex(bytes = 6) {
  const buf = new Uint8Array(bytes);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(buf);
  else for (let i = 0; i < bytes; i++) buf[i] = Math.floor(Math.random() * 256); // Node 18
  return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * A 53-bit digest of a payload (cyrb53): tells a copy of a message from a different one.
 * @param {Uint8Array} bytes
 * @returns {number}
 */
export function digest(bytes) {
  let h1 = 0xdeadbeef;
  let h2 = 0x41c6ce57;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    h1 = Math.imul(h1 ^ b, 2654435761);
    h2 = Math.imul(h2 ^ b, 1597334677);
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  return 4294967296 * (2097151 & h2) + (h1 >>> 0);
}

/**
 * A reply message from its payload, or null when it is not one (not UTF-8 JSON, not an
 * object with a string `type`, a string `id` and a non-negative integer `seq`). Optional
 * fields may be missing (a request's max_packet makes the bridge leave them out).
 * @param {Uint8Array|string} payload
 * @returns {object|null}
 */
export function parseReply(payload) {
  let msg;
  try {
    msg = JSON.parse(typeof payload === "string" ? payload : decoder.decode(payload));
  } catch {
    return null;
  }
  if (msg === null || typeof msg !== "object" || Array.isArray(msg)) return null;
  if (typeof msg.type !== "string" || typeof msg.id !== "string") return null;
  if (!Number.isInteger(msg.seq) || msg.seq < 0) return null;
  return msg;
}

/**
 * The text a message adds to the answer: a chunk's `text`, a reply's `content`.
 * @param {object} msg
 * @returns {string}
 */
export function textOf(msg) {
  const text = msg.type === "chunk" ? msg.text : msg.type === "reply" ? msg.content : undefined;
  return typeof text === "string" ? text : "";
}

/**
 * The reasoning text a message adds (a chunk's `reasoning`).
 * @param {object} msg
 * @returns {string}
 */
export function reasoningOf(msg) {
  return msg.type === "chunk" && typeof msg.reasoning === "string" ? msg.reasoning : "";
}

/** Messages of one request were lost (a seq was skipped), or a restart came out of order. */
export class SequenceError extends Error {
  /**
   * @param {string} message
   * @param {number} expected the seq that should have come.
   * @param {number} got the seq that came.
   */
  constructor(message, expected, got) {
    super(message);
    this.name = "SequenceError";
    this.expected = expected;
    this.got = got;
  }
}

/** Nothing arrived for the idle timeout, resends included. */
export class ReplyTimeout extends Error {
  /**
   * @param {string} message
   * @param {number} resends how often the request was sent again.
   */
  constructor(message, resends) {
    super(message);
    this.name = "ReplyTimeout";
    this.resends = resends;
  }
}

/**
 * What one received message means. `messages`: new messages in seq order (empty for a copy);
 * `duplicate`: it was a copy (or held back as a possible restart); `restartedAt`: the answer
 * started again and differs from seq `restartedAt` on (messages before it stand), else null;
 * `finished`: the last of `messages` ends the request.
 * @typedef {{messages: object[], duplicate: boolean, restartedAt: number|null, finished: boolean}} Delivery
 */

const COPY = Object.freeze({ messages: [], duplicate: true, restartedAt: null, finished: false });

/** The replies of one request: order, copies, gaps, the end, and when to resend. */
export class Exchange {
  /**
   * @param {object} opts
   * @param {string} opts.requestId the id of the request.
   * @param {number} opts.now when the request was published (ms).
   * @param {number} [opts.resendAfterMs] silence after which the request is resent.
   * @param {number} [opts.maxResends] resends in a row without a new message in between.
   * @param {number} [opts.idleTimeoutMs] silence after which onSilence gives up.
   * @param {boolean} [opts.canResend] false: never resend (e.g. after a cancel).
   */
  constructor({ requestId, now, resendAfterMs = 15_000, maxResends = 3, idleTimeoutMs = 60_000,
    canResend = true }) {
    this.requestId = requestId;
    this.resendAfterMs = resendAfterMs;
    this.maxResends = maxResends;
    this.idleTimeoutMs = idleTimeoutMs;
    this.resendsAllowed = canResend;
    this.heard = now; // the last message of this request, or the publish
    this.resentAt = null;
    this.resendsInRow = 0;
    this.resends = 0; // in total
    this.finished = false;
    this.digests = []; // of the messages handed over, by seq
    this.rerun = 0; // copies of seq 0, 1, ... seen again in order since the last new one
  }

  /** The seq the next new message must have. */
  get expected() {
    return this.digests.length;
  }

  /** Stop resending (a cancelled request must not be started again by a resend). */
  stopResending() {
    this.resendsAllowed = false;
  }

  canResend() {
    return this.resendsAllowed && this.resendsInRow < this.maxResends;
  }

  /** When onSilence is due if no message of the request arrives before (ms). */
  deadline() {
    const giveUp = this.heard + this.idleTimeoutMs;
    if (!this.canResend()) return giveUp;
    const quietSince = Math.max(this.heard, this.resentAt ?? this.heard);
    return Math.min(giveUp, quietSince + this.resendAfterMs);
  }

  /**
   * Nothing arrived for a while: true when the request is to be resent now.
   * @param {number} now
   * @returns {boolean}
   * @throws {ReplyTimeout} nothing arrived for idleTimeoutMs.
   */
  onSilence(now) {
    if (now >= this.heard + this.idleTimeoutMs) {
      const resent = this.resends ? ` after ${this.resends} resends` : "";
      throw new ReplyTimeout(`no reply for ${this.idleTimeoutMs / 1000} s (request `
        + `${this.requestId})${resent}; is the bridge running?`, this.resends);
    }
    if (!this.canResend() || now < this.deadline()) return false;
    this.resendsInRow += 1;
    this.resends += 1;
    this.resentAt = now;
    return true;
  }

  /**
   * One reply message of this request (parsed), with the digest of its payload.
   * @param {object} msg
   * @param {number} payloadDigest
   * @param {number} now
   * @returns {Delivery}
   * @throws {SequenceError} a seq was skipped (messages were lost).
   */
  onMessage(msg, payloadDigest, now) {
    if (this.finished) return COPY;
    this.heard = now;
    if (msg.seq === this.expected) {
      this.rerun = 0;
      return this.handOver(msg, payloadDigest, null);
    }
    if (msg.seq > this.expected) {
      throw new SequenceError(`expected seq ${this.expected}, got ${msg.seq}: messages of `
        + `request ${this.requestId} were lost`, this.expected, msg.seq);
    }
    if (payloadDigest === this.digests[msg.seq]) {
      // A copy. Copies of seq 0, 1, ... in order may be a new answer repeating the first
      // one: count them until the answer catches up or differs.
      if (msg.seq === this.rerun) this.rerun += 1;
      return COPY;
    }
    if (msg.seq !== this.rerun) {
      throw new SequenceError(`request ${this.requestId}'s answer started again (seq ${msg.seq} `
        + `differs from the first answer's), but ${this.rerun} messages of the new answer `
        + "came before it", this.rerun, msg.seq);
    }
    const at = msg.seq;
    this.digests.length = at;
    this.rerun = 0;
    return this.handOver(msg, payloadDigest, at);
  }

  handOver(msg, payloadDigest, restartedAt) {
    this.digests.push(payloadDigest);
    this.resendsInRow = 0;
    this.resentAt = null;
    this.finished = TERMINAL_TYPES.has(msg.type);
    return { messages: [msg], duplicate: false, restartedAt, finished: this.finished };
  }
}

/**
 * Reconnection delays: exponential from minMs to maxMs, with jitter, reset on success.
 * The n-th delay (from 0) is base = min(maxMs, minMs * factor^n) lowered by up to
 * `jitter` of itself at random, never below minMs.
 */
export class Backoff {
  /**
   * @param {object} [opts]
   * @param {number} [opts.minMs]
   * @param {number} [opts.maxMs]
   * @param {number} [opts.factor]
   * @param {number} [opts.jitter] 0 to 1.
   * @param {() => number} [opts.random] uniform in [0, 1).
   */
  constructor({ minMs = 500, maxMs = 30_000, factor = 2, jitter = 0.5, random = Math.random } = {}) {
    if (!(minMs > 0) || !(maxMs >= minMs)) throw new RangeError("reconnect: need 0 < minMs <= maxMs");
    if (!(factor >= 1)) throw new RangeError("reconnect: factor must be >= 1");
    if (!(jitter >= 0 && jitter <= 1)) throw new RangeError("reconnect: jitter must be 0 to 1");
    Object.assign(this, { minMs, maxMs, factor, jitter, random });
    this.attempt = 0;
  }

  /** The next delay (ms); each call backs off further. */
  next() {
    const base = Math.min(this.maxMs, this.minMs * this.factor ** this.attempt);
    this.attempt += 1;
    return Math.max(this.minMs, Math.round(base * (1 - this.jitter * this.random())));
  }

  /** Connected again: start from minMs next time. */
  reset() {
    this.attempt = 0;
  }
}
