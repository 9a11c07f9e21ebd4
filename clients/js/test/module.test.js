// The client's modules run in a browser too: they import only "mqtt" (an import map gives
// the browser the vendored bundle) and each other, and use no Node-only global.
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { test } from "node:test";

const DIR = new URL("../", import.meta.url);
const MODULES = readdirSync(DIR).filter((f) => f.endsWith(".js"));

test("the client's modules import only mqtt and each other, and use no Node-only API", async () => {
  assert.deepEqual(MODULES.sort(), [
    "call.js", "chat.js", "error.js", "exchange.js", "llm-bridge.js", "options.js", "packet.js",
    "session.js", "stream.js",
  ]);
  for (const file of MODULES) {
    const source = readFileSync(new URL(file, DIR), "utf8");
    const specifiers = [...source.matchAll(/^\s*(?:import|export)\b[^;]*?\bfrom\s+"([^"]+)"/gms)].map((m) => m[1]);
    for (const spec of specifiers) {
      assert.ok(spec === "mqtt" || (spec.startsWith("./") && MODULES.includes(spec.slice(2))),
        `${file} imports ${spec}`);
    }
    assert.doesNotMatch(source, /\brequire\(|\bprocess\.|\bBuffer\b|__dirname|node:/, file);
  }
  const api = await import("../llm-bridge.js");
  for (const name of ["BridgeClient", "BridgeError", "chatStream", "chatSessionStream", "packetBytes"]) {
    assert.equal(typeof api[name], "function", name);
  }
});
