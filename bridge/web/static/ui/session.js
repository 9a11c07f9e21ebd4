// The session view: the turns this page asked on its session, and Clear.
import { byId, el } from "./dom.js";

/** Show `session` (a client Session, or null for none) and its turns. */
export function showSession(session) {
  byId("session-name").textContent = session ? session.name : "none";
  byId("session-empty").hidden = Boolean(session);
  byId("clear-session").disabled = !session;
  const list = byId("turns");
  list.replaceChildren(...(session?.turns ?? []).map((turn) => {
    const asked = turn.request.messages?.at(-1)?.content ?? turn.request.prompt ?? "";
    const answer = turn.state === "error" ? `error: ${turn.error?.code ?? "?"}`
      : turn.state === "pending" ? turn.call.text : turn.text ?? "";
    return el("li", { className: "turn", dataset: { state: turn.state } },
      el("p", { className: "asked" }, el("span", { className: "who" }, "you: "), String(asked)),
      el("p", { className: "said" }, el("span", { className: "who" }, "model: "), answer,
        turn.state === "pending" ? " …" : ""));
  }));
}
