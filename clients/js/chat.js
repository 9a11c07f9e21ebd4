// The streaming chat calls of the systems this client replaces (callbacks onChunk,
// onComplete, onError), on top of BridgeClient.ask and Session.ask.

/**
 * The streaming chat call of the systems this client replaces: text to onChunk as it
 * arrives, the whole text to onComplete, a BridgeError to onError.
 * @param {BridgeClient} client
 * @param {string|object} data plain text or a JSON request.
 * @returns {Call}
 */
export function chatStream(client, data, onChunk, onComplete, onError) {
  let call = null;
  call = client.ask(data, {
    onText: (text, msg) => onChunk?.(text, msg),
    onDone: (msg) => onComplete?.(call.text, msg),
    onReply: (msg) => onComplete?.(call.text, msg),
    onError: (error) => onError?.(error),
  });
  return call;
}

/** chatStream on the bridge-kept conversation `sessionId`. */
export function chatSessionStream(client, sessionId, data, onChunk, onComplete, onError) {
  let call = null;
  call = client.session(sessionId).ask(data, {
    onText: (text, msg) => onChunk?.(text, msg),
    onDone: (msg) => onComplete?.(call.text, msg),
    onReply: (msg) => onComplete?.(call.text, msg),
    onError: (error) => onError?.(error),
  });
  return call;
}
