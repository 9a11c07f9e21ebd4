/*
 * llmb_internal: what the client's own source files share. Private: not part of the
 * API (that is llm_bridge.h), included by the files below and by nothing else.
 *
 *   llm_bridge.c    set-up and state: llmb_init, llmb_active, llmb_reset; valid names
 *   llmb_out.c      bounded output: text, numbers and JSON strings into a caller's buffer
 *   llmb_request.c  the request, the cancel and the topics to publish and subscribe to
 *   llmb_message.c  one reply message's JSON scanned into an llmb_msg
 *   llmb_reply.c    llmb_feed: topic and id, seq order, copies, gaps, restarts, endings
 *   llmb_tick.c     llmb_tick: resends after silence, and the timeout
 *   llmb_json.c, llmb_json_str.c  the JSON scanner and its string decoder (llmb_json.h)
 */
#ifndef LLMB_INTERNAL_H
#define LLMB_INTERNAL_H

#include "llm_bridge.h"
#include "llmb_json.h"

#if LLMB_TEXT_BUF < 8
#error "LLMB_TEXT_BUF must be at least 8"
#endif

/* FNV-1a over the text given, which detects a restarted answer that differs from it */
#define FNV_INIT 2166136261ul

/* ------------------------------------------------------------------- names (llm_bridge.c) */

/* [A-Za-z0-9_.-]{1,64} (request id, session, profile; a client name also needs an
   alphanumeric first character). Returns the length, or 0 if s is not one. */
size_t llmb_id_len(const char *s);

/* ------------------------------------------------------------------- output (llmb_out.c) */

/* A caller's buffer being written: what does not fit is cut off and `over` set. */
typedef struct llmb_out {
    char *p;
    size_t cap; /* including the final NUL */
    size_t len;
    int over;
} llmb_out;

void llmb_out_init(llmb_out *o, char *p, size_t cap);
/* Append s[0..n); what does not fit is cut off (a message may be cut, a request not). */
void llmb_put(llmb_out *o, const char *s, size_t n);
void llmb_puts(llmb_out *o, const char *s);
void llmb_put_uint(llmb_out *o, uint32_t v);
void llmb_put_int(llmb_out *o, int32_t v);
/* milli / 1000 as a JSON number: 700 -> 0.7, 99000 -> 99, 1250 -> 1.25 */
void llmb_put_milli(llmb_out *o, int32_t milli);
/* s[0..n) as a JSON string, quotes included. Bytes of 0x80 and above go as they are
   (the bridge wants UTF-8 and answers anything else with bad_request). */
void llmb_put_json_str(llmb_out *o, const char *s, size_t n);
/* NUL-terminate: the length written, or LLMB_ERR_SPACE (and "") if anything was cut. */
long llmb_out_end(llmb_out *o);

/* ---------------------------------------------------------- reply messages (llmb_message.c) */

enum kind { K_OTHER, K_START, K_CHUNK, K_PROGRESS, K_DONE, K_REPLY, K_ERROR };

/* bits of llmb_msg.has: the members the message carried */
#define HAS_TYPE 0x001u
#define HAS_ID 0x002u
#define HAS_SEQ 0x004u
#define HAS_TEXT 0x008u
#define HAS_CONTENT 0x010u
#define HAS_FINISH 0x020u
#define HAS_CODE 0x040u
#define HAS_MESSAGE 0x080u
#define HAS_BACKEND 0x100u

/* indices of llmb_msg.numbers */
enum { U_PROMPT, U_COMPLETION, T_QUEUE, T_TTFT, T_TOTAL, T_TPS, N_NUMBERS };

/* A reply message: its strings point into the payload, not yet decoded. */
typedef struct llmb_msg {
    unsigned has;
    enum kind kind;
    uint32_t seq;
    llmb_json_str id, text, content, finish_reason, code, message, backend_type;
    int retryable;
    int32_t retry_after_ms;
    int32_t numbers[N_NUMBERS]; /* usage and timings */
} llmb_msg;

/* Scan payload as a reply message. 0, or LLMB_JSON_ERR when it is not one. */
int llmb_parse_message(const void *payload, size_t len, llmb_msg *m);

/* ------------------------------------------------------------------ endings (llmb_reply.c) */

/* End the request with a local error (on_error, local = 1); message was written to c->buf. */
void llmb_finish_local(llmb_client *c, const char *code, int retryable, llmb_out *message);

#endif /* LLMB_INTERNAL_H */
