// BridgeError: how a request ends without an answer, whether the bridge said so or this
// client found out by itself.

/**
 * A request that ended without an answer: an `error` reply of the bridge (`local` false), or
 * a failure seen by this client (`local` true: reply_timeout, sequence, answer_changed,
 * publish_failed, closed, connect_failed, connect_timeout).
 */
export class BridgeError extends Error {
  /**
   * @param {object} f
   * @param {string} f.code
   * @param {string} [f.message] may be "" (the bridge shortens it to fit max_packet).
   * @param {boolean} [f.retryable]
   * @param {number|null} [f.retryAfterMs]
   * @param {string|null} [f.backendType]
   * @param {boolean} [f.local]
   * @param {string|null} [f.id] the request id.
   * @param {object|null} [f.msg] the error reply message, when there is one.
   * @param {unknown} [f.cause]
   */
  constructor({ code, message = "", retryable = false, retryAfterMs = null, backendType = null,
    local = false, id = null, msg = null, cause }) {
    super(message || code, cause === undefined ? undefined : { cause });
    this.name = "BridgeError";
    this.code = code;
    this.retryable = retryable;
    this.retryAfterMs = retryAfterMs;
    this.backendType = backendType;
    this.local = local;
    this.id = id;
    this.msg = msg;
  }

  /** The BridgeError of an `error` reply message (any optional field may be missing). */
  static fromReply(msg) {
    return new BridgeError({
      code: typeof msg.code === "string" ? msg.code : "internal",
      message: typeof msg.message === "string" ? msg.message : "",
      retryable: msg.retryable === true,
      retryAfterMs: Number.isFinite(msg.retry_after_ms) ? msg.retry_after_ms : null,
      backendType: typeof msg.backend_type === "string" ? msg.backend_type : null,
      id: msg.id, msg,
    });
  }
}
