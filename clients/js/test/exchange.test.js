// The pure protocol logic: seq order, copies, gaps, resends, restarts, and the reconnect
// backoff. Times are numbers passed in: nothing sleeps.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  Backoff, Exchange, ReplyTimeout, SequenceError, digest, parseReply, textOf,
} from "../exchange.js";

const enc = new TextEncoder();

/** Feed a reply object as the bridge would send it (its JSON bytes). */
function feed(ex, body, now) {
  const bytes = enc.encode(JSON.stringify(body));
  return ex.onMessage(parseReply(bytes), digest(bytes), now);
}

function exchange(now = 0) {
  return new Exchange({ requestId: "q", now, resendAfterMs: 1500, maxResends: 3, idleTimeoutMs: 60_000 });
}

test("messages in seq order are handed over; copies are dropped; the terminal one ends it", () => {
  const ex = exchange();
  assert.deepEqual(feed(ex, { type: "start", id: "q", seq: 0 }, 1).messages.map((m) => m.seq), [0]);
  assert.equal(feed(ex, { type: "chunk", id: "q", seq: 1, text: "a" }, 2).messages.length, 1);
  const copy = feed(ex, { type: "chunk", id: "q", seq: 1, text: "a" }, 3);
  assert.equal(copy.duplicate, true);
  assert.equal(copy.messages.length, 0);
  const end = feed(ex, { type: "done", id: "q", seq: 2, finish_reason: "stop" }, 4);
  assert.equal(end.finished, true);
  assert.equal(ex.finished, true);
  assert.equal(feed(ex, { type: "done", id: "q", seq: 2, finish_reason: "stop" }, 5).messages.length, 0);
});

test("a skipped seq is a gap: SequenceError naming both numbers", () => {
  const ex = exchange();
  feed(ex, { type: "start", id: "q", seq: 0 }, 1);
  assert.throws(() => feed(ex, { type: "chunk", id: "q", seq: 2, text: "b" }, 2),
    (e) => e instanceof SequenceError && e.expected === 1 && e.got === 2 && /were lost/.test(e.message));
});

test("silence: resend after 3 heartbeats, at most 3 in a row, then give up at the idle timeout", () => {
  const ex = exchange(0);
  assert.equal(ex.deadline(), 1500);
  assert.equal(ex.onSilence(1499), false, "not due yet");
  assert.equal(ex.onSilence(1500), true);
  assert.equal(ex.deadline(), 3000);
  assert.equal(ex.onSilence(3000), true);
  assert.equal(ex.onSilence(4500), true);
  assert.equal(ex.resends, 3);
  assert.equal(ex.deadline(), 60_000, "no 4th resend: only the idle timeout is left");
  assert.equal(ex.onSilence(59_999), false);
  assert.throws(() => ex.onSilence(60_000), (e) => e instanceof ReplyTimeout && e.resends === 3
    && /after 3 resends/.test(e.message));
});

test("a new message resets the resends in a row and the idle clock", () => {
  const ex = exchange(0);
  assert.equal(ex.onSilence(1500), true);
  assert.equal(ex.onSilence(3000), true);
  feed(ex, { type: "progress", id: "q", seq: 0 }, 3100); // seq 0 need not be start
  assert.equal(ex.deadline(), 4600);
  assert.equal(ex.onSilence(4600), true);
  assert.equal(ex.onSilence(6100), true);
  assert.equal(ex.onSilence(7600), true);
  assert.equal(ex.resends, 5);
  assert.equal(ex.deadline(), 63_100);
});

test("stopResending (a cancel) leaves only the idle timeout", () => {
  const ex = exchange(0);
  ex.stopResending();
  assert.equal(ex.deadline(), 60_000);
  assert.equal(ex.onSilence(30_000), false);
});

test("a replay of a finished answer (copies only) changes nothing", () => {
  const ex = exchange();
  const answer = [{ type: "start", id: "q", seq: 0 }, { type: "chunk", id: "q", seq: 1, text: "Hi" },
    { type: "chunk", id: "q", seq: 2, text: " there" }];
  for (const m of answer) feed(ex, m, 1);
  for (const m of answer) assert.equal(feed(ex, m, 2).duplicate, true);
  const next = feed(ex, { type: "done", id: "q", seq: 3, finish_reason: "stop" }, 3);
  assert.equal(next.restartedAt, null);
  assert.equal(next.finished, true);
});

test("an answer that starts again is followed from where it differs", () => {
  const ex = exchange();
  feed(ex, { type: "start", id: "q", seq: 0 }, 1);
  feed(ex, { type: "chunk", id: "q", seq: 1, text: "The sky" }, 2);
  feed(ex, { type: "chunk", id: "q", seq: 2, text: " is blue" }, 3);
  // the bridge lost the request and answers the resend anew: seq 0 and 1 repeat ...
  assert.equal(feed(ex, { type: "start", id: "q", seq: 0 }, 4).duplicate, true);
  assert.equal(feed(ex, { type: "chunk", id: "q", seq: 1, text: "The sky" }, 5).duplicate, true);
  // ... and seq 2 differs: the new answer from there
  const d = feed(ex, { type: "chunk", id: "q", seq: 2, text: " looks blue" }, 6);
  assert.equal(d.restartedAt, 2);
  assert.equal(d.duplicate, false);
  assert.equal(textOf(d.messages[0]), " looks blue");
  assert.equal(ex.expected, 3);
  assert.equal(feed(ex, { type: "chunk", id: "q", seq: 3, text: "!" }, 7).messages.length, 1);
});

test("a restart from seq 0 (a different start) and one out of order", () => {
  const ex = exchange();
  feed(ex, { type: "start", id: "q", seq: 0, queue: 0 }, 1);
  feed(ex, { type: "chunk", id: "q", seq: 1, text: "x" }, 2);
  const d = feed(ex, { type: "start", id: "q", seq: 0, queue: 2 }, 3);
  assert.equal(d.restartedAt, 0);
  assert.equal(ex.expected, 1);

  const other = exchange();
  feed(other, { type: "start", id: "q", seq: 0 }, 1);
  feed(other, { type: "chunk", id: "q", seq: 1, text: "x" }, 2);
  feed(other, { type: "chunk", id: "q", seq: 2, text: "y" }, 3);
  // seq 2 differs but seq 0 and 1 of the new answer never came: not a restart we can follow
  assert.throws(() => feed(other, { type: "chunk", id: "q", seq: 2, text: "z" }, 4), SequenceError);
});

test("parseReply takes messages with optional fields missing and refuses non-messages", () => {
  assert.deepEqual(parseReply('{"type":"done","id":"q","seq":3,"finish_reason":"stop"}'),
    { type: "done", id: "q", seq: 3, finish_reason: "stop" });
  assert.deepEqual(parseReply('{"type":"error","id":"q","seq":0,"code":"bad_request","retryable":false}').code,
    "bad_request");
  for (const bad of ["", "nope", "[1]", "null", '{"type":"chunk","id":"q"}', '{"type":"chunk","id":"q","seq":-1}',
    '{"type":"chunk","id":5,"seq":0}', '{"type":"chunk","id":"q","seq":1.5}']) {
    assert.equal(parseReply(bad), null, bad);
  }
  assert.equal(parseReply(new Uint8Array([0xff, 0xfe])), null, "not UTF-8");
});

test("digest tells payloads apart and repeats for the same bytes", () => {
  const a = enc.encode('{"type":"chunk","id":"q","seq":1,"text":"a"}');
  const b = enc.encode('{"type":"chunk","id":"q","seq":1,"text":"b"}');
  assert.equal(digest(a), digest(Uint8Array.from(a)));
  assert.notEqual(digest(a), digest(b));
});

test("Backoff: doubles from minMs to maxMs, jitter lowers by up to half, reset starts again", () => {
  let r = 0;
  const b = new Backoff({ minMs: 100, maxMs: 1000, random: () => r });
  assert.deepEqual([b.next(), b.next(), b.next(), b.next(), b.next(), b.next()], [100, 200, 400, 800, 1000, 1000]);
  b.reset();
  r = 0.999;
  assert.deepEqual([b.next(), b.next(), b.next(), b.next(), b.next()], [100, 100, 200, 400, 500]);
  const random = new Backoff({ minMs: 50, maxMs: 400 });
  for (let i = 0; i < 50; i++) {
    const d = random.next();
    assert.ok(d >= 50 && d <= 400, String(d));
  }
  assert.throws(() => new Backoff({ minMs: 0 }), RangeError);
  assert.throws(() => new Backoff({ minMs: 10, maxMs: 5 }), RangeError);
  assert.throws(() => new Backoff({ jitter: 2 }), RangeError);
});
