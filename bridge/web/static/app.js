// The web playground: connect, watch the bridges, ask, watch the answer and its messages.
// One module per concept under ui/; this one wires them to the page and the client.
import { BridgeError } from "./js/llm-bridge.js";
import {
  appendText, replaceText, resetAnswer, setStatus, showDone, showError, showProgress,
  showRate, showStart,
} from "./ui/answer.js";
import { clearBridges, showBridge } from "./ui/bridges.js";
import { InputError, followMode, readRequest } from "./ui/composer.js";
import { connectClient, fillForm, loadConfig, readForm, showConnection } from "./ui/connect.js";
import { byId } from "./ui/dom.js";
import { clearLog, logMessage } from "./ui/log.js";
import { showSession } from "./ui/session.js";

const page = {
  config: {},
  client: null,
  call: null, // the request shown now
  last: null, // {request, session} of the last Send: what Retry sends again
  session: null, // the client Session of the composer's session name
};

function busy(running) {
  byId("send").disabled = !page.client;
  byId("stop").disabled = !running;
  byId("retry").disabled = running || !page.last || !page.client;
}

function sessionFor(name) {
  if (!name) return null;
  if (page.session?.name !== name) page.session = page.client.session(name);
  return page.session;
}

/** Send `request` (on `sessionName`'s session if given) and show its answer. */
function send(request, sessionName) {
  const session = sessionFor(sessionName);
  page.last = { request, session: sessionName };
  const maxTokens = request.max_tokens;
  const handlers = {
    onStart: (msg) => showStart(msg),
    onProgress: (msg) => showProgress(msg),
    onText: (text) => {
      appendText(text);
      showRate(call, maxTokens);
      if (session) showSession(session);
    },
    onRestart: () => replaceText(call.text),
    onDone: (msg) => showDone(msg, call),
    onReply: (msg) => showDone(msg, call),
    onError: (err) => showError(err),
    onMessage: (msg, info) => logMessage(msg, info),
  };
  const call = session ? session.ask(request, handlers) : page.client.ask(request, handlers);
  page.call = call;
  resetAnswer(call.id);
  clearLog(call.id);
  busy(true);
  showSession(session);
  call.done.catch(() => {}).finally(() => {
    if (page.call === call) busy(false);
    showSession(session);
  });
}

function onSend(event) {
  event.preventDefault();
  if (!page.client || page.call?.finished === false) return;
  try {
    const { request, session } = readRequest();
    send(request, session);
  } catch (err) {
    if (!(err instanceof InputError || err instanceof TypeError)) throw err;
    resetAnswer(null);
    clearLog(null); // nothing was sent
    showError({ code: err.code ?? "invalid_input", message: err.message, retryable: false, local: true });
  }
}

function onRetry() {
  if (!page.last || page.call?.finished === false) return;
  send({ ...page.last.request }, page.last.session);
}

function onClear() {
  const session = page.session;
  if (!session) return;
  const call = session.clear({ onError: (err) => showError(err) });
  call.done.then(() => showSession(session), () => {});
}

async function connect(event) {
  event?.preventDefault();
  byId("connect-error").hidden = true;
  let form;
  try {
    form = readForm();
  } catch (err) {
    byId("connect-error").textContent = err.message;
    byId("connect-error").hidden = false;
    return;
  }
  await disconnect();
  byId("broker").textContent = form.url;
  showConnection("connecting", "connecting");
  byId("connect").disabled = true;
  try {
    const client = await connectClient(form, page.config);
    page.client = client;
    client.on("connect", () => showConnection("connected", "connected"));
    client.on("offline", () => showConnection("offline", "offline, reconnecting"));
    client.on("reconnect", ({ attempt }) => showConnection("connecting", `reconnecting (${attempt})`));
    client.on("status", (id, status) => showBridge(id, status));
    showConnection("connected", "connected");
    byId("disconnect").disabled = false;
    busy(false);
    await client.watchStatus();
  } catch (err) {
    if (!(err instanceof BridgeError)) throw err;
    showConnection("error", `error: ${err.code}`);
    byId("connect-error").textContent = err.message;
    byId("connect-error").hidden = false;
  } finally {
    byId("connect").disabled = false;
  }
}

async function disconnect() {
  const client = page.client;
  if (!client) return;
  page.client = null;
  page.session = null;
  busy(false);
  byId("disconnect").disabled = true;
  clearBridges();
  showSession(null);
  await client.close().catch(() => {});
  showConnection("idle", "not connected");
}

async function main() {
  page.config = await loadConfig();
  byId("connect-form").addEventListener("submit", (e) => { connect(e); });
  byId("disconnect").addEventListener("click", () => { disconnect(); });
  byId("composer").addEventListener("submit", onSend);
  byId("composer").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) byId("composer").requestSubmit();
  });
  byId("stop").addEventListener("click", () => page.call?.cancel());
  byId("retry").addEventListener("click", onRetry);
  byId("clear-session").addEventListener("click", onClear);
  byId("mode").addEventListener("change", followMode);
  byId("session").addEventListener("change", () => {
    try {
      if (page.client) showSession(sessionFor(byId("session").value.trim()));
    } catch (err) {
      if (!(err instanceof TypeError)) throw err;
      showSession(null); // a bad name: said when sending
    }
  });
  followMode();
  if (fillForm(page.config)) await connect();
  else showConnection("idle", "not connected: give the broker's WebSocket URL");
  setStatus("idle", "nothing asked yet");
}

main().catch((err) => {
  showConnection("error", `error: ${err.message}`);
  console.error(err);
});
