// The connect form: prefilled from config.json (and ?mqtt_url=), makes the BridgeClient.
import { BridgeClient } from "../js/llm-bridge.js";
import { byId } from "./dom.js";

const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

/** "web-" and 8 hex digits: a client name of its own for each page load. */
export function randomName() {
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * What the page's server says (`/config.json`): mqtt_url, prefix, heartbeat_s,
 * protocol_version, and for the local Mosquitto the username and password.
 * A plain static server serves the shipped file (mqtt_url null): the page asks.
 */
export async function loadConfig() {
  let config = {};
  try {
    const response = await fetch("./config.json", { cache: "no-store" });
    if (response.ok) config = await response.json();
  } catch {
    config = {}; // no config.json: the form is filled in by hand
  }
  const url = new URLSearchParams(location.search).get("mqtt_url");
  return { ...config, mqtt_url: url ?? config.mqtt_url ?? null };
}

/** The connection status line. */
export function showConnection(state, text = state) {
  const out = byId("connection");
  out.dataset.state = state;
  out.textContent = text;
}

/** Fill the form from the config; returns whether it names a broker (connect at once). */
export function fillForm(config) {
  const url = config.mqtt_url ?? `ws://${location.hostname || "127.0.0.1"}:9001`;
  byId("mqtt-url").value = url;
  byId("mqtt-username").value = config.username ?? "";
  byId("mqtt-password").value = config.password ?? "";
  // A broker account may only use its own name as the client (the shipped ACL).
  byId("client-name").value = config.username || randomName();
  return Boolean(config.mqtt_url);
}

/** The form's values, checked; throws an Error saying what is wrong. */
export function readForm() {
  const url = byId("mqtt-url").value.trim();
  if (!/^wss?:\/\/./.test(url)) throw new Error("the WebSocket URL starts with ws:// or wss://");
  const username = byId("mqtt-username").value.trim();
  let clientName = byId("client-name").value.trim();
  if (!clientName) clientName = username || randomName();
  if (!NAME.test(clientName)) {
    throw new Error("a client name is 1-64 letters, digits, '_', '.', '-' (first a letter or digit)");
  }
  return { url, username, password: byId("mqtt-password").value, clientName };
}

/** A connected BridgeClient for the form's values, or throws (BridgeError / Error). */
export async function connectClient(form, config) {
  const client = new BridgeClient({
    url: form.url,
    clientName: form.clientName,
    username: form.username || undefined,
    password: form.password || undefined,
    prefix: config.prefix ?? "llm",
    heartbeatS: config.heartbeat_s ?? 5,
    mqttOptions: config.protocol_version ? { protocolVersion: config.protocol_version } : {},
  });
  await client.connect();
  return client;
}
