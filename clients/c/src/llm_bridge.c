/* llm_bridge: see llm_bridge.h. No malloc, no stdio; <string.h> for memcpy/memcmp/strlen. */
#include "llm_bridge.h"

#include <string.h>

#include "llmb_json.h"

#if LLMB_TEXT_BUF < 8
#error "LLMB_TEXT_BUF must be at least 8"
#endif

#define DEFAULT_PREFIX "llm"
#define DEFAULT_HEARTBEAT_S 5u
#define DEFAULT_MAX_RESENDS 3
#define MAX_DELAY_MS 0x7FFFFFFFul /* wrap-safe comparisons of a 32-bit clock reach this far */

#define FNV_INIT 2166136261ul
#define FNV_PRIME 16777619ul

static uint32_t fnv(uint32_t h, unsigned char b)
{
    return (uint32_t)((h ^ b) * FNV_PRIME);
}

/* ------------------------------------------------------------------ names and output */

static int id_char(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9')
           || ch == '_' || ch == '.' || ch == '-';
}

/* [A-Za-z0-9_.-]{1,64} (request id, session, profile; a client name also needs an
   alphanumeric first character). Returns the length, or 0 if s is not one. */
static size_t id_len(const char *s)
{
    size_t n = 0;
    if (!s) {
        return 0;
    }
    while (s[n] && n <= LLMB_ID_MAX) {
        if (!id_char(s[n])) {
            return 0;
        }
        n++;
    }
    return n <= LLMB_ID_MAX ? n : 0;
}

typedef struct out {
    char *p;
    size_t cap; /* including the final NUL */
    size_t len;
    int over;
} out;

static void out_init(out *o, char *p, size_t cap)
{
    o->p = p;
    o->cap = p ? cap : 0;
    o->len = 0;
    o->over = o->cap == 0;
}

/* Append s[0..n); what does not fit is cut off (a message may be cut, a request not). */
static void put(out *o, const char *s, size_t n)
{
    if (o->over) {
        return;
    }
    if (n > o->cap - 1 - o->len) {
        n = o->cap - 1 - o->len;
        o->over = 1;
    }
    memcpy(o->p + o->len, s, n);
    o->len += n;
}

static void puts0(out *o, const char *s)
{
    put(o, s, strlen(s));
}

static void put_uint(out *o, uint32_t v)
{
    char digits[10];
    size_t n = 0;
    do {
        digits[sizeof digits - 1 - n++] = (char)('0' + v % 10u);
        v /= 10u;
    } while (v);
    put(o, digits + sizeof digits - n, n);
}

static void put_int(out *o, int32_t v)
{
    if (v < 0) {
        put(o, "-", 1);
        put_uint(o, (uint32_t)(-(v + 1)) + 1u);
    } else {
        put_uint(o, (uint32_t)v);
    }
}

/* milli / 1000 as a JSON number: 700 -> 0.7, 99000 -> 99, 1250 -> 1.25 */
static void put_milli(out *o, int32_t milli)
{
    uint32_t a, frac;
    char f[4];
    size_t n = 3;
    if (milli < 0) {
        put(o, "-", 1);
        a = (uint32_t)(-(milli + 1)) + 1u;
    } else {
        a = (uint32_t)milli;
    }
    put_uint(o, a / 1000u);
    frac = a % 1000u;
    if (frac) {
        f[0] = '.';
        f[1] = (char)('0' + frac / 100u);
        f[2] = (char)('0' + frac / 10u % 10u);
        f[3] = (char)('0' + frac % 10u);
        while (f[n] == '0') {
            n--;
        }
        put(o, f, n + 1);
    }
}

/* s[0..n) as a JSON string, quotes included. Bytes of 0x80 and above go as they are
   (the bridge wants UTF-8 and answers anything else with bad_request). */
static void put_json_str(out *o, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t i, run = 0;
    put(o, "\"", 1);
    for (i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        char esc[6];
        size_t elen = 2;
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            continue;
        }
        put(o, s + run, i - run);
        run = i + 1;
        esc[0] = '\\';
        switch (ch) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[ch >> 4];
            esc[5] = hex[ch & 15];
            elen = 6;
        }
        put(o, esc, elen);
    }
    put(o, s + run, n - run);
    put(o, "\"", 1);
}

static long out_end(out *o)
{
    if (o->over) {
        if (o->cap) {
            o->p[0] = '\0';
        }
        return LLMB_ERR_SPACE;
    }
    o->p[o->len] = '\0';
    return (long)o->len;
}

static void put_prefix_topic(out *o, const llmb_client *c, const char *kind)
{
    put(o, c->cfg.prefix, c->prefix_len);
    puts0(o, kind);
    put(o, c->cfg.client, c->client_len);
}

/* ------------------------------------------------------------------------ set-up */

static uint32_t clamp_ms(uint64_t ms)
{
    return ms > MAX_DELAY_MS ? (uint32_t)MAX_DELAY_MS : (uint32_t)ms;
}

int llmb_init(llmb_client *c, const llmb_config *cfg)
{
    size_t i;
    if (!c || !cfg) {
        return LLMB_ERR_ARG;
    }
    memset(c, 0, sizeof *c);
    c->cfg = *cfg;
    if (!c->cfg.prefix) {
        c->cfg.prefix = DEFAULT_PREFIX;
    }
    c->prefix_len = strlen(c->cfg.prefix);
    if (c->prefix_len == 0 || c->prefix_len > LLMB_PREFIX_MAX) {
        return LLMB_ERR_ARG;
    }
    for (i = 0; i < c->prefix_len; i++) {
        if (c->cfg.prefix[i] == '+' || c->cfg.prefix[i] == '#') {
            return LLMB_ERR_ARG;
        }
    }
    c->client_len = id_len(c->cfg.client);
    if (c->client_len == 0 || c->client_len > LLMB_NAME_MAX || c->cfg.client[0] == '_'
        || c->cfg.client[0] == '.' || c->cfg.client[0] == '-') {
        return LLMB_ERR_ARG;
    }
    if (c->cfg.heartbeat_s == 0) {
        c->cfg.heartbeat_s = DEFAULT_HEARTBEAT_S;
    }
    if (c->cfg.resend_after_ms == 0) {
        c->cfg.resend_after_ms = clamp_ms(3000ull * c->cfg.heartbeat_s);
    }
    c->cfg.resend_after_ms = clamp_ms(c->cfg.resend_after_ms);
    if (c->cfg.max_resends == 0) {
        c->cfg.max_resends = DEFAULT_MAX_RESENDS;
    } else if (c->cfg.max_resends < 0) {
        c->cfg.max_resends = 0;
    } else if (c->cfg.max_resends > 255) {
        c->cfg.max_resends = 255;
    }
    if (c->cfg.timeout_ms == 0) {
        c->cfg.timeout_ms = clamp_ms((uint64_t)c->cfg.resend_after_ms
                                     * (uint64_t)(c->cfg.max_resends + 1));
    }
    c->cfg.timeout_ms = clamp_ms(c->cfg.timeout_ms);
    c->state = LLMB_IDLE;
    return 0;
}

long llmb_build_request(llmb_client *c, const llmb_request *r, char *topic, size_t topic_cap,
                        char *payload, size_t payload_cap)
{
    out t, o;
    size_t n, plen;
    long tlen, len;
    if (!c || !r || !r->prompt || !topic || !payload || c->client_len == 0) {
        return LLMB_ERR_ARG;
    }
    n = id_len(r->id);
    if (n == 0 || (r->session && !id_len(r->session)) || (r->profile && !id_len(r->profile))) {
        return LLMB_ERR_ARG;
    }
    out_init(&t, topic, topic_cap);
    put_prefix_topic(&t, c, "/request/");
    tlen = out_end(&t);

    plen = r->prompt_len ? r->prompt_len : strlen(r->prompt);
    out_init(&o, payload, payload_cap);
    puts0(&o, "{\"id\":");
    put_json_str(&o, r->id, n);
    if (r->plain_completion) {
        puts0(&o, ",\"prompt\":");
        put_json_str(&o, r->prompt, plen);
    } else {
        puts0(&o, ",\"messages\":[{\"role\":\"user\",\"content\":");
        put_json_str(&o, r->prompt, plen);
        puts0(&o, "}]");
    }
    if (r->session) {
        puts0(&o, ",\"session\":");
        put_json_str(&o, r->session, strlen(r->session));
    }
    if (r->profile) {
        puts0(&o, ",\"profile\":");
        put_json_str(&o, r->profile, strlen(r->profile));
    }
    if (r->max_tokens > 0) {
        puts0(&o, ",\"max_tokens\":");
        put_int(&o, r->max_tokens);
    }
    if (r->has_temperature) {
        puts0(&o, ",\"temperature\":");
        put_milli(&o, r->temperature_milli);
    }
    if (r->has_seed) {
        puts0(&o, ",\"seed\":");
        put_int(&o, r->seed);
    }
    if (r->chunk_bytes > 0) {
        puts0(&o, ",\"chunk_bytes\":");
        put_uint(&o, r->chunk_bytes);
    }
    if (c->cfg.max_packet > 0) {
        puts0(&o, ",\"max_packet\":");
        put_uint(&o, c->cfg.max_packet);
    }
    puts0(&o, "}");
    len = out_end(&o);
    if (tlen < 0 || len < 0) {
        return LLMB_ERR_SPACE;
    }

    memcpy(c->id, r->id, n);
    c->id[n] = '\0';
    c->id_len = n;
    c->state = LLMB_ACTIVE;
    c->clock = c->heard = c->cancelled = c->has_resent = 0;
    c->rerun = c->rerun_matched = 0;
    c->resends_in_row = 0;
    c->expected = c->resends = 0;
    c->heard_at = c->resent_at = 0;
    c->text_len = 0;
    c->text_hash = FNV_INIT;
    c->rerun_seq = c->rerun_len = 0;
    c->rerun_hash = FNV_INIT;
    return len;
}

long llmb_build_cancel(llmb_client *c, char *topic, size_t topic_cap, char *payload,
                       size_t payload_cap)
{
    out t, o;
    long tlen, len;
    if (!c || !topic || !payload || c->state == LLMB_IDLE || c->id_len == 0) {
        return LLMB_ERR_ARG;
    }
    out_init(&t, topic, topic_cap);
    put_prefix_topic(&t, c, "/cancel/");
    tlen = out_end(&t);
    out_init(&o, payload, payload_cap);
    puts0(&o, "{\"id\":");
    put_json_str(&o, c->id, c->id_len);
    puts0(&o, "}");
    len = out_end(&o);
    if (tlen < 0 || len < 0) {
        return LLMB_ERR_SPACE;
    }
    c->cancelled = 1;
    return len;
}

long llmb_reply_filter(const llmb_client *c, char *buf, size_t cap)
{
    out o;
    if (!c || c->client_len == 0) {
        return LLMB_ERR_ARG;
    }
    out_init(&o, buf, cap);
    put_prefix_topic(&o, c, "/reply/");
    puts0(&o, "/#");
    return out_end(&o);
}

long llmb_reply_topic(const llmb_client *c, char *buf, size_t cap)
{
    out o;
    if (!c || c->client_len == 0 || c->id_len == 0) {
        return LLMB_ERR_ARG;
    }
    out_init(&o, buf, cap);
    put_prefix_topic(&o, c, "/reply/");
    puts0(&o, "/");
    put(&o, c->id, c->id_len);
    return out_end(&o);
}

int llmb_active(const llmb_client *c)
{
    return c && c->state == LLMB_ACTIVE;
}

void llmb_reset(llmb_client *c)
{
    if (c) {
        c->state = LLMB_IDLE;
        c->id_len = 0;
        c->id[0] = '\0';
    }
}

/* ------------------------------------------------------------------- reply messages */

enum kind { K_OTHER, K_START, K_CHUNK, K_PROGRESS, K_DONE, K_REPLY, K_ERROR };

#define HAS_TYPE 0x001u
#define HAS_ID 0x002u
#define HAS_SEQ 0x004u
#define HAS_TEXT 0x008u
#define HAS_CONTENT 0x010u
#define HAS_FINISH 0x020u
#define HAS_CODE 0x040u
#define HAS_MESSAGE 0x080u
#define HAS_BACKEND 0x100u

enum { U_PROMPT, U_COMPLETION, T_QUEUE, T_TTFT, T_TOTAL, T_TPS, N_NUMBERS };

typedef struct msg {
    unsigned has;
    enum kind kind;
    uint32_t seq;
    llmb_json_str id, text, content, finish_reason, code, message, backend_type;
    int retryable;
    int32_t retry_after_ms;
    int32_t numbers[N_NUMBERS]; /* usage and timings */
} msg;

/* An optional string member: taken if it is a string, else (null, a future type) skipped. */
static int opt_string(llmb_json *j, llmb_json_str *s, unsigned *has, unsigned bit)
{
    if (llmb_json_peek(j) == '"') {
        if (llmb_json_string(j, s) != 0) {
            return LLMB_JSON_ERR;
        }
        *has |= bit;
        return 0;
    }
    *has &= ~bit;
    return llmb_json_skip(j);
}

static int opt_number(llmb_json *j, int32_t *v)
{
    llmb_json_num n;
    int ch = llmb_json_peek(j);
    if (ch == '-' || (ch >= '0' && ch <= '9')) {
        if (llmb_json_number(j, &n) != 0) {
            return LLMB_JSON_ERR;
        }
        *v = n.value;
        return 0;
    }
    *v = LLMB_ABSENT;
    return llmb_json_skip(j);
}

/* usage or timings: an object of numbers, of which names[0..count) are kept. */
static int numbers_object(llmb_json *j, const char *const *names, int32_t *values, int count)
{
    llmb_json_str key;
    size_t members = 0;
    int r, i;
    if (llmb_json_peek(j) != '{') {
        return llmb_json_skip(j);
    }
    llmb_json_object_begin(j);
    while ((r = llmb_json_object_next(j, &members, &key)) == 1) {
        for (i = 0; i < count; i++) {
            if (llmb_json_str_equals(&key, names[i])) {
                break;
            }
        }
        if ((i < count ? opt_number(j, &values[i]) : llmb_json_skip(j)) != 0) {
            return LLMB_JSON_ERR;
        }
    }
    return r;
}

static const char *const usage_names[] = {"prompt_tokens", "completion_tokens"};
static const char *const timing_names[] = {"queue_ms", "ttft_ms", "total_ms", "tokens_per_s"};

/* Scan payload as a reply message. 0, or LLMB_JSON_ERR when it is not one. */
static int parse(const void *payload, size_t len, msg *m)
{
    llmb_json j;
    llmb_json_str key, type;
    llmb_json_num num;
    size_t members = 0;
    int r, i;

    memset(m, 0, sizeof *m);
    m->retry_after_ms = LLMB_ABSENT;
    for (i = 0; i < N_NUMBERS; i++) {
        m->numbers[i] = LLMB_ABSENT;
    }
    llmb_json_init(&j, payload, len);
    if (llmb_json_object_begin(&j) != 0) {
        return LLMB_JSON_ERR;
    }
    while ((r = llmb_json_object_next(&j, &members, &key)) == 1) {
        if (llmb_json_str_equals(&key, "type")) {
            r = llmb_json_string(&j, &type);
            m->has |= HAS_TYPE;
        } else if (llmb_json_str_equals(&key, "id")) {
            r = llmb_json_string(&j, &m->id);
            m->has |= HAS_ID;
        } else if (llmb_json_str_equals(&key, "seq")) {
            r = llmb_json_number(&j, &num);
            if (r == 0 && (!num.is_int || num.value < 0)) {
                r = LLMB_JSON_ERR;
            }
            m->seq = (uint32_t)num.value;
            m->has |= HAS_SEQ;
        } else if (llmb_json_str_equals(&key, "text")) {
            r = opt_string(&j, &m->text, &m->has, HAS_TEXT);
        } else if (llmb_json_str_equals(&key, "content")) {
            r = opt_string(&j, &m->content, &m->has, HAS_CONTENT);
        } else if (llmb_json_str_equals(&key, "finish_reason")) {
            r = opt_string(&j, &m->finish_reason, &m->has, HAS_FINISH);
        } else if (llmb_json_str_equals(&key, "code")) {
            r = opt_string(&j, &m->code, &m->has, HAS_CODE);
        } else if (llmb_json_str_equals(&key, "message")) {
            r = opt_string(&j, &m->message, &m->has, HAS_MESSAGE);
        } else if (llmb_json_str_equals(&key, "backend_type")) {
            r = opt_string(&j, &m->backend_type, &m->has, HAS_BACKEND);
        } else if (llmb_json_str_equals(&key, "retryable")) {
            if (llmb_json_peek(&j) == 't' || llmb_json_peek(&j) == 'f') {
                r = llmb_json_bool(&j, &m->retryable);
            } else {
                m->retryable = 0;
                r = llmb_json_skip(&j);
            }
        } else if (llmb_json_str_equals(&key, "retry_after_ms")) {
            r = opt_number(&j, &m->retry_after_ms);
        } else if (llmb_json_str_equals(&key, "usage")) {
            r = numbers_object(&j, usage_names, &m->numbers[U_PROMPT], 2);
        } else if (llmb_json_str_equals(&key, "timings")) {
            r = numbers_object(&j, timing_names, &m->numbers[T_QUEUE], 4);
        } else {
            r = llmb_json_skip(&j); /* model, queue, prompt_progress, tool_calls, ... */
        }
        if (r != 0) {
            return LLMB_JSON_ERR;
        }
    }
    if (r != 0 || llmb_json_end(&j) != 0) {
        return LLMB_JSON_ERR;
    }
    if ((m->has & (HAS_TYPE | HAS_ID | HAS_SEQ)) != (HAS_TYPE | HAS_ID | HAS_SEQ)) {
        return LLMB_JSON_ERR;
    }
    m->kind = llmb_json_str_equals(&type, "chunk")      ? K_CHUNK
              : llmb_json_str_equals(&type, "progress") ? K_PROGRESS
              : llmb_json_str_equals(&type, "start")    ? K_START
              : llmb_json_str_equals(&type, "done")     ? K_DONE
              : llmb_json_str_equals(&type, "reply")    ? K_REPLY
              : llmb_json_str_equals(&type, "error")    ? K_ERROR
                                                        : K_OTHER;
    /* never dropped by the bridge: a terminal message without them is not one */
    if ((m->kind == K_DONE || m->kind == K_REPLY) && !(m->has & HAS_FINISH)) {
        return LLMB_JSON_ERR;
    }
    if (m->kind == K_ERROR && !(m->has & HAS_CODE)) {
        return LLMB_JSON_ERR;
    }
    return 0;
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

static void finish_local(llmb_client *c, const char *code, int retryable, out *message)
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
    out o;
    out_init(&o, c->buf, sizeof c->buf);
    puts0(&o, "expected seq ");
    put_uint(&o, c->rerun ? c->rerun_seq : c->expected);
    puts0(&o, ", got ");
    put_uint(&o, got);
    puts0(&o, ": messages of the request were lost");
    finish_local(c, "gap", 1, &o);
}

static void fail_changed(llmb_client *c)
{
    out o;
    out_init(&o, c->buf, sizeof c->buf);
    puts0(&o, "the answer started again and differs from the text given");
    finish_local(c, "answer_changed", 1, &o);
}

static void finish_done(llmb_client *c, const msg *m)
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

static void finish_error(llmb_client *c, const msg *m)
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
static int deliver(llmb_client *c, const msg *m)
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

static int follow(llmb_client *c, const msg *m)
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
    msg m;
    if (!c || c->state != LLMB_ACTIVE || !topic || !is_reply_topic(c, topic, topic_len)) {
        return LLMB_FEED_OTHER;
    }
    if (!payload || parse(payload, len, &m) != 0) {
        return LLMB_FEED_MALFORMED;
    }
    if (!llmb_json_str_equals(&m.id, c->id)) {
        return LLMB_FEED_OTHER;
    }
    c->heard = 1;
    return follow(c, &m);
}

int llmb_tick(llmb_client *c, uint32_t now_ms)
{
    uint32_t quiet;
    out o;
    if (!c || c->state != LLMB_ACTIVE) {
        return LLMB_TICK_NONE;
    }
    if (!c->clock || c->heard) {
        c->clock = 1;
        c->heard = 0;
        c->heard_at = now_ms;
    }
    quiet = now_ms - c->heard_at;
    if (quiet >= c->cfg.timeout_ms) {
        out_init(&o, c->buf, sizeof c->buf);
        puts0(&o, "no reply for ");
        put_uint(&o, quiet / 1000u);
        puts0(&o, " s after ");
        put_uint(&o, c->resends);
        puts0(&o, " resends; is the bridge running?");
        finish_local(c, "timeout", 1, &o);
        return LLMB_TICK_TIMEOUT;
    }
    if (c->cancelled || c->resends_in_row >= c->cfg.max_resends) {
        return LLMB_TICK_NONE;
    }
    if (c->has_resent && now_ms - c->resent_at < quiet) {
        quiet = now_ms - c->resent_at;
    }
    if (quiet < c->cfg.resend_after_ms) {
        return LLMB_TICK_NONE;
    }
    c->resends_in_row++;
    c->resends++;
    c->has_resent = 1;
    c->resent_at = now_ms;
    return LLMB_TICK_RESEND;
}
