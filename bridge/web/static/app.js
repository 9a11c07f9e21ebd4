// Placeholder of the web playground: connects to the broker the bridge's config.json
// names and lists the bridges from their retained status. The full page replaces it.
import mqtt from "mqtt";

const $ = (id) => document.getElementById(id);

function show(state, text = state) {
  const out = $("connection");
  out.dataset.state = state;
  out.textContent = text;
}

function showBridge(id, status) {
  let item = document.querySelector(`li[data-bridge="${CSS.escape(id)}"]`);
  if (status === null) {  // an empty retained message: the status was cleared
    item?.remove();
    return;
  }
  if (!item) {
    item = document.createElement("li");
    item.dataset.bridge = id;
    $("bridges").append(item);
  }
  item.dataset.state = status.state ?? "unknown";
  item.textContent = `${id}: ${status.state ?? "unknown"}`;
}

async function main() {
  // config.json comes from `llamacpp-mqtt-bridge run --web-port`; a plain static server
  // serves the shipped one, whose mqtt_url is null: then ?mqtt_url=..., else the
  // WebSocket listener of mosquitto/mosquitto.conf on the page's host.
  const config = await (await fetch("./config.json", { cache: "no-store" })).json();
  const url = new URLSearchParams(location.search).get("mqtt_url")
    ?? config.mqtt_url ?? `ws://${location.hostname}:9001`;
  const prefix = config.prefix ?? "llm";
  $("broker").textContent = url;
  const client = mqtt.connect(url, {
    clientId: `web-${Math.random().toString(16).slice(2, 10)}`,
    protocolVersion: config.protocol_version ?? 5,
    username: config.username,
    password: config.password,
    reconnectPeriod: 2000,
  });
  client.on("connect", () => {
    show("connected");
    client.subscribe(`${prefix}/status/+`, { qos: 1 });
  });
  client.on("offline", () => show("offline"));
  client.on("error", (err) => show("error", `error: ${err.message}`));
  client.on("message", (topic, payload) => {
    const id = topic.slice(`${prefix}/status/`.length);
    let status = null;
    if (payload.length) {
      try {
        status = JSON.parse(new TextDecoder().decode(payload));
      } catch {
        status = { state: "unreadable" };
      }
    }
    showBridge(id, status);
  });
}

main().catch((err) => {
  show("error", `error: ${err.message}`);
  console.error(err);
});
