/*
 * A deterministic fuzz loop for llm_bridge and llmb_json, built with AddressSanitizer and
 * UndefinedBehaviorSanitizer (make fuzz). Usage: fuzz_llmb [CASES [SEED]].
 *
 * CASES is the number of mutated and random payloads to feed (valid ones come on top).
 * Every payload is fed from a heap block of exactly its length (so ASan reports any read
 * past it), and is one of these kinds:
 *   - streams: valid reply messages of a random answer (random text of 1- to 4-byte
 *     characters, written raw or as \uXXXX escapes and surrogate pairs; random optional
 *     fields; copies fed again), checked against the text and end they encode;
 *   - restarts: such a stream answered again from seq 0 with other chunks midway,
 *     checked the same way (no text given twice);
 *   - mutated: a valid message with bit flips, interesting bytes, insertions, deletions,
 *     duplications and truncations, fed to a client in the middle of a stream;
 *   - random: random bytes and random JSON-like token soup;
 *   - requests: a random prompt (any bytes) built into a buffer of exactly the size
 *     needed (one byte less is refused), valid JSON, decoding back to the prompt.
 * Each payload is also run through the bare scanner (skip and decode every string).
 * Invariants checked on every callback: at most one end per request, no text after it,
 * pieces of text within LLMB_TEXT_BUF, error strings NUL-terminated within their lengths.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "llm_bridge.h"
#include "llmb_json.h"

#define MAX_PAYLOAD 4096

static uint64_t rng;

static uint64_t rnd(void)
{
    /* xorshift64* */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 2685821657736338717ull;
}

static uint32_t below(uint32_t n)
{
    return n ? (uint32_t)(rnd() % n) : 0;
}

static unsigned long failures;

#define FAIL(...)                                                                      \
    do {                                                                               \
        failures++;                                                                    \
        if (failures <= 20) {                                                          \
            fprintf(stderr, "fuzz: " __VA_ARGS__);                                     \
            fputc('\n', stderr);                                                       \
        }                                                                              \
    } while (0)

/* --------------------------------------------------------------------- callbacks */

typedef struct seen {
    char text[MAX_PAYLOAD * 4];
    size_t text_len;
    int ends, done, errors;
    char code[32];
} seen;

static seen got;

static void on_text(void *user, const char *text, size_t len)
{
    (void)user;
    if (len == 0 || len > LLMB_TEXT_BUF) {
        FAIL("on_text with %lu bytes", (unsigned long)len);
    }
    if (got.ends) {
        FAIL("text after the end");
    }
    if (got.text_len + len <= sizeof got.text) {
        memcpy(got.text + got.text_len, text, len);
        got.text_len += len;
    }
}

static void on_done(void *user, const llmb_done *d)
{
    (void)user;
    got.ends++;
    got.done++;
    if (got.ends > 1) {
        FAIL("a second end");
    }
    if (!d->finish_reason || strlen(d->finish_reason) >= 32 || !d->type) {
        FAIL("bad done");
    }
}

static void on_error(void *user, const llmb_error *e)
{
    (void)user;
    got.ends++;
    got.errors++;
    if (got.ends > 1) {
        FAIL("a second end");
    }
    if (!e->code || !e->message || !e->backend_type || strlen(e->message) > e->message_len
        || e->message_len >= LLMB_TEXT_BUF) {
        FAIL("bad error");
        return;
    }
    snprintf(got.code, sizeof got.code, "%s", e->code);
}

/* ---------------------------------------------------------------------- feeding */

static llmb_client cl;
static const char *client_name = "fuzz-device-0123456789abcdef0123";
static char req_id[65], reply_topic[160];
static unsigned long cases;

static void scan_bare(const unsigned char *p, size_t len)
{
    /* the scanner on its own: skip one value, decode every string it finds */
    llmb_json j;
    llmb_json_str s;
    size_t i;
    unsigned char ch[4];
    llmb_json_init(&j, p, len);
    (void)llmb_json_skip(&j);
    for (i = 0; i < len; i++) {
        if (p[i] == '"') {
            size_t pos = 0;
            llmb_json_init(&j, p + i, len - i);
            if (llmb_json_string(&j, &s) == 0) {
                while (llmb_json_next_char(&s, &pos, ch) > 0) {
                }
            }
            /* unchecked decoding of the raw rest must be safe too */
            s.p = p + i;
            s.len = len - i;
            pos = 0;
            while (llmb_json_next_char(&s, &pos, ch) > 0) {
            }
        }
    }
}

/* Feed data[0..len) on topic t, both from heap blocks of exactly their length. */
static int feed_exact(const char *t, size_t tlen, const char *data, size_t len)
{
    char *p = (char *)malloc(len ? len : 1);
    char *tp = (char *)malloc(tlen ? tlen : 1);
    int r;
    if (!p || !tp) {
        fprintf(stderr, "fuzz: out of memory\n");
        exit(2);
    }
    memcpy(p, data, len);
    memcpy(tp, t, tlen);
    r = llmb_feed(&cl, tp, tlen, p, len);
    scan_bare((const unsigned char *)p, len);
    free(tp);
    free(p);
    cases++;
    return r;
}

static int feed(const char *data, size_t len)
{
    return feed_exact(reply_topic, strlen(reply_topic), data, len);
}

static void new_request(void)
{
    llmb_config cfg;
    llmb_request r;
    char topic[128], payload[256];
    size_t n = 1 + below(64), i;
    static const char idc[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-";
    for (i = 0; i < n; i++) {
        req_id[i] = idc[below(sizeof idc - 1)];
    }
    req_id[n] = '\0';
    memset(&cfg, 0, sizeof cfg);
    cfg.client = client_name;
    cfg.max_packet = 256;
    cfg.on_text = on_text;
    cfg.on_done = on_done;
    cfg.on_error = on_error;
    if (llmb_init(&cl, &cfg) != 0) {
        fprintf(stderr, "fuzz: init failed\n");
        exit(2);
    }
    memset(&r, 0, sizeof r);
    r.id = req_id;
    r.prompt = "fuzz";
    if (llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload) < 0) {
        fprintf(stderr, "fuzz: build failed\n");
        exit(2);
    }
    snprintf(reply_topic, sizeof reply_topic, "llm/reply/%s/%s", client_name, req_id);
    memset(&got, 0, sizeof got);
}

/* ------------------------------------------------------------------ valid messages */

typedef struct buf {
    char p[MAX_PAYLOAD];
    size_t len;
} buf;

static void add(buf *b, const char *s, size_t n)
{
    if (b->len + n < sizeof b->p) {
        memcpy(b->p + b->len, s, n);
        b->len += n;
    }
}

static void adds(buf *b, const char *s)
{
    add(b, s, strlen(s));
}

static void addf(buf *b, const char *fmt, unsigned long v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, fmt, v);
    add(b, tmp, (size_t)n);
}

static size_t utf8(unsigned long cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static void add_u(buf *b, unsigned long v)
{
    static const char lower[] = "0123456789abcdef", upper[] = "0123456789ABCDEF";
    const char *h = below(2) ? lower : upper;
    char e[6];
    e[0] = '\\';
    e[1] = 'u';
    e[2] = h[(v >> 12) & 15];
    e[3] = h[(v >> 8) & 15];
    e[4] = h[(v >> 4) & 15];
    e[5] = h[v & 15];
    add(b, e, 6);
}

/* One random character: its UTF-8 into want, its JSON form into json. */
static void random_char(buf *json, buf *want)
{
    unsigned long cp;
    char u[4];
    size_t n;
    switch (below(8)) {
    case 0: case 1: case 2: cp = 0x20 + below(0x5F); break; /* printable ASCII */
    case 3: cp = below(0x20); break;                        /* control */
    case 4: cp = 0x80 + below(0x780); break;                /* 2 bytes */
    case 5: cp = 0x800 + below(0xF800); break;              /* 3 bytes */
    default: cp = 0x10000 + below(0x100000); break;         /* 4 bytes */
    }
    if (cp >= 0xD800 && cp <= 0xDFFF) {
        cp = 0xFFFD;
    }
    n = utf8(cp, u);
    add(want, u, n);
    if (cp == '"' || cp == '\\') {
        add(json, "\\", 1);
        add(json, u, 1);
    } else if (cp == '/' && below(2)) {
        adds(json, "\\/");
    } else if (cp < 0x20) {
        const char *short_form = cp == '\n' ? "\\n" : cp == '\t' ? "\\t" : cp == '\r' ? "\\r"
                                 : cp == '\b' ? "\\b" : cp == '\f' ? "\\f" : NULL;
        if (short_form && below(2)) {
            adds(json, short_form);
        } else {
            add_u(json, cp);
        }
    } else if (cp >= 0x10000 && below(2)) {
        add_u(json, 0xD800 + ((cp - 0x10000) >> 10));
        add_u(json, 0xDC00 + ((cp - 0x10000) & 0x3FF));
    } else if (cp >= 0x80 && cp < 0x10000 && below(3) == 0) {
        add_u(json, cp);
    } else {
        add(json, u, n);
    }
}

static void member_sep(buf *b, int *first)
{
    if (!*first) {
        adds(b, below(4) ? "," : " , ");
    }
    *first = 0;
}

/* The head members in a random order: type, id, seq. */
static void head(buf *b, const char *type, unsigned long seq, int *first)
{
    int order = (int)below(3), i;
    for (i = 0; i < 3; i++) {
        member_sep(b, first);
        switch ((order + i) % 3) {
        case 0: adds(b, "\"type\":\""); adds(b, type); adds(b, "\""); break;
        case 1: adds(b, "\"id\":\""); adds(b, req_id); adds(b, "\""); break;
        default: addf(b, "\"seq\":%lu", seq); break;
        }
    }
}

static void extras(buf *b, int *first)
{
    switch (below(6)) {
    case 0: member_sep(b, first); adds(b, "\"prompt_progress\":{\"total\":120,\"cache\":0,"
                                          "\"processed\":[1,2,{\"x\":null}],\"f\":1.5e3}"); break;
    case 1: member_sep(b, first); adds(b, "\"future\":[true,false,null,\"\\u00e9\",[]]"); break;
    case 2: member_sep(b, first); adds(b, "\"queue\":3"); break;
    default: break;
    }
}

static void msg_start(buf *b, unsigned long seq)
{
    int first = 1;
    adds(b, "{");
    head(b, "start", seq, &first);
    if (below(2)) {
        member_sep(b, &first);
        adds(b, "\"model\":\"gemma-3-270m\"");
    }
    extras(b, &first);
    adds(b, "}");
}

static void msg_progress(buf *b, unsigned long seq)
{
    int first = 1;
    adds(b, "{");
    head(b, "progress", seq, &first);
    if (below(2)) {
        member_sep(b, &first);
        adds(b, "\"queued_ms\":5012.25");
    }
    extras(b, &first);
    adds(b, "}");
}

static void msg_chunk(buf *b, unsigned long seq, const buf *json_text)
{
    int first = 1;
    adds(b, "{");
    head(b, "chunk", seq, &first);
    member_sep(b, &first);
    adds(b, "\"text\":\"");
    add(b, json_text->p, json_text->len);
    adds(b, "\"");
    extras(b, &first);
    adds(b, "}");
}

static void msg_done(buf *b, unsigned long seq)
{
    int first = 1;
    adds(b, "{");
    head(b, below(4) ? "done" : "reply", seq, &first);
    member_sep(b, &first);
    adds(b, "\"finish_reason\":\"stop\"");
    if (below(2)) {
        member_sep(b, &first);
        adds(b, "\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":48}");
    }
    if (below(2)) {
        member_sep(b, &first);
        adds(b, "\"timings\":{\"queue_ms\":0.5,\"ttft_ms\":81.2,\"total_ms\":902.7,"
                "\"tokens_per_s\":53.1}");
    }
    extras(b, &first);
    adds(b, "}");
}

static void msg_error(buf *b, unsigned long seq)
{
    int first = 1;
    buf text, want;
    int i, n = (int)below(60);
    text.len = want.len = 0;
    for (i = 0; i < n; i++) {
        random_char(&text, &want);
    }
    adds(b, "{");
    head(b, "error", seq, &first);
    member_sep(b, &first);
    adds(b, "\"code\":\"backend_error\"");
    if (below(2)) {
        member_sep(b, &first);
        adds(b, "\"message\":\"");
        add(b, text.p, text.len);
        adds(b, "\"");
    }
    member_sep(b, &first);
    adds(b, below(2) ? "\"retryable\":true" : "\"retryable\":false");
    if (below(2)) {
        member_sep(b, &first);
        adds(b, "\"retry_after_ms\":1000,\"backend_type\":\"server_error\"");
    }
    adds(b, "}");
}

/* A random valid message of the current request. */
static void random_message(buf *b, unsigned long seq)
{
    buf text, want;
    int i, n;
    b->len = 0;
    switch (below(5)) {
    case 0: msg_start(b, seq); break;
    case 1: msg_progress(b, seq); break;
    case 2: msg_done(b, seq); break;
    case 3: msg_error(b, seq); break;
    default:
        text.len = want.len = 0;
        n = 1 + (int)below(80);
        for (i = 0; i < n; i++) {
            random_char(&text, &want);
        }
        msg_chunk(b, seq, &text);
        break;
    }
}

/* --------------------------------------------------------------- valid streams */

#define MAX_CHUNKS 12

typedef struct answer {
    buf want;                /* the whole text, UTF-8 */
    buf json[MAX_CHUNKS];    /* each chunk's text, JSON-escaped */
    size_t cut[MAX_CHUNKS];  /* each chunk's end in want */
    int chunks;
} answer;

static answer ans;

/* The answer's characters, cut into chunks at random character boundaries. */
static void random_answer(void)
{
    int c, i, n;
    ans.want.len = 0;
    ans.chunks = 1 + (int)below(MAX_CHUNKS);
    for (c = 0; c < ans.chunks; c++) {
        ans.json[c].len = 0;
        n = 1 + (int)below(40);
        for (i = 0; i < n; i++) {
            random_char(&ans.json[c], &ans.want);
        }
        ans.cut[c] = ans.want.len;
    }
}

static void check_stream_end(const char *what)
{
    if (got.errors || got.done != 1) {
        FAIL("%s: done %d, errors %d (%s)", what, got.done, got.errors, got.code);
    } else if (got.text_len != ans.want.len || memcmp(got.text, ans.want.p, got.text_len) != 0) {
        FAIL("%s: text differs (%lu bytes, want %lu)", what, (unsigned long)got.text_len,
             (unsigned long)ans.want.len);
    }
}

/* Feed seq 0..: start, chunks with progress between, done; with copies of earlier ones. */
static void valid_stream(void)
{
    buf m[2 * MAX_CHUNKS + 2];
    int n = 0, i;
    new_request();
    random_answer();
    m[n].len = 0;
    msg_start(&m[n], (unsigned long)n), n++;
    for (i = 0; i < ans.chunks; i++) {
        if (below(4) == 0) {
            m[n].len = 0;
            msg_progress(&m[n], (unsigned long)n), n++;
        }
        m[n].len = 0;
        msg_chunk(&m[n], (unsigned long)n, &ans.json[i]), n++;
    }
    m[n].len = 0;
    msg_done(&m[n], (unsigned long)n), n++;
    for (i = 0; i < n; i++) {
        if (feed(m[i].p, m[i].len) != LLMB_FEED_OK) {
            FAIL("stream: message %d not taken: %.*s", i, (int)m[i].len, m[i].p);
        }
        if (i > 0 && below(4) == 0) { /* a copy of an earlier message (not seq 0) */
            int k = 1 + (int)below((uint32_t)i);
            if (k <= i && feed(m[k].p, m[k].len) != LLMB_FEED_DUPLICATE && i + 1 < n) {
                FAIL("stream: copy of %d not dropped", k);
            }
        }
    }
    check_stream_end("stream");
}

/* The chunks of the answer cut differently: same text, other boundaries. */
static int recut(buf *json, int max)
{
    /* rebuild from want by re-encoding plainly at random character boundaries */
    size_t at = 0, end;
    int n = 0;
    while (at < ans.want.len && n < max) {
        const unsigned char *w = (const unsigned char *)ans.want.p;
        size_t take = 1 + below(60);
        end = at;
        while (end < ans.want.len && take > 0) {
            unsigned char b0 = w[end];
            size_t cl = b0 < 0x80 ? 1 : b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : 2;
            end += cl;
            take--;
        }
        if (n == max - 1) {
            end = ans.want.len;
        }
        json[n].len = 0;
        while (at < end) {
            unsigned char b0 = w[at];
            if (b0 == '"' || b0 == '\\') {
                add(&json[n], "\\", 1);
                add(&json[n], (const char *)w + at, 1);
            } else if (b0 < 0x20) {
                add_u(&json[n], b0);
            } else {
                add(&json[n], (const char *)w + at, 1);
            }
            at++;
        }
        n++;
    }
    return n;
}

/* A stream broken off midway and answered again from seq 0, cut differently. */
static void restarted_stream(void)
{
    buf m, again[MAX_CHUNKS];
    int given, i, seq = 0, n;
    new_request();
    random_answer();
    m.len = 0;
    msg_start(&m, (unsigned long)seq++);
    feed(m.p, m.len);
    given = (int)below((uint32_t)ans.chunks + 1);
    for (i = 0; i < given; i++) {
        m.len = 0;
        msg_chunk(&m, (unsigned long)seq++, &ans.json[i]);
        feed(m.p, m.len);
    }
    if (below(2)) {
        m.len = 0;
        msg_progress(&m, (unsigned long)seq++);
        feed(m.p, m.len);
    }
    /* the new answer */
    n = recut(again, MAX_CHUNKS);
    seq = 0;
    m.len = 0;
    msg_start(&m, (unsigned long)seq++);
    feed(m.p, m.len);
    for (i = 0; i < n; i++) {
        if (below(5) == 0) {
            m.len = 0;
            msg_progress(&m, (unsigned long)seq++);
            feed(m.p, m.len);
        }
        m.len = 0;
        msg_chunk(&m, (unsigned long)seq++, &again[i]);
        feed(m.p, m.len);
    }
    m.len = 0;
    msg_done(&m, (unsigned long)seq);
    feed(m.p, m.len);
    if (got.errors && strcmp(got.code, "gap") == 0) {
        /* the new answer's seq may pass the first one's next seq while still repeating
           known text only when the first answer went further; not the case here */
        FAIL("restart: gap");
    }
    check_stream_end("restart");
}

/* ------------------------------------------------------------------ mutations */

static const char interesting[] = "\"\\{}[],:0123456789-+.eEtrufalsn u\x00\x1f\x7f\x80\xbf\xc3\xe2\xed\xf0\xff";
static const char *const tokens[] = {
    "\"", "\\", "\\u", "\\ud83d", "\\ude00", "\\u00", "{", "}", "[", "]", "]}", ",", ":",
    ",\"x\":", "1e99999", "-", "-0.0e-5", "null", "true", "false", "99999999999999999999",
    "\"seq\":0", "\"seq\":1", "\"type\":\"done\"", "\"text\":\"", "\"usage\":{", "{\"a\":[",
    "\xff\xfe", "\xf0\x9f", "\xc3",
};

static void mutate(buf *b)
{
    int rounds = 1 + (int)below(4), r;
    for (r = 0; r < rounds; r++) {
        size_t at = b->len ? below((uint32_t)b->len) : 0;
        switch (below(7)) {
        case 0: /* flip a bit */
            if (b->len) {
                b->p[at] = (char)(b->p[at] ^ (1 << below(8)));
            }
            break;
        case 1: /* an interesting byte */
            if (b->len) {
                b->p[at] = interesting[below(sizeof interesting - 1)];
            }
            break;
        case 2: /* truncate */
            b->len = b->len ? below((uint32_t)b->len) : 0;
            break;
        case 3: { /* insert a token */
            const char *t = tokens[below(sizeof tokens / sizeof tokens[0])];
            size_t n = strlen(t);
            if (b->len + n < sizeof b->p) {
                memmove(b->p + at + n, b->p + at, b->len - at);
                memcpy(b->p + at, t, n);
                b->len += n;
            }
            break;
        }
        case 4: { /* delete a range */
            size_t n = below((uint32_t)(b->len - at) + 1);
            memmove(b->p + at, b->p + at + n, b->len - at - n);
            b->len -= n;
            break;
        }
        case 5: { /* duplicate a range */
            size_t n = below((uint32_t)(b->len - at) + 1);
            if (b->len + n < sizeof b->p) {
                memmove(b->p + at + n, b->p + at, b->len - at);
                b->len += n; /* the range now appears twice */
            }
            break;
        }
        default: { /* random bytes */
            size_t n = 1 + below(8), i;
            if (b->len + n < sizeof b->p) {
                memmove(b->p + at + n, b->p + at, b->len - at);
                for (i = 0; i < n; i++) {
                    b->p[at + i] = (char)below(256);
                }
                b->len += n;
            }
            break;
        }
        }
    }
}

/* A client in a random state: fresh, or a few messages into a stream. */
static unsigned long warm_up(void)
{
    buf m;
    unsigned long seq = 0, k = below(4), i;
    buf text;
    new_request();
    for (i = 0; i < k; i++) {
        m.len = 0;
        if (i == 0) {
            msg_start(&m, seq++);
        } else {
            text.len = 0;
            adds(&text, "some text \\u00e9 ");
            msg_chunk(&m, seq++, &text);
        }
        feed(m.p, m.len);
    }
    return seq;
}

static unsigned long hostile; /* mutated and random payloads fed */

static void mutated(void)
{
    buf m;
    unsigned long seq = warm_up();
    int i, n = 1 + (int)below(8);
    for (i = 0; i < n && llmb_active(&cl); i++) {
        random_message(&m, below(3) ? seq : below(6));
        mutate(&m);
        if (feed(m.p, m.len) == LLMB_FEED_OK) {
            seq++;
        }
        hostile++;
        if (below(4) == 0) { /* the same on a mutated topic */
            buf t;
            t.len = 0;
            adds(&t, reply_topic);
            mutate(&t);
            feed_exact(t.p, t.len, m.p, m.len);
            hostile++;
        }
    }
}

static void random_payload(void)
{
    buf m;
    size_t n, i;
    warm_up();
    m.len = 0;
    if (below(2)) {
        n = below(300);
        for (i = 0; i < n; i++) {
            m.p[m.len++] = (char)below(256);
        }
    } else {
        n = below(40);
        for (i = 0; i < n; i++) {
            adds(&m, tokens[below(sizeof tokens / sizeof tokens[0])]);
        }
    }
    feed(m.p, m.len);
    hostile++;
}

/* Timing: random ticks and messages never end a request twice. */
static void random_ticks(void)
{
    buf m;
    uint32_t now = (uint32_t)rnd();
    int i;
    unsigned long seq = warm_up();
    for (i = 0; i < 8; i++) {
        now += below(40000);
        (void)llmb_tick(&cl, now);
        if (below(2)) {
            random_message(&m, seq++);
            feed(m.p, m.len);
        }
    }
}

/* A request with a random prompt (any bytes) into a buffer of exactly the size needed:
   valid JSON whose content decodes back to the prompt, and one byte less is refused. */
static unsigned long requests;

static void request_roundtrip(void)
{
    char prompt[300], topic[128], *exact;
    static char big[4096];
    llmb_request r;
    llmb_json j;
    llmb_json_str key, content;
    size_t n = 1 + below(sizeof prompt - 1), i, got_len = 0, pos = 0;
    long len;
    unsigned char ch[4];
    char decoded[sizeof prompt * 4];
    new_request();
    for (i = 0; i < n; i++) {
        prompt[i] = (char)(below(4) ? 0x20 + below(0x60) : below(256));
    }
    memset(&r, 0, sizeof r);
    r.id = req_id;
    r.prompt = prompt;
    r.prompt_len = n;
    r.plain_completion = (int)below(2);
    len = llmb_build_request(&cl, &r, topic, sizeof topic, big, sizeof big);
    requests++;
    if (len <= 0) {
        FAIL("request: %ld", len);
        return;
    }
    exact = (char *)malloc((size_t)len + 1);
    if (!exact) {
        fprintf(stderr, "fuzz: out of memory\n");
        exit(2);
    }
    if (llmb_build_request(&cl, &r, topic, sizeof topic, exact, (size_t)len) != LLMB_ERR_SPACE
        || llmb_build_request(&cl, &r, topic, sizeof topic, exact, (size_t)len + 1) != len) {
        FAIL("request: exact buffer");
    }
    llmb_json_init(&j, exact, (size_t)len);
    content.len = 0;
    content.p = NULL;
    if (llmb_json_skip(&j) != 0 || llmb_json_end(&j) != 0) {
        FAIL("request: not JSON: %s", exact);
    }
    /* find the prompt: "prompt" at the top, or the content of the one message */
    {
        const char *at = strstr(exact, r.plain_completion ? "\"prompt\":" : "\"content\":");
        if (!at) {
            FAIL("request: no prompt");
        } else {
            llmb_json_init(&j, at, (size_t)(exact + len - at));
            if (llmb_json_string(&j, &key) != 0 || llmb_json_peek(&j) != ':') {
                FAIL("request: bad key");
            } else {
                j.pos++;
                if (llmb_json_string(&j, &content) != 0) {
                    FAIL("request: bad prompt string");
                }
            }
        }
    }
    while ((i = llmb_json_next_char(&content, &pos, ch)) > 0) {
        memcpy(decoded + got_len, ch, i);
        got_len += i;
    }
    if (got_len != n || memcmp(decoded, prompt, n) != 0) {
        FAIL("request: the prompt does not decode back");
    }
    free(exact);
}

int main(int argc, char **argv)
{
    /* CASES counts the mutated and random payloads; valid ones come on top */
    unsigned long want = argc > 1 ? strtoul(argv[1], NULL, 10) : 100000ul;
    unsigned long long seed = argc > 2 ? strtoull(argv[2], NULL, 10) : 20240601ull;
    unsigned long streams = 0, restarts = 0, mutations = 0, randoms = 0;
    clock_t t0 = clock();
    double secs;
    rng = seed ? seed : 1;
    while (hostile < want) {
        switch (below(10)) {
        case 0: valid_stream(); streams++; break;
        case 1: restarted_stream(); restarts++; break;
        case 2: random_payload(); randoms++; break;
        case 3: random_ticks(); request_roundtrip(); break;
        default: mutated(); mutations++; break;
        }
    }
    secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
    printf("fuzz: %lu mutated or random payloads, %lu payloads in all (%lu valid streams, "
           "%lu restarted streams, %lu mutation rounds, %lu random), %lu requests built, "
           "seed %llu, %.1f s CPU, %lu failures\n", hostile, cases, streams, restarts,
           mutations, randoms, requests, seed, secs, failures);
    return failures ? 1 : 0;
}
