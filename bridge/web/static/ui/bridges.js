// The bridges grid, live from the retained P/status/+ (one card per bridge).
import { byId, el, num } from "./dom.js";

function backendRow(b) {
  const health = b.healthy === true ? "healthy" : b.healthy === false ? "unhealthy" : "unknown";
  return el("tr", { dataset: { health } },
    el("td", {}, b.name ?? "?"),
    el("td", { className: `health ${health}` }, health),
    el("td", {}, b.active ?? "–", " / ", b.slots ?? "–"),
    el("td", { className: "model" }, b.model ?? b.error ?? ""));
}

function counters(stats) {
  const list = el("dl", { className: "counters" });
  for (const [key, value] of Object.entries(stats ?? {})) {
    if (typeof value !== "number") continue; // nested histograms and texts: not here
    list.append(el("div", {}, el("dt", {}, key), el("dd", {}, num(value, 2))));
  }
  return list;
}

function card(id, status) {
  const state = status.state ?? "unknown";
  const item = el("li", { className: "bridge", dataset: { bridge: id, state } },
    el("h3", {}, el("span", { className: "bridge-name" }, id), " ",
      el("span", { className: "bridge-state badge" }, state)));
  const facts = [];
  if (status.version) facts.push(`v${status.version}`);
  if (status.mqtt) facts.push(`MQTT ${status.mqtt}`);
  if (state === "offline" && status.reason) facts.push(status.reason);
  if (facts.length) item.append(el("p", { className: "facts" }, facts.join(" · ")));
  if (state === "online") {
    item.append(el("p", { className: "load" },
      el("span", { className: "active" }, `active ${status.active ?? "–"}`), " · ",
      el("span", { className: "queued" }, `queued ${status.queued ?? "–"}`)));
    const backends = status.backends ?? [];
    if (backends.length) {
      item.append(el("table", { className: "backends" },
        el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "backend"),
          el("th", { scope: "col" }, "health"), el("th", { scope: "col" }, "busy / slots"),
          el("th", { scope: "col" }, "model"))),
        el("tbody", {}, ...backends.map(backendRow))));
    }
    item.append(counters(status.stats));
  }
  return item;
}

/** Show (or, for null, remove) one bridge's status. */
export function showBridge(id, status) {
  const list = byId("bridges");
  const old = Array.from(list.children).find((li) => li.dataset.bridge === id);
  if (status === null) {
    old?.remove();
  } else if (old) {
    old.replaceWith(card(id, status));
  } else {
    list.append(card(id, status));
  }
  byId("bridges-empty").hidden = list.children.length > 0;
}

/** Forget every card (a new connection brings the retained statuses again). */
export function clearBridges() {
  byId("bridges").replaceChildren();
  byId("bridges-empty").hidden = false;
}
