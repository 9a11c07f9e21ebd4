/* llmb_reply: llmb_feed, following the reply messages of the request (llm_bridge.h:
   seq order, copies, gaps, restarts) and ending it. <string.h> for memcmp. */
#include <string.h>

#include "llmb_internal.h"

#define FNV_PRIME 16777619ul

static uint32_t fnv(uint32_t h, unsigned char b)
{
    return (uint32_t)((h ^ b) * FNV_PRIME);
}

/* topic[0..len) == P/reply/{client}/{id} */
static int is_reply_topic(const llmb_client *c, const char *topic, size_t len)
{
    static const char reply[] = "/reply/";
    size_t at = 0;
    if (len != c->prefix_len + (sizeof reply - 1) + c->client_len + 1 + c->id_len) {
        return 0;
    }
    if (memcmp(topic, c->cfg.prefix, c->prefix_len) != 0) {
        return 0;
    }
    at += c->prefix_len;
    if (memcmp(topic + at, reply, sizeof reply - 1) != 0) {
        return 0;
    }
    at += sizeof reply - 1;
    if (memcmp(topic + at, c->cfg.client, c->client_len) != 0) {
        return 0;
    }
    at += c->client_len;
    if (topic[at] != '/') {
        return 0;
    }
    return memcmp(topic + at + 1, c->id, c->id_len) == 0;
}

/* ------------------------------------------------------------------------- endings */

void llmb_finish_local(llmb_client *c, const char *code, int retryable, llmb_out *message)
{
    llmb_error e;
    size_t len = message->len;
    c->buf[len] = '\0';
    e.code = code;
    e.message = c->buf;
    e.message_len = len;
    e.message_truncated = message->over;
    e.retryable = retryable;
    e.retry_after_ms = LLMB_ABSENT;
    e.backend_type = "";
    e.local = 1;
    c->state = LLMB_FINISHED;
    if (c->cfg.on_error) {
        c->cfg.on_error(c->cfg.user, &e);
    }
}

static void fail_gap(llmb_client *c, uint32_t got)
{
    llmb_out o;
    llmb_out_init(&o, c->buf, sizeof c->buf);
    llmb_puts(&o, "expected seq ");
    llmb_put_uint(&o, c->rerun ? c->rerun_seq : c->expected);
    llmb_puts(&o, ", got ");
    llmb_put_uint(&o, got);
    llmb_puts(&o, ": messages of the request were lost");
    llmb_finish_local(c, "gap", 1, &o);
}

static void fail_changed(llmb_client *c)
{
    llmb_out o;
    llmb_out_init(&o, c->buf, sizeof c->buf);
    llmb_puts(&o, "the answer started again and differs from the text given");
    llmb_finish_local(c, "answer_changed", 1, &o);
}

static void finish_done(llmb_client *c, const llmb_msg *m)
{
    llmb_done d;
    char reason[32];
    llmb_json_str_copy(&m->finish_reason, reason, sizeof reason, NULL);
    d.type = m->kind == K_REPLY ? "reply" : "done";
    d.finish_reason = reason;
    d.prompt_tokens = m->numbers[U_PROMPT];
    d.completion_tokens = m->numbers[U_COMPLETION];
    d.queue_ms = m->numbers[T_QUEUE];
    d.ttft_ms = m->numbers[T_TTFT];
    d.total_ms = m->numbers[T_TOTAL];
    d.tokens_per_s = m->numbers[T_TPS];
    c->state = LLMB_FINISHED;
    if (c->cfg.on_done) {
        c->cfg.on_done(c->cfg.user, &d);
    }
}

static void finish_error(llmb_client *c, const llmb_msg *m)
{
    llmb_error e;
    char code[32], backend[48];
    int cut = 0;
    llmb_json_str_copy(&m->code, code, sizeof code, NULL);
    backend[0] = '\0';
    if (m->has & HAS_BACKEND) {
        llmb_json_str_copy(&m->backend_type, backend, sizeof backend, NULL);
    }
    c->buf[0] = '\0';
    e.message_len = 0;
    if (m->has & HAS_MESSAGE) {
        e.message_len = llmb_json_str_copy(&m->message, c->buf, sizeof c->buf, &cut);
    }
    e.code = code;
    e.message = c->buf;
    e.message_truncated = cut;
    e.retryable = m->retryable;
    e.retry_after_ms = m->retry_after_ms;
    e.backend_type = backend;
    e.local = 0;
    c->state = LLMB_FINISHED;
    if (c->cfg.on_error) {
        c->cfg.on_error(c->cfg.user, &e);
    }
}

/* ---------------------------------------------------------------------- following */

/* An answer from seq 0 again turned out to be new: follow it from seq (its message). */
static void adopt(llmb_client *c, uint32_t seq, int changed_numbering)
{
    c->rerun = 0;
    if ((changed_numbering || seq != c->expected) && c->cfg.on_restart) {
        c->cfg.on_restart(c->cfg.user);
    }
}

/*
 * Pass a message's text to on_text in pieces that fit c->buf. During a rerun, text up
 * to the length already given is only hashed and compared; what goes beyond it makes
 * the rerun the answer followed. Returns 0, or -1 when the rerun differs.
 */
static int take_text(llmb_client *c, const llmb_json_str *s, uint32_t seq)
{
    size_t pos = 0, n, i, fill = 0;
    unsigned char ch[4];

    while ((n = llmb_json_next_char(s, &pos, ch)) > 0) {
        size_t room;
        int continuation;
        i = 0;
        if (c->rerun) {
            if (!c->rerun_matched) {
                for (; i < n && c->rerun_len < c->text_len; i++) {
                    c->rerun_hash = fnv(c->rerun_hash, ch[i]);
                    c->rerun_len++;
                }
                if (c->rerun_len == c->text_len) {
                    if (c->rerun_hash != c->text_hash) {
                        return -1;
                    }
                    c->rerun_matched = 1;
                }
                if (i == n) {
                    continue;
                }
            }
            adopt(c, seq, 1); /* text beyond the given at another place than before */
        }
        /* flush before a character that might not fit; a raw UTF-8 continuation byte
           stays with its lead byte (which found room for a whole character) */
        room = sizeof c->buf - fill;
        continuation = n - i == 1 && (ch[i] & 0xC0) == 0x80;
        if (room < n - i || (!continuation && room < 4)) {
            if (c->cfg.on_text) {
                c->cfg.on_text(c->cfg.user, c->buf, fill);
            }
            fill = 0;
        }
        for (; i < n; i++) {
            c->buf[fill++] = (char)ch[i];
            c->text_hash = fnv(c->text_hash, ch[i]);
            c->text_len++;
        }
    }
    if (fill > 0 && c->cfg.on_text) {
        c->cfg.on_text(c->cfg.user, c->buf, fill);
    }
    return 0;
}

/* The message with the seq followed next (c->expected, or c->rerun_seq in a rerun). */
static int deliver(llmb_client *c, const llmb_msg *m)
{
    uint32_t seq = m->seq;
    const llmb_json_str *piece = NULL;
    int terminal = m->kind == K_DONE || m->kind == K_REPLY || m->kind == K_ERROR;

    if (m->kind == K_CHUNK && (m->has & HAS_TEXT)) {
        piece = &m->text;
    } else if (m->kind == K_REPLY && (m->has & HAS_CONTENT)) {
        piece = &m->content;
    }
    if (piece && piece->len > 0 && take_text(c, piece, seq) != 0) {
        fail_changed(c);
        return LLMB_FEED_OK;
    }
    c->resends_in_row = 0; /* the bridge is answering */
    c->has_resent = 0;
    if (c->rerun) {
        if (!terminal) {
            c->rerun_seq = seq + 1;
            return LLMB_FEED_DUPLICATE; /* nothing new yet */
        }
        if (m->kind != K_ERROR && !c->rerun_matched) {
            fail_changed(c); /* the new answer ended before repeating the text given */
            return LLMB_FEED_OK;
        }
        adopt(c, seq, 0);
    }
    c->expected = seq + 1;
    if (m->kind == K_DONE || m->kind == K_REPLY) {
        finish_done(c, m);
    } else if (m->kind == K_ERROR) {
        finish_error(c, m);
    }
    return LLMB_FEED_OK;
}

static int follow(llmb_client *c, const llmb_msg *m)
{
    uint32_t seq = m->seq;
    if (!c->rerun) {
        if (seq == c->expected) {
            return deliver(c, m);
        }
        if (seq > c->expected) {
            fail_gap(c, seq);
            return LLMB_FEED_OK;
        }
        if (seq != 0) {
            return LLMB_FEED_DUPLICATE;
        }
        /* seq 0 again: a copy, the bridge replaying the answer, or answering a resend
           anew. Compare what follows with what was given, without giving it again. */
        c->rerun = 1;
        c->rerun_seq = 0;
        c->rerun_len = 0;
        c->rerun_hash = FNV_INIT;
        c->rerun_matched = c->text_len == 0;
    } else if (seq != c->rerun_seq) {
        if (seq < c->rerun_seq) {
            return LLMB_FEED_DUPLICATE;
        }
        if (c->rerun_seq < c->expected && seq == c->expected) {
            c->rerun = 0; /* the first answer goes on: the seq 0 was a stray copy */
            return deliver(c, m);
        }
        if (seq < c->expected) {
            return LLMB_FEED_DUPLICATE;
        }
        fail_gap(c, seq);
        return LLMB_FEED_OK;
    }
    if (c->rerun_matched && seq == c->expected) {
        c->rerun = 0; /* the rerun repeated the first answer message for message */
    }
    return deliver(c, m);
}

int llmb_feed(llmb_client *c, const char *topic, size_t topic_len, const void *payload,
              size_t len)
{
    llmb_msg m;
    if (!c || c->state != LLMB_ACTIVE || !topic || !is_reply_topic(c, topic, topic_len)) {
        return LLMB_FEED_OTHER;
    }
    if (!payload || llmb_parse_message(payload, len, &m) != 0) {
        return LLMB_FEED_MALFORMED;
    }
    if (!llmb_json_str_equals(&m.id, c->id)) {
        return LLMB_FEED_OTHER;
    }
    c->heard = 1;
    return follow(c, &m);
}
