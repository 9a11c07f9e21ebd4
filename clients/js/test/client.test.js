// BridgeClient on an MQTT.js double and a fake clock: what it publishes, what it hands to
// the caller, resends, restarts, cancel, reconnect backoff, bad input. No broker, no sleeping.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  BridgeClient, BridgeError, chatSessionStream, chatStream, packetBytes,
} from "../llm-bridge.js";
import { fakeOptions, replies } from "../test-support/fakes.js";

const NS = "llm/reply/unit/";

async function connected(extra) {
  const { opts, clock, made } = fakeOptions(extra);
  const client = new BridgeClient(opts);
  const ready = client.connect();
  made[0].acceptConnection();
  await ready;
  return { client, clock, fake: made[0], made };
}

function deliverAll(fake, id, seq, ...bodies) {
  for (const m of replies(id, seq, ...bodies)) fake.deliver(NS + id, m);
}

test("connect: MQTT 5, the client name as id, a persistent session, the reply topics subscribed", async () => {
  const { client, fake } = await connected();
  assert.equal(fake.options.protocolVersion, 5);
  assert.equal(fake.options.clientId, "unit");
  assert.equal(fake.options.clean, false);
  assert.equal(fake.options.properties.sessionExpiryInterval, 300);
  assert.deepEqual(fake.subscribed, ["llm/reply/unit/+"]);
  assert.equal(client.connected, true);
  await client.close();
  assert.deepEqual(fake.ended.opts, { properties: { sessionExpiryInterval: 0 } }, "the session is dropped on close");
});

test("connect fails: a refused subscription, a broker error, no CONNACK in time", async () => {
  const refused = fakeOptions();
  const c1 = new BridgeClient(refused.opts);
  const p1 = c1.connect();
  refused.made[0].subackCodes = [135];
  refused.made[0].acceptConnection();
  await assert.rejects(p1, (e) => e instanceof BridgeError && e.code === "connect_failed" && /ACL/.test(e.message));

  const bad = fakeOptions();
  const c2 = new BridgeClient(bad.opts);
  const p2 = c2.connect();
  bad.made[0].emit("error", new Error("Connection refused: Not authorized"));
  await assert.rejects(p2, (e) => e.code === "connect_failed" && e.retryable === false);
  assert.equal(bad.made[0].ended.force, true, "MQTT.js is stopped, not left reconnecting");

  const slow = fakeOptions({ connectTimeoutS: 2 });
  const c3 = new BridgeClient(slow.opts);
  const p3 = c3.connect();
  slow.clock.advance(2000);
  await assert.rejects(p3, (e) => e.code === "connect_timeout" && e.local === true);
});

test("ask: publishes a JSON request with an id; text, events and the terminal message in order", async () => {
  const { client, fake } = await connected();
  const seen = [];
  const call = client.ask("Why is the sky blue?", {
    onStart: (m) => seen.push(["start", m.seq]),
    onText: (t, m) => seen.push(["text", t, m.seq]),
    onProgress: (m) => seen.push(["progress", m.seq]),
    onDone: (m) => seen.push(["done", m.finish_reason]),
    onMessage: (m, info) => seen.push(["msg", m.seq, info.duplicate, info.gap]),
  });
  const [request] = fake.requests();
  assert.equal(fake.published[0].topic, "llm/request/unit");
  assert.equal(fake.published[0].qos, 1);
  assert.match(call.id, /^[0-9a-f]{12}$/);
  assert.deepEqual(request, { messages: [{ role: "user", content: "Why is the sky blue?" }], id: call.id });
  deliverAll(fake, call.id, 0, { type: "start", queue: 0 }, { type: "progress", prompt_progress: {} },
    { type: "chunk", text: "Rayleigh" }, { type: "chunk", text: " scattering." },
    { type: "done", finish_reason: "stop" });
  const end = await call.done;
  assert.equal(end.type, "done");
  assert.equal(call.text, "Rayleigh scattering.");
  assert.deepEqual(seen.filter((s) => s[0] !== "msg"), [["start", 0], ["progress", 1],
    ["text", "Rayleigh", 2], ["text", " scattering.", 3], ["done", "stop"]]);
  assert.equal(seen.filter((s) => s[0] === "msg").length, 5);
  assert.equal(client.calls.size, 0);
  assert.equal(client.stats.messages, 5);
  assert.equal(client.stats.answers, 1);
});

test("a reply (non-streamed) gives its content to onText and onReply", async () => {
  const { client, fake } = await connected();
  const texts = [];
  let reply = null;
  const call = client.ask({ id: "r1", messages: [], stream: false },
    { onText: (t) => texts.push(t), onReply: (m) => { reply = m; } });
  deliverAll(fake, "r1", 0, { type: "start" }, { type: "reply", content: "Hello", finish_reason: "stop" });
  assert.equal((await call.done).type, "reply");
  assert.deepEqual(texts, ["Hello"]);
  assert.equal(reply.content, "Hello");
});

test("copies are dropped (and counted); onMessage sees them flagged", async () => {
  const { client, fake } = await connected();
  const texts = [];
  const flags = [];
  const call = client.ask({ id: "d1", prompt: "x" }, {
    onText: (t) => texts.push(t), onMessage: (m, info) => flags.push(info.duplicate),
  });
  const [start, a, b, done] = replies("d1", 0, { type: "start" }, { type: "chunk", text: "a" },
    { type: "chunk", text: "b" }, { type: "done", finish_reason: "stop" });
  for (const m of [start, a, a, start, b, a, done]) fake.deliver(NS + "d1", m);
  await call.done;
  assert.deepEqual(texts, ["a", "b"]);
  assert.deepEqual(flags, [false, false, true, true, false, true, false]);
  assert.equal(client.stats.duplicates, 3);
});

test("a gap ends the call with a local, retryable 'sequence' error and cancels the request", async () => {
  const { client, fake } = await connected();
  let info = null;
  let reported = null;
  const call = client.ask({ id: "g1", prompt: "x" }, {
    onMessage: (m, i) => { info = i; }, onError: (e) => { reported = e; },
  });
  deliverAll(fake, "g1", 0, { type: "start" });
  fake.deliver(NS + "g1", { type: "chunk", id: "g1", seq: 2, text: "b" });
  await assert.rejects(call.done, (e) => e instanceof BridgeError && e.code === "sequence"
    && e.local && e.retryable);
  assert.equal(reported.code, "sequence");
  assert.equal(info.gap, true);
  assert.equal(client.stats.gaps, 1);
  assert.deepEqual(fake.published.at(-1), { topic: "llm/cancel/unit", payload: '{"id":"g1"}', qos: 1 });
});

test("an error reply: BridgeError with its fields; optional ones may be missing", async () => {
  const { client, fake } = await connected();
  const call = client.ask({ id: "e1", prompt: "x", temperature: 99 });
  deliverAll(fake, "e1", 0, { type: "error", code: "busy", message: "queue full", retryable: true,
    retry_after_ms: 1500, backend_type: "server_error" });
  await assert.rejects(call.done, (e) => e.code === "busy" && e.message === "queue full"
    && e.retryable === true && e.retryAfterMs === 1500 && e.backendType === "server_error"
    && e.local === false && e.msg.seq === 0);
  const tiny = client.ask({ id: "e2", prompt: "x" });
  deliverAll(fake, "e2", 0, { type: "error", code: "bad_request", retryable: false });
  await assert.rejects(tiny.done, (e) => e.code === "bad_request" && e.message === "bad_request"
    && e.retryAfterMs === null && e.backendType === null);
  const done = client.ask({ id: "e3", prompt: "x" });
  deliverAll(fake, "e3", 0, { type: "start" }, { type: "done", finish_reason: "length" });
  assert.equal((await done.done).finish_reason, "length", "done without usage or timings");
});

test("silence: the same payload again after 3*heartbeatS, 3 times, then reply_timeout", async () => {
  const { client, clock, fake } = await connected({ heartbeatS: 5, idleTimeoutS: 60 });
  const resent = [];
  const call = client.ask({ id: "s1", prompt: "anyone?" }, { onResend: (n) => resent.push(n) });
  clock.advance(14_999);
  assert.equal(fake.requests().length, 1);
  clock.advance(1);
  assert.equal(fake.requests().length, 2);
  clock.advance(30_000);
  assert.equal(fake.requests().length, 4);
  assert.equal(new Set(fake.published.map((p) => p.payload)).size, 1, "resent byte for byte");
  assert.deepEqual(resent, [1, 2, 3]);
  clock.advance(14_999);
  assert.equal(call.finished, false);
  clock.advance(1);
  await assert.rejects(call.done, (e) => e.code === "reply_timeout" && e.local && e.retryable
    && /after 3 resends/.test(e.message));
  assert.equal(client.stats.resends, 3);
  assert.equal(clock.pending(), Infinity, "no timer left behind");
});

test("heartbeats keep a request alive without resends", async () => {
  const { client, clock, fake } = await connected({ heartbeatS: 1 });
  const call = client.ask({ id: "h1", prompt: "x" });
  deliverAll(fake, "h1", 0, { type: "start", queue: 3 });
  for (let seq = 1; seq <= 100; seq++) {
    clock.advance(1000);
    fake.deliver(NS + "h1", { type: "progress", id: "h1", seq, queued_ms: seq * 1000 });
  }
  fake.deliver(NS + "h1", { type: "done", id: "h1", seq: 101, finish_reason: "stop" });
  await call.done;
  assert.equal(fake.requests().length, 1);
});

test("a resend answered anew: onRestart(kept) and the text follows the new answer", async () => {
  const { client, clock, fake } = await connected({ heartbeatS: 1 });
  const restarts = [];
  const call = client.ask({ id: "x1", prompt: "p" }, { onRestart: (kept) => restarts.push([kept, call.text]) });
  const first = replies("x1", 0, { type: "start" }, { type: "chunk", text: "The sky" },
    { type: "chunk", text: " is blue" });
  for (const m of first) fake.deliver(NS + "x1", m);
  clock.advance(3000); // silence: resent
  assert.equal(fake.requests().length, 2);
  fake.deliver(NS + "x1", first[0]);
  fake.deliver(NS + "x1", first[1]);
  deliverAll(fake, "x1", 2, { type: "chunk", text: " looks blue" }, { type: "done", finish_reason: "stop" });
  await call.done;
  assert.deepEqual(restarts, [[7, "The sky"]]);
  assert.equal(call.text, "The sky looks blue");
  assert.equal(call.restarts, 1);
  assert.equal(client.stats.restarts, 1);
});

test("a changed answer without onRestart fails 'answer_changed' when text was given out", async () => {
  const { client, fake } = await connected();
  const call = client.ask({ id: "x2", prompt: "p" }, { onText: () => {} });
  deliverAll(fake, "x2", 0, { type: "start" }, { type: "chunk", text: "a" });
  fake.deliver(NS + "x2", { type: "start", id: "x2", seq: 0, queue: 1 });
  await assert.rejects(call.done, (e) => e.code === "answer_changed");
});

test("cancel publishes {id} on P/cancel/{client}; the answer ends 'cancelled' and no resend follows", async () => {
  const { client, clock, fake } = await connected({ heartbeatS: 1 });
  const call = client.ask({ id: "c1", prompt: "count" });
  deliverAll(fake, "c1", 0, { type: "start" }, { type: "chunk", text: "one" });
  call.cancel();
  call.cancel(); // once is enough
  assert.deepEqual(fake.published.filter((p) => p.topic === "llm/cancel/unit").map((p) => p.payload), ['{"id":"c1"}']);
  deliverAll(fake, "c1", 2, { type: "done", finish_reason: "cancelled" });
  assert.equal((await call.done).finish_reason, "cancelled");

  const lost = client.ask({ id: "c2", prompt: "count" });
  lost.cancel();
  clock.advance(2000);
  deliverAll(fake, "c2", 0, { type: "start" }); // still alive: wait again from here
  clock.advance(2999);
  assert.equal(lost.finished, false);
  clock.advance(1); // then nothing: ended here, without a resend (it would start it again)
  const end = await lost.done;
  assert.deepEqual([end.finish_reason, end.local], ["cancelled", true]);
  assert.equal(fake.requests().filter((r) => r.id === "c2").length, 1);

  const aborter = new AbortController();
  const aborted = client.ask({ id: "c3", prompt: "x" }, { signal: aborter.signal });
  aborter.abort();
  assert.equal(aborted.cancelled, true);
});

test("bad input throws a clear TypeError and publishes nothing", async () => {
  const { client, fake } = await connected();
  for (const bad of [42, null, undefined, ["hi"], true, new Map(), "", "   "]) {
    assert.throws(() => client.ask(bad), TypeError, String(bad));
  }
  assert.throws(() => client.ask({ id: "no spaces", prompt: "x" }), /request id/);
  assert.throws(() => client.ask({ id: 7, prompt: "x" }), TypeError);
  assert.throws(() => client.ask("hi", { onText: "nope" }), /handlers.onText must be a function/);
  assert.throws(() => client.ask("hi", 5), TypeError);
  assert.throws(() => client.ask("hi", { signal: "stop" }), /AbortSignal/);
  const big = { prompt: "x", n: 1n };
  assert.throws(() => client.ask(big), /not JSON/);
  assert.throws(() => client.session("bad name"), TypeError);
  assert.throws(() => new BridgeClient({ url: "mqtt://x", clientName: "a/b" }), TypeError);
  assert.throws(() => new BridgeClient({ url: "mqtt://x", heartbeatS: 0 }), TypeError);
  assert.throws(() => new BridgeClient({}), /url/);
  client.ask({ id: "dup", prompt: "x" });
  assert.throws(() => client.ask({ id: "dup", prompt: "y" }), /already being asked/);
  assert.equal(fake.requests().length, 1);
  assert.throws(() => new BridgeClient(fakeOptions().opts).ask("hi"), /connect\(\)/);
});

test("stream(): every new message in order, restart events, errors thrown; leaving early cancels", async () => {
  const { client, fake } = await connected();
  const stream = client.stream({ id: "it1", prompt: "p" });
  assert.equal(stream.call.id, "it1");
  deliverAll(fake, "it1", 0, { type: "start" }, { type: "chunk", text: "a" });
  fake.deliver(NS + "it1", replies("it1", 1, { type: "chunk", text: "a" })[0]); // a copy
  deliverAll(fake, "it1", 2, { type: "done", finish_reason: "stop" });
  const types = [];
  for await (const ev of stream) types.push(`${ev.type}:${ev.seq}`);
  assert.deepEqual(types, ["start:0", "chunk:1", "done:2"]);

  const failing = client.stream({ id: "it2", prompt: "p" });
  deliverAll(fake, "it2", 0, { type: "start" }, { type: "error", code: "timeout", retryable: true });
  const got = [];
  await assert.rejects((async () => { for await (const ev of failing) got.push(ev.type); })(),
    (e) => e.code === "timeout");
  assert.deepEqual(got, ["start"]);

  const early = client.stream({ id: "it3", prompt: "p" });
  deliverAll(fake, "it3", 0, { type: "start" }, { type: "chunk", text: "x" });
  for await (const ev of early) if (ev.type === "chunk") break;
  assert.equal(early.call.cancelled, true);
  assert.ok(fake.published.some((p) => p.topic === "llm/cancel/unit" && p.payload === '{"id":"it3"}'));
});

test("streamText(): only text; a changed answer after yielded text throws answer_changed", async () => {
  const { client, fake } = await connected();
  const texts = client.streamText({ id: "t1", prompt: "p" });
  deliverAll(fake, "t1", 0, { type: "start" }, { type: "chunk", text: "Hel" }, { type: "chunk", text: "lo" },
    { type: "done", finish_reason: "stop" });
  const parts = [];
  for await (const t of texts) parts.push(t);
  assert.deepEqual(parts, ["Hel", "lo"]);

  const changed = client.streamText({ id: "t2", prompt: "p" });
  deliverAll(fake, "t2", 0, { type: "start" }, { type: "chunk", text: "A" });
  fake.deliver(NS + "t2", { type: "start", id: "t2", seq: 0, model: "other" });
  const out = [];
  await assert.rejects((async () => { for await (const t of changed) out.push(t); })(),
    (e) => e.code === "answer_changed");
  assert.deepEqual(out, ["A"]);
});

test("sessions: requests carry the session; turns recorded; clear empties them", async () => {
  const { client, fake } = await connected();
  const s = client.session("kitchen-chat");
  const c1 = s.ask("My name is Ada.");
  assert.deepEqual(fake.requests().at(-1), { messages: [{ role: "user", content: "My name is Ada." }],
    id: c1.id, session: "kitchen-chat" });
  deliverAll(fake, c1.id, 0, { type: "start" }, { type: "chunk", text: "Hi Ada" }, { type: "done", finish_reason: "stop" });
  await c1.done;
  assert.deepEqual(s.turns.map((t) => [t.state, t.text, t.finishReason]), [["done", "Hi Ada", "stop"]]);
  const again = c1.retry();
  assert.notEqual(again.id, c1.id);
  assert.equal(fake.requests().at(-1).session, "kitchen-chat");
  assert.equal(s.turns.length, 2, "a retried turn is a turn of the session");
  const clear = s.clear();
  assert.deepEqual(fake.requests().at(-1), { session: "kitchen-chat", clear: true, id: clear.id });
  deliverAll(fake, clear.id, 0, { type: "start" }, { type: "done", finish_reason: "cleared" });
  await clear.done;
  assert.equal(s.turns.length, 0);
});

test("chatStream and chatSessionStream: onChunk, onComplete(full text), onError", async () => {
  const { client, fake } = await connected();
  const chunks = [];
  let complete = null;
  const call = chatStream(client, { id: "w1", prompt: "p" }, (t) => chunks.push(t),
    (text, msg) => { complete = [text, msg.finish_reason]; }, () => assert.fail("no error expected"));
  deliverAll(fake, "w1", 0, { type: "start" }, { type: "chunk", text: "x" }, { type: "chunk", text: "y" },
    { type: "done", finish_reason: "stop" });
  await call.done;
  assert.deepEqual(chunks, ["x", "y"]);
  assert.deepEqual(complete, ["xy", "stop"]);

  let failed = null;
  const s = chatSessionStream(client, "sess", "hello", () => {}, () => assert.fail("no completion"),
    (e) => { failed = e; });
  assert.equal(fake.requests().at(-1).session, "sess");
  deliverAll(fake, s.id, 0, { type: "error", code: "internal", retryable: true });
  await assert.rejects(s.done);
  assert.equal(failed.code, "internal");
});

test("onMessage info: sizes, the bound and oversize", async () => {
  const { client, fake } = await connected();
  const infos = [];
  const call = client.ask({ id: "b1", prompt: "p", max_packet: 100 }, { onMessage: (m, i) => infos.push(i) });
  const ok = { type: "start", id: "b1", seq: 0 };
  const long = { type: "chunk", id: "b1", seq: 1, text: "x".repeat(40) };
  fake.deliver(NS + "b1", ok, { length: 40 });
  fake.deliver(NS + "b1", long);
  fake.deliver(NS + "b1", { type: "done", id: "b1", seq: 2, finish_reason: "stop" });
  await call.done;
  const bytes = JSON.stringify(ok).length;
  assert.deepEqual(infos[0], { seq: 0, type: "start", bytes, packetBytes: packetBytes(NS + "b1", bytes),
    wireBytes: 42, bound: 100, boundKind: "packet", duplicate: false, gap: false, oversize: false,
    restarted: false });
  assert.equal(infos[1].oversize, true);
  const chunked = client.ask({ id: "b2", prompt: "p", chunk_bytes: 128 }, { onMessage: (m, i) => infos.push(i) });
  fake.deliver(NS + "b2", { type: "chunk", id: "b2", seq: 0, text: "y".repeat(200) });
  assert.deepEqual([infos.at(-1).boundKind, infos.at(-1).bound, infos.at(-1).oversize], ["chunk", 128, true]);
  chunked.cancel();
});

test("statistics: messages, bytes, tokens and tokens/s (from timings, or usage when timings are left out)", async () => {
  const { client, clock, fake } = await connected();
  const a = client.ask({ id: "st1", prompt: "p" });
  deliverAll(fake, "st1", 0, { type: "start" }, { type: "chunk", text: "abcdefgh" },
    { type: "done", finish_reason: "stop", usage: { completion_tokens: 2 }, timings: { tokens_per_s: 42.5 } });
  await a.done;
  assert.equal(client.stats.tokensPerSecond, 42.5);
  assert.equal(a.tokensPerSecond, 42.5);
  assert.equal(client.charsPerToken, 4);
  const b = client.ask({ id: "st2", prompt: "p" });
  deliverAll(fake, "st2", 0, { type: "chunk", text: "abcd" });
  clock.advance(2000);
  assert.equal(b.estimatedTokens, 1);
  assert.equal(b.tokensPerSecond, 0.5);
  deliverAll(fake, "st2", 1, { type: "done", finish_reason: "stop", usage: { completion_tokens: 10 } });
  await b.done;
  assert.equal(b.tokensPerSecond, 5);
  assert.equal(client.stats.tokens, 12);
  assert.equal(client.stats.messages, 5);
  assert.ok(client.stats.bytes > 100);
  fake.deliver(NS + "nobody", { type: "start", id: "nobody", seq: 0 });
  fake.deliver(NS + "st2", "not json");
  assert.equal(client.stats.unmatched, 2, "no call for them (any more)");
  const open = client.ask({ id: "st3", prompt: "p" });
  fake.deliver(NS + "st3", "not json");
  assert.equal(client.stats.undecodable, 1);
  open.cancel();
});

test("reconnect backoff: MQTT.js's reconnectPeriod set from the backoff on offline and each attempt", async () => {
  const { client, fake } = await connected({ reconnect: { minMs: 100, maxMs: 1000, random: () => 0 } });
  const events = [];
  for (const e of ["offline", "reconnect", "connect", "close"]) client.on(e, () => events.push(e));
  assert.equal(fake.options.reconnectPeriod, 100);
  fake.drop();
  assert.equal(fake.options.reconnectPeriod, 100, "first delay: minMs");
  const periods = [];
  for (let i = 0; i < 5; i++) {
    fake.emit("reconnect"); // an attempt; it fails and MQTT.js waits reconnectPeriod again
    periods.push(fake.options.reconnectPeriod);
    fake.emit("close");
  }
  assert.deepEqual(periods, [200, 400, 800, 1000, 1000]);
  assert.equal(client.stats.reconnectAttempts, 5);
  fake.emit("reconnect");
  fake.acceptConnection(true);
  assert.equal(client.stats.reconnects, 1);
  assert.equal(fake.options.reconnectPeriod, 100, "back to minMs once connected");
  fake.drop();
  assert.equal(fake.options.reconnectPeriod, 100);
  assert.deepEqual(events.slice(0, 3), ["close", "offline", "reconnect"]);
  assert.ok(events.includes("connect"));
});

test("reconnected without the session: open requests are sent again at once", async () => {
  const { client, fake } = await connected();
  const call = client.ask({ id: "rc1", prompt: "p" });
  const finished = client.ask({ id: "rc2", prompt: "p" });
  deliverAll(fake, "rc2", 0, { type: "done", finish_reason: "stop" });
  await finished.done;
  fake.drop();
  fake.acceptConnection(true); // the broker kept the session: nothing to do
  assert.equal(fake.requests().length, 2);
  fake.drop();
  fake.acceptConnection(false);
  assert.deepEqual(fake.requests().map((r) => r.id), ["rc1", "rc2", "rc1"]);
  assert.equal(client.stats.reconnects, 2);
  call.cancel();
});

test("watchStatus: the retained status of each bridge, null when cleared", async () => {
  const { client, fake } = await connected();
  const seen = [];
  client.on("status", (id, status) => seen.push([id, status && status.state]));
  await client.watchStatus();
  assert.ok(fake.subscribed.includes("llm/status/+"));
  fake.deliver("llm/status/b1", { state: "online", backends: [] });
  fake.deliver("llm/status/b1", { state: "offline" });
  fake.deliver("llm/status/b2", "");
  assert.deepEqual(seen, [["b1", "online"], ["b1", "offline"], ["b2", null]]);
  assert.equal(client.bridges.get("b1").state, "offline");
  assert.equal(client.bridges.has("b2"), false);
});

test("a handler that throws ends its call (and cancels the request), not the client", async () => {
  const { client, fake } = await connected();
  const call = client.ask({ id: "th1", prompt: "p" }, { onText: () => { throw new Error("page bug"); } });
  deliverAll(fake, "th1", 0, { type: "chunk", text: "x" });
  await assert.rejects(call.done, /page bug/);
  assert.ok(fake.published.some((p) => p.topic === "llm/cancel/unit"));
  const next = client.ask({ id: "th2", prompt: "p" });
  deliverAll(fake, "th2", 0, { type: "done", finish_reason: "stop" });
  await next.done;
});

test("close fails open calls with 'closed'", async () => {
  const { client } = await connected();
  const call = client.ask({ id: "cl1", prompt: "p" });
  await client.close();
  await assert.rejects(call.done, (e) => e.code === "closed");
  assert.throws(() => client.ask("again"), /closed/);
});
