// packetBytes counts like bridge/protocol/packet.py (the expected values were computed by
// its packet_bytes; tests/clients/test_js_client.py checks a table against it live).
import assert from "node:assert/strict";
import { test } from "node:test";

import { packetBytes, receivedPacketBytes, topicBytes, varintBytes } from "../packet.js";

test("packetBytes equals the bridge's packet_bytes", () => {
  const cases = [
    ["llm/reply/a/b", 0, null, 39],
    ["llm/reply/a/b", 10, null, 49],
    ["llm/reply/dash-1/q1", 100, null, 146],
    ["llm/reply/dash-1/q1", 100, 3, 152],
    ["llm/reply/k/été", 200, null, 244],
    ["llm/reply/k/😀", 5000, 0, 5046],
    ["llm/reply/k/x", 16300, null, 16340], // the Remaining Length takes 3 bytes from here
    ["llm/reply/k/x", 2097100, 256, 2097402],
    ["llm/reply/k/\ud800", 3, null, 44], // a lone surrogate: 3 bytes, as "surrogatepass"
  ];
  for (const [topic, payload, correlation, expected] of cases) {
    assert.equal(packetBytes(topic, payload, correlation), expected, `${topic} ${payload} ${correlation}`);
  }
  assert.equal(packetBytes("llm/reply/a/b", 10), 49, "no Correlation Data by default");
});

test("varintBytes, topicBytes and receivedPacketBytes", () => {
  assert.deepEqual([0, 127, 128, 16383, 16384, 2097151, 2097152, 268435455].map(varintBytes),
    [1, 1, 2, 2, 3, 3, 4, 4]);
  assert.throws(() => varintBytes(268435456), RangeError);
  assert.throws(() => varintBytes(-1), RangeError);
  assert.equal(topicBytes("été"), 5);
  assert.equal(receivedPacketBytes({ length: 127 }), 129);
  assert.equal(receivedPacketBytes({ length: 128 }), 131);
  assert.equal(receivedPacketBytes(undefined), null);
  assert.throws(() => packetBytes(5, 1), TypeError);
  assert.throws(() => packetBytes("t", -1), TypeError);
});
