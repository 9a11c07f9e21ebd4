// The message log: every reply message of the current request as it arrived, with its
// size against the request's bound and the seq flags (copy, gap, oversize).
import { byId, el, ms, num } from "./dom.js";

const MAX_ROWS = 2000; // a long answer in small chunks: keep the page light

let rows = 0;

/** Empty the log for a new request. */
export function clearLog(id) {
  rows = 0;
  byId("log").tBodies[0].replaceChildren();
  byId("log-summary").textContent = id ? `Reply messages of request ${id}.` : "";
}

function detail(msg) {
  switch (msg.type) {
    case "start":
      return [msg.model ? `model ${msg.model}` : null,
        msg.queue === undefined ? null : msg.queue === 0 ? "running now" : `queue ${msg.queue}`]
        .filter(Boolean).join(", ");
    case "progress":
      if (msg.prompt_progress?.waiting_ms !== undefined) {
        return `prompt, ${ms(msg.prompt_progress.waiting_ms)}`;
      }
      if (msg.prompt_progress !== undefined) return "prompt";
      if (msg.queued_ms !== undefined) return `queued ${ms(msg.queued_ms)}`;
      return "heartbeat";
    case "chunk":
      return `${(msg.text ?? msg.reasoning ?? "").length} chars${msg.reasoning ? " (reasoning)" : ""}`;
    case "done":
    case "reply": {
      const t = msg.timings ?? {};
      const parts = [msg.finish_reason];
      if (msg.usage?.completion_tokens !== undefined) parts.push(`${msg.usage.completion_tokens} tokens`);
      if (t.tokens_per_s !== undefined) parts.push(`${num(t.tokens_per_s)} tokens/s`);
      if (t.ttft_ms !== undefined) parts.push(`ttft ${ms(t.ttft_ms)}`);
      if (t.total_ms !== undefined) parts.push(`total ${ms(t.total_ms)}`);
      return parts.join(", ");
    }
    case "error":
      return `${msg.code}${msg.retryable ? " (retryable)" : ""}: ${msg.message ?? ""}`;
    default:
      return "";
  }
}

/** One row for `msg` and the client's `info` (seq, type, packetBytes, bound, flags). */
export function logMessage(msg, info) {
  rows += 1;
  const body = byId("log").tBodies[0];
  if (body.rows.length >= MAX_ROWS) body.deleteRow(0);
  const flags = ["duplicate", "gap", "oversize", "restarted"].filter((f) => info[f]);
  const size = info.bound === null || info.bound === undefined
    ? `${info.packetBytes} B`
    : `${info.packetBytes} / ${info.bound} B${info.boundKind === "chunk" ? " (chunk_bytes)" : ""}`;
  body.append(el("tr", {
    className: flags.length ? "flagged" : "",
    dataset: { seq: info.seq ?? "", type: info.type ?? msg.type ?? "?", flags: flags.join(" ") },
  },
  el("td", {}, rows),
  el("td", {}, info.seq ?? "–"),
  el("td", { className: `type ${info.type}` }, info.type ?? msg.type ?? "?"),
  el("td", { className: "size", title: `payload ${info.bytes} B, as received ${info.wireBytes ?? "?"} B` }, size),
  el("td", { className: "flags" }, ...flags.map((f) => el("span", { className: `flag ${f}` }, f))),
  el("td", { className: "detail" }, detail(msg))));
}
