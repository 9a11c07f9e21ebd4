// Sizes of MQTT PUBLISH packets, counted exactly as the bridge counts them
// (bridge/protocol/packet.py, docs/protocol.md "Message size"). Pure functions: no MQTT,
// no Node or browser API beyond TextEncoder.

/** The MQTT 5 Content Type of every reply message the bridge publishes. */
export const REPLY_CONTENT_TYPE = "application/json";

const MAX_REMAINING = 268_435_455; // the largest Remaining Length
const PROPERTY_ID = 1; // each property starts with a one-byte identifier
const BINARY_LENGTH = 2; // UTF-8 strings and binary data carry a two-byte length
const encoder = new TextEncoder();

/**
 * The topic's size on the wire in UTF-8. A lone surrogate becomes U+FFFD (3 bytes), the
 * same count as the bridge's "surrogatepass" encoding gives it.
 * @param {string} topic
 * @returns {number}
 */
export function topicBytes(topic) {
  return encoder.encode(topic).length;
}

/**
 * Size of `value` as an MQTT Variable Byte Integer (1 to 4 bytes).
 * @param {number} value
 * @returns {number}
 * @throws {RangeError} when `value` is not an integer from 0 to 268,435,455.
 */
export function varintBytes(value) {
  if (!Number.isInteger(value) || value < 0 || value > MAX_REMAINING) {
    throw new RangeError(`${value} is not a Variable Byte Integer (0 to ${MAX_REMAINING})`);
  }
  return value < 128 ? 1 : value < 16_384 ? 2 : value < 2_097_152 ? 3 : 4;
}

/**
 * Size of the MQTT 5 property section of a reply as a device receives it: Content Type and,
 * when the request had one, Correlation Data (counted for MQTT 3.1.1 devices too).
 * @param {number|null|undefined} correlationDataLength
 * @returns {number}
 */
export function replyPropertiesBytes(correlationDataLength) {
  let body = PROPERTY_ID + BINARY_LENGTH + REPLY_CONTENT_TYPE.length;
  if (correlationDataLength !== null && correlationDataLength !== undefined) {
    body += PROPERTY_ID + BINARY_LENGTH + correlationDataLength;
  }
  return varintBytes(body) + body;
}

/**
 * Size of the PUBLISH packet that carries a reply of `payloadLength` bytes on `topic`:
 * fixed header (1 byte and the Remaining Length), topic with its 2-byte length, a 2-byte
 * packet id (counted always), the property section and the payload.
 * @param {string} topic
 * @param {number} payloadLength
 * @param {number|null} [correlationDataLength] null or absent: no Correlation Data.
 * @returns {number}
 */
export function packetBytes(topic, payloadLength, correlationDataLength = null) {
  if (typeof topic !== "string") throw new TypeError("packetBytes: topic must be a string");
  if (!Number.isInteger(payloadLength) || payloadLength < 0) {
    throw new TypeError("packetBytes: payloadLength must be a non-negative integer");
  }
  const rest = BINARY_LENGTH + topicBytes(topic) + 2
    + replyPropertiesBytes(correlationDataLength) + payloadLength;
  return 1 + varintBytes(rest) + rest;
}

/**
 * The size of a packet as MQTT.js parsed it (mqtt-packet keeps the Remaining Length in
 * `packet.length`): what really arrived. null when the packet does not say.
 * @param {{length?: number}|undefined} packet
 * @returns {number|null}
 */
export function receivedPacketBytes(packet) {
  const rest = packet && packet.length;
  return Number.isInteger(rest) && rest >= 0 ? 1 + varintBytes(rest) + rest : null;
}
