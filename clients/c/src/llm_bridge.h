/*
 * llm_bridge: the device side of the llamacpp-mqtt-bridge protocol, in portable C99.
 *
 * No malloc, no stdio, no MQTT library: the caller owns every buffer and does the
 * MQTT itself (libmosquitto, PubSubClient, esp-mqtt, ...). This module builds the
 * request, reads each reply message the caller received, and calls back with the
 * text, the end, or the error. The protocol is docs/protocol.md; what a device must do
 * about lost messages and silence is in the README (*Several bridges*).
 *
 * One request at a time per llmb_client (use one client per request in flight):
 *
 *     llmb_client c;
 *     llmb_config cfg = {0};
 *     cfg.client = "kitchen";          // this device's name: P/request/kitchen
 *     cfg.max_packet = 256;            // the MQTT library's receive buffer, whole packet
 *     cfg.on_text = print_text;        // pieces of the answer, as they arrive
 *     cfg.on_done = finished;          // the answer ended (finish_reason, usage ...)
 *     cfg.on_error = failed;           // the bridge's error, or a local one (timeout ...)
 *     llmb_init(&c, &cfg);
 *
 *     char filter[80];                 // P/reply/kitchen/#: subscribe once, before
 *     llmb_reply_filter(&c, filter, sizeof filter);      // the first request
 *     subscribe(filter, 1);
 *
 *     llmb_request r = {0};
 *     r.id = "a1b2c3"; r.prompt = "Why is the sky blue?"; r.max_tokens = 64;
 *     long n = llmb_build_request(&c, &r, topic, sizeof topic, payload, sizeof payload);
 *     publish(topic, payload, n);
 *     while (llmb_active(&c)) {
 *         mqtt_loop();                 // its message callback calls llmb_feed(&c, ...)
 *         if (llmb_tick(&c, millis()) == LLMB_TICK_RESEND)
 *             publish(topic, payload, n);               // the same bytes again
 *     }
 *
 * What the client does with the reply messages (docs/protocol.md, *Reply messages*):
 * every message of the request carries `seq` 0, 1, 2 ...; an earlier seq again is a
 * copy (QoS 1 redelivery, or the bridge replaying a finished answer) and is dropped; a
 * later one than expected means messages were lost: on_error "gap". `done`, `reply` and
 * `error` end the request (exactly one of on_done / on_error is called). Fields a
 * message does not need (the bridge drops optional ones to fit max_packet) may be
 * missing; unknown fields are ignored, and a message of an unknown type takes its seq
 * and does nothing else (so that a newer bridge's extra messages are not taken for a gap).
 * Reasoning chunks ("reasoning" instead of "text") are not passed on: this client does not
 * ask for them.
 *
 * Silence: the bridge sends a `progress` heartbeat every heartbeat_s while it holds a
 * request. After 3 * heartbeat_s without any message of the request, llmb_tick() asks
 * for the same request (same id) to be published again, at most 3 times in a row;
 * after timeout_ms of silence it gives up (on_error "timeout", local). A bridge that
 * lost the request answers the resend anew from seq 0: the client then follows the new
 * answer, passes on only the text beyond what it already gave (checked against a hash
 * of the text given), and tells on_restart. If the new answer differs from the text
 * already given (a temperature above 0 without a seed), on_error "answer_changed".
 *
 * Threads: none here. Call llmb_feed() and llmb_tick() for one client from one thread,
 * or hold a lock around both (esp-mqtt calls back from its own task).
 * Callbacks must not call llmb_feed/llmb_tick/llmb_reset on the client that called
 * them, except on_done and on_error, which are the last thing a request does and may
 * build the next request on the same client.
 */
#ifndef LLM_BRIDGE_H
#define LLM_BRIDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LLMB_VERSION "0.1.0"

/*
 * Bytes of the client's buffer for decoded text and error messages. Text is passed to
 * on_text in pieces of at most this many bytes (never cutting a UTF-8 character); an
 * error message longer than LLMB_TEXT_BUF - 1 bytes is cut (message_truncated).
 * Override with -DLLMB_TEXT_BUF=n (at least 8) for every file that includes this one.
 */
#ifndef LLMB_TEXT_BUF
#define LLMB_TEXT_BUF 128
#endif

#define LLMB_ID_MAX 64     /* longest request id, session, profile (protocol) */
#define LLMB_NAME_MAX 64   /* longest client name (protocol) */
#define LLMB_PREFIX_MAX 64 /* longest topic prefix this client takes */

#define LLMB_ABSENT (-1)   /* a number the message did not carry */

/* Negative results of the functions below. */
#define LLMB_ERR_ARG (-1)   /* a missing or invalid argument (an id with '/', ...) */
#define LLMB_ERR_SPACE (-2) /* the output does not fit the buffer given */

/* What the end of an answer says: a `done` (streamed) or a `reply` (non-streamed). */
typedef struct llmb_done {
    const char *type;          /* "done" or "reply" */
    const char *finish_reason; /* "stop", "length", "cancelled", "cleared", ... */
    /* usage and timings, each LLMB_ABSENT when the message did not carry it (the bridge
       drops them first to make a message fit max_packet); times truncated to whole ms */
    int32_t prompt_tokens;
    int32_t completion_tokens;
    int32_t queue_ms;
    int32_t ttft_ms;
    int32_t total_ms;
    int32_t tokens_per_s;      /* truncated to a whole number */
} llmb_done;

/* Why a request failed: the bridge's `error` message, or a local finding (local = 1). */
typedef struct llmb_error {
    /* The bridge's code (docs/protocol.md, *Errors*: "bad_request", "busy", ...) or,
       when local, one of:
         "gap"            messages of the request were lost (seq skipped); retryable:
                          send the request again (a new id gets a fresh answer)
         "timeout"        no message of the request for timeout_ms, resends included
         "answer_changed" a restarted answer differs from the text already given */
    const char *code;
    const char *message;       /* decoded, NUL-terminated; "" when the bridge left it
                                  out to fit max_packet */
    size_t message_len;
    int message_truncated;     /* 1: cut to fit LLMB_TEXT_BUF */
    int retryable;             /* the same request again (same id) can succeed */
    int32_t retry_after_ms;    /* wait this long before retrying; LLMB_ABSENT if not given */
    const char *backend_type;  /* llama-server's error type for backend_error, or "" */
    int local;                 /* 1: found by this client, not sent by the bridge */
} llmb_error;

typedef struct llmb_config {
    const char *prefix;      /* topic prefix; NULL: "llm". Must outlive the client. */
    const char *client;      /* required: the device's name, [A-Za-z0-9][A-Za-z0-9_.-]{0,63},
                                the {client} of P/request/{client}. Must outlive the client. */
    uint32_t max_packet;     /* the largest MQTT PUBLISH packet the device can receive
                                (its MQTT library's buffer: PubSubClient 256 by default,
                                esp-mqtt 1024); sent in every request so that the bridge
                                makes every reply message fit. 0: not sent. */
    uint32_t heartbeat_s;    /* the bridge's heartbeat_s; 0: 5 */
    uint32_t resend_after_ms;/* silence before a resend; 0: 3 * heartbeat_s */
    int max_resends;         /* resends in a row without an answer; 0: 3; negative: none */
    uint32_t timeout_ms;     /* silence before giving up; 0: (max_resends + 1) * resend_after_ms
                                (60 s with the defaults) */
    /* callbacks (any may be NULL); user is passed back as their first argument */
    void (*on_text)(void *user, const char *text, size_t len); /* text is not NUL-terminated */
    void (*on_done)(void *user, const llmb_done *done);
    void (*on_error)(void *user, const llmb_error *error);
    void (*on_restart)(void *user); /* the answer started again (see above); nothing to undo */
    void *user;
} llmb_config;

/* The request a device sends (docs/protocol.md, *Request*). Zero-initialise, then set. */
typedef struct llmb_request {
    const char *id;          /* required: [A-Za-z0-9_.-]{1,64}, unique per request */
    const char *prompt;      /* required: the text (UTF-8), JSON-escaped by the builder */
    size_t prompt_len;       /* 0: strlen(prompt) */
    int plain_completion;    /* 0: sent as one user message ("messages", chat);
                                1: sent as "prompt" (a plain completion; with session,
                                the bridge takes it as one user message) */
    int32_t max_tokens;      /* > 0: sent */
    int has_temperature;     /* 1: temperature_milli is sent */
    int32_t temperature_milli; /* temperature * 1000 (700: 0.7) */
    int has_seed;            /* 1: seed is sent (with temperature 0 a resend gives the
                                same answer) */
    int32_t seed;
    const char *session;     /* NULL or a session name ([A-Za-z0-9_.-]{1,64}) */
    const char *profile;     /* NULL or a profile name */
    uint32_t chunk_bytes;    /* > 0: sent (max payload of a chunk; max_packet covers it) */
} llmb_request;

/* The client: its state, in the caller's memory (a static or a local). */
typedef struct llmb_client {
    llmb_config cfg;         /* as given, defaults filled in */
    size_t prefix_len, client_len, id_len;
    char id[LLMB_ID_MAX + 1];/* the request being answered */
    unsigned char state;     /* LLMB_IDLE, LLMB_ACTIVE or LLMB_FINISHED */
    unsigned char clock;     /* llmb_tick() has seen the request */
    unsigned char heard;     /* a message of the request came since the last tick */
    unsigned char cancelled; /* llmb_build_cancel() was called: no more resends */
    unsigned char has_resent;
    unsigned char rerun;     /* an answer from seq 0 again is being compared */
    unsigned char rerun_matched; /* ... and has repeated all the text given */
    unsigned char resends_in_row;
    uint32_t expected;       /* the seq the next new message must have */
    uint32_t heard_at, resent_at;  /* times (ms) of llmb_tick's clock */
    uint32_t resends;        /* resends in total */
    uint32_t text_len, text_hash;  /* the text given (bytes, FNV-1a) */
    uint32_t rerun_seq, rerun_len, rerun_hash; /* the answer from seq 0 again */
    char buf[LLMB_TEXT_BUF];
} llmb_client;

enum { LLMB_IDLE = 0, LLMB_ACTIVE = 1, LLMB_FINISHED = 2 };

/*
 * Set up c with cfg (copied; the strings it points to are not). Returns 0, or
 * LLMB_ERR_ARG (no or invalid client name, prefix empty, too long or with a wildcard).
 */
int llmb_init(llmb_client *c, const llmb_config *cfg);

/*
 * Write the request's topic (P/request/{client}, NUL-terminated) into topic[0..topic_cap)
 * and its JSON payload into payload[0..payload_cap) (NUL-terminated as well, the NUL not
 * counted), and make it the request c follows (what it followed before is forgotten).
 * Returns the payload's length, LLMB_ERR_ARG (a missing prompt, an invalid id, session
 * or profile) or LLMB_ERR_SPACE (a buffer is too small; nothing is followed then).
 * Publish these bytes, then call llmb_tick() from then on.
 */
long llmb_build_request(llmb_client *c, const llmb_request *r, char *topic, size_t topic_cap,
                        char *payload, size_t payload_cap);

/*
 * The cancel of the request c follows: topic P/cancel/{client} and payload {"id":"..."},
 * both NUL-terminated. Returns the payload's length, LLMB_ERR_ARG (no request to cancel)
 * or LLMB_ERR_SPACE. The bridge then ends the answer with `done` (finish_reason
 * "cancelled"); c keeps following it but no longer resends it.
 */
long llmb_build_cancel(llmb_client *c, char *topic, size_t topic_cap, char *payload,
                       size_t payload_cap);

/* The filter to subscribe to, P/reply/{client}/#, NUL-terminated. Length or LLMB_ERR_SPACE. */
long llmb_reply_filter(const llmb_client *c, char *out, size_t cap);

/* The reply topic of the request c follows, P/reply/{client}/{id}. Length or an error. */
long llmb_reply_topic(const llmb_client *c, char *out, size_t cap);

/* Results of llmb_feed(). */
enum {
    LLMB_FEED_OK = 0,        /* a new message of the request, handled (callbacks called) */
    LLMB_FEED_OTHER = 1,     /* not for the request c follows (or none is followed) */
    LLMB_FEED_DUPLICATE = 2, /* a copy of a message handled already: dropped */
    LLMB_FEED_MALFORMED = 3  /* on the request's topic, but not a reply message: dropped */
};

/*
 * One message received: topic[0..topic_len) and payload[0..len) (neither needs a NUL;
 * nothing beyond is read). Calls the callbacks as the message says. Returns LLMB_FEED_*.
 */
int llmb_feed(llmb_client *c, const char *topic, size_t topic_len, const void *payload,
              size_t len);

/* Results of llmb_tick(). */
enum {
    LLMB_TICK_NONE = 0,     /* nothing to do */
    LLMB_TICK_RESEND = 1,   /* publish the request again: the same topic and payload */
    LLMB_TICK_TIMEOUT = 2   /* gave up: on_error ("timeout", local) was called */
};

/*
 * The timeout hook: call it often (every loop, or at least every few hundred ms) with a
 * millisecond clock (wrapping at 2^32 is fine: Arduino's millis()). The first call after
 * llmb_build_request() starts the clock (call it right after publishing).
 */
int llmb_tick(llmb_client *c, uint32_t now_ms);

/* 1 while c follows a request that has not ended, else 0. */
int llmb_active(const llmb_client *c);

/* Forget the request c follows, without callbacks (later messages of it: LLMB_FEED_OTHER). */
void llmb_reset(llmb_client *c);

#ifdef __cplusplus
}
#endif

#endif /* LLM_BRIDGE_H */
