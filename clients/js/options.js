// The options of a BridgeClient: checked, defaulted and turned into the fields the client
// works with (timeouts in ms, topics, MQTT.js options); its clock and fresh statistics.

import { Backoff, CLIENT_RE, randomHex } from "./exchange.js";

export const EVENTS = ["connect", "reconnect", "offline", "close", "error", "status"];
export const CHARS_PER_TOKEN = 4; // a first guess for live token estimates, until an answer says

/** The clock of timers and time stamps; tests pass a fake one. */
export const systemClock = {
  now: () => globalThis.performance?.now() ?? Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (timer) => clearTimeout(timer),
};

function positive(name, value) {
  if (typeof value !== "number" || !(value > 0) || !Number.isFinite(value)) {
    throw new TypeError(`${name} must be a positive number, got ${value}`);
  }
  return value;
}

/** The statistics of a client that has done nothing yet. */
export function freshStats() {
  return {
    messages: 0, bytes: 0, reconnects: 0, reconnectAttempts: 0, duplicates: 0, gaps: 0,
    resends: 0, restarts: 0, undecodable: 0, unmatched: 0, requests: 0, answers: 0, errors: 0,
    tokens: 0, tokensPerSecond: null,
  };
}

/**
 * The client's settings from the options of `new BridgeClient(opts)` (README.md, Options).
 * @param {object} opts
 * @param {function} defaultTransport connects when `opts.transport` is not given.
 * @returns {object} url, clientName, prefix, resendAfterMs, maxResends, idleTimeoutMs,
 *   connectTimeoutMs, backoff, clock, topics, _persistent, mqttOptions, transport.
 * @throws {TypeError} an option of the wrong kind.
 */
export function readOptions(opts, defaultTransport) {
  if (opts === null || typeof opts !== "object") throw new TypeError("BridgeClient options must be an object");
  const {
    url, clientName = `web-${randomHex(4)}`, username, password, prefix = "llm",
    heartbeatS = 5, maxResends = 3, idleTimeoutS = 60, connectTimeoutS = 10,
    sessionExpiryS = 300, reconnect = {}, mqttOptions = {}, clock = systemClock,
    transport = defaultTransport,
  } = opts;
  if (typeof url !== "string" || url === "") throw new TypeError("url must be a broker URL such as ws://host:9001 or mqtt://host:1883");
  if (typeof clientName !== "string" || !CLIENT_RE.test(clientName)) {
    throw new TypeError(`clientName must match ${CLIENT_RE} (one topic level), got ${JSON.stringify(clientName)}`);
  }
  if (typeof prefix !== "string" || prefix === "" || /[+#]/.test(prefix)) {
    throw new TypeError("prefix must be a topic prefix without wildcards");
  }
  if (!Number.isInteger(maxResends) || maxResends < 0) throw new TypeError("maxResends must be an integer >= 0");
  const resendAfterMs = 3 * positive("heartbeatS", heartbeatS) * 1000;
  const idleTimeoutMs = positive("idleTimeoutS", idleTimeoutS) * 1000;
  const connectTimeoutMs = positive("connectTimeoutS", connectTimeoutS) * 1000;
  const backoff = new Backoff(reconnect);
  const v5 = (mqttOptions.protocolVersion ?? 5) === 5;
  const persistent = v5 && sessionExpiryS > 0;
  return {
    url, clientName, prefix, resendAfterMs, maxResends, idleTimeoutMs, connectTimeoutMs,
    backoff, clock,
    topics: {
      request: `${prefix}/request/${clientName}`,
      cancel: `${prefix}/cancel/${clientName}`,
      replyNs: `${prefix}/reply/${clientName}/`,
      replies: `${prefix}/reply/${clientName}/+`,
      statusNs: `${prefix}/status/`,
    },
    _persistent: persistent,
    mqttOptions: {
      protocolVersion: 5, clientId: clientName, username, password, keepalive: 30,
      connectTimeout: connectTimeoutMs, reconnectPeriod: backoff.minMs,
      // A persistent session (MQTT 5, bounded by sessionExpiryS) lets the broker keep the
      // reply messages that arrive while the connection is down: an answer survives a
      // reconnect without a gap.
      clean: !persistent,
      ...(persistent ? { properties: { sessionExpiryInterval: sessionExpiryS } } : {}),
      ...mqttOptions,
    },
    transport,
  };
}
