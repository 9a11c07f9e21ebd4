/*
 * Unit tests of llm_bridge and llmb_json, run under AddressSanitizer and
 * UndefinedBehaviorSanitizer (make test). Every payload is fed from a heap block of
 * exactly its length, so reading one byte past it is an ASan error.
 * Prints "N tests, M checks passed" (or the failures) and exits non-zero on a failure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llm_bridge.h"
#include "llmb_json.h"

static int checks, failures, tests;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        checks++;                                                                      \
        if (!(cond)) {                                                                 \
            failures++;                                                                \
            fprintf(stderr, "%s:%d: %s: CHECK(%s) failed\n", __FILE__, __LINE__,       \
                    current, #cond);                                                   \
        }                                                                              \
    } while (0)

#define CHECK_STR(got, want) CHECK(strcmp((got), (want)) == 0)

/* An error message as the client gives it: cut to LLMB_TEXT_BUF - 1 bytes (all ASCII here). */
static int same_message(const char *got, const char *want)
{
    size_t n = strlen(want);
    if (n > LLMB_TEXT_BUF - 1) {
        n = LLMB_TEXT_BUF - 1;
    }
    return strlen(got) == n && strncmp(got, want, n) == 0;
}

#define CHECK_MSG(got, want) CHECK(same_message((got), (want)))

static const char *current = "";

#define TEST(name) static void name(void)
#define RUN(name)                                                                      \
    do {                                                                               \
        current = #name;                                                               \
        tests++;                                                                       \
        name();                                                                        \
    } while (0)

/* ------------------------------------------------------------------------- recorder */

typedef struct rec {
    char text[4096];
    size_t text_len;
    size_t pieces, max_piece;
    int done, errors, restarts;
    llmb_done last_done;
    char reason[32];
    char code[32], message[256], backend[64];
    llmb_error last_error;
} rec;

static void on_text(void *user, const char *text, size_t len)
{
    rec *r = (rec *)user;
    if (r->text_len + len < sizeof r->text) {
        memcpy(r->text + r->text_len, text, len);
        r->text_len += len;
        r->text[r->text_len] = '\0';
    }
    r->pieces++;
    if (len > r->max_piece) {
        r->max_piece = len;
    }
}

static void on_done(void *user, const llmb_done *d)
{
    rec *r = (rec *)user;
    r->done++;
    r->last_done = *d;
    snprintf(r->reason, sizeof r->reason, "%s", d->finish_reason);
    r->last_done.finish_reason = r->reason;
}

static void on_error(void *user, const llmb_error *e)
{
    rec *r = (rec *)user;
    r->errors++;
    r->last_error = *e;
    snprintf(r->code, sizeof r->code, "%s", e->code);
    snprintf(r->message, sizeof r->message, "%s", e->message);
    snprintf(r->backend, sizeof r->backend, "%s", e->backend_type);
    r->last_error.code = r->code;
    r->last_error.message = r->message;
    r->last_error.backend_type = r->backend;
}

static void on_restart(void *user)
{
    ((rec *)user)->restarts++;
}

static llmb_client cl;
static rec rc;
static char topic[256], payload[1024];
static long payload_len;

#define CLIENT "kitchen"
#define ID "req-1"
#define REPLY "llm/reply/" CLIENT "/" ID

static void setup_with(const llmb_config *extra)
{
    llmb_config cfg;
    llmb_request r;
    memset(&rc, 0, sizeof rc);
    if (extra) {
        cfg = *extra;
    } else {
        memset(&cfg, 0, sizeof cfg);
        cfg.client = CLIENT;
        cfg.max_packet = 256;
    }
    cfg.on_text = on_text;
    cfg.on_done = on_done;
    cfg.on_error = on_error;
    cfg.on_restart = on_restart;
    cfg.user = &rc;
    if (llmb_init(&cl, &cfg) != 0) {
        fprintf(stderr, "llmb_init failed\n");
        exit(2);
    }
    memset(&r, 0, sizeof r);
    r.id = ID;
    r.prompt = "hi";
    payload_len = llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload);
}

static void setup(void)
{
    setup_with(NULL);
}

/* Feed s (strlen) on topic t from a heap block of exactly its length. */
static int feed_on(const char *t, const char *s)
{
    size_t n = strlen(s);
    char *p = (char *)malloc(n ? n : 1);
    int r;
    memcpy(p, s, n);
    r = llmb_feed(&cl, t, strlen(t), p, n);
    free(p);
    return r;
}

static int feed(const char *s)
{
    return feed_on(REPLY, s);
}

/* A chunk message of the test request. */
static int chunk(unsigned seq, const char *json_text)
{
    char buf[2048];
    snprintf(buf, sizeof buf, "{\"id\":\"" ID "\",\"seq\":%u,\"type\":\"chunk\",\"text\":\"%s\"}",
             seq, json_text);
    return feed(buf);
}

static int start(unsigned seq)
{
    char buf[128];
    snprintf(buf, sizeof buf, "{\"type\":\"start\",\"id\":\"" ID "\",\"seq\":%u,\"queue\":0}", seq);
    return feed(buf);
}

static int done_msg(unsigned seq)
{
    char buf[128];
    snprintf(buf, sizeof buf, "{\"type\":\"done\",\"id\":\"" ID "\",\"seq\":%u,"
             "\"finish_reason\":\"stop\"}", seq);
    return feed(buf);
}

static int progress(unsigned seq)
{
    char buf[128];
    snprintf(buf, sizeof buf, "{\"type\":\"progress\",\"id\":\"" ID "\",\"seq\":%u}", seq);
    return feed(buf);
}

/* ------------------------------------------------------------------------- json */

static int scan_string(const char *json, char *out, size_t cap)
{
    llmb_json j;
    llmb_json_str s;
    size_t n = strlen(json);
    char *p = (char *)malloc(n ? n : 1);
    int r;
    memcpy(p, json, n);
    llmb_json_init(&j, p, n);
    r = llmb_json_string(&j, &s);
    if (r == 0) {
        llmb_json_str_copy(&s, out, cap, NULL);
        r = llmb_json_end(&j);
    }
    free(p);
    return r;
}

static int skips(const char *json)
{
    llmb_json j;
    size_t n = strlen(json);
    char *p = (char *)malloc(n ? n : 1);
    int r;
    memcpy(p, json, n);
    llmb_json_init(&j, p, n);
    r = llmb_json_skip(&j);
    if (r == 0) {
        r = llmb_json_end(&j);
    }
    free(p);
    return r == 0;
}

static int number(const char *json, int32_t *v, int *is_int)
{
    llmb_json j;
    llmb_json_num num;
    size_t n = strlen(json);
    char *p = (char *)malloc(n ? n : 1);
    int r;
    memcpy(p, json, n);
    llmb_json_init(&j, p, n);
    r = llmb_json_number(&j, &num);
    if (r == 0) {
        r = llmb_json_end(&j);
        *v = num.value;
        *is_int = num.is_int;
    }
    free(p);
    return r;
}

TEST(json_string_escapes)
{
    char out[64];
    CHECK(scan_string("\"plain\"", out, sizeof out) == 0);
    CHECK_STR(out, "plain");
    CHECK(scan_string("\"a\\\"b\\\\c\\/d\\be\\ff\\ng\\rh\\ti\"", out, sizeof out) == 0);
    CHECK_STR(out, "a\"b\\c/d\be\ff\ng\rh\ti");
    CHECK(scan_string("\"\\u00e9\\u20AC\\u0041\"", out, sizeof out) == 0);
    CHECK_STR(out, "\xc3\xa9\xe2\x82\xac" "A");
    CHECK(scan_string("\"caf\xc3\xa9\"", out, sizeof out) == 0); /* raw UTF-8 passes */
    CHECK_STR(out, "caf\xc3\xa9");
}

TEST(json_surrogates)
{
    char out[64];
    CHECK(scan_string("\"\\ud83d\\ude00\"", out, sizeof out) == 0);
    CHECK_STR(out, "\xf0\x9f\x98\x80");
    CHECK(scan_string("\"\\uD83D\\uDE00x\"", out, sizeof out) == 0);
    CHECK_STR(out, "\xf0\x9f\x98\x80x");
    CHECK(scan_string("\"\\ud83dx\"", out, sizeof out) == 0); /* lone high */
    CHECK_STR(out, "\xef\xbf\xbdx");
    CHECK(scan_string("\"\\ude00\"", out, sizeof out) == 0); /* lone low */
    CHECK_STR(out, "\xef\xbf\xbd");
    CHECK(scan_string("\"\\ud83d\\u0041\"", out, sizeof out) == 0); /* high + non-low */
    CHECK_STR(out, "\xef\xbf\xbd" "A");
    CHECK(scan_string("\"\\ud83d\\ud83d\\ude00\"", out, sizeof out) == 0); /* high high low */
    CHECK_STR(out, "\xef\xbf\xbd\xf0\x9f\x98\x80");
    CHECK(scan_string("\"\\ud83d\"", out, sizeof out) == 0); /* high at the end */
    CHECK_STR(out, "\xef\xbf\xbd");
    CHECK(scan_string("\"\\u0000\"", out, sizeof out) == 0);
    CHECK(out[0] == '\0');
}

TEST(json_bad_strings)
{
    char out[16];
    CHECK(scan_string("\"abc", out, sizeof out) != 0);          /* unterminated */
    CHECK(scan_string("\"ab\\", out, sizeof out) != 0);         /* backslash at the end */
    CHECK(scan_string("\"\\x\"", out, sizeof out) != 0);        /* unknown escape */
    CHECK(scan_string("\"\\u12\"", out, sizeof out) != 0);      /* short \u */
    CHECK(scan_string("\"\\u12g4\"", out, sizeof out) != 0);    /* not hex */
    CHECK(scan_string("\"\\u123", out, sizeof out) != 0);       /* cut inside \u */
    CHECK(scan_string("\"a\nb\"", out, sizeof out) != 0);       /* raw control char */
    CHECK(scan_string("\"\"x", out, sizeof out) != 0);          /* trailing garbage */
    CHECK(scan_string("", out, sizeof out) != 0);
    CHECK(scan_string("'a'", out, sizeof out) != 0);
}

TEST(json_copy_truncates_on_character_boundary)
{
    llmb_json_str s;
    char out[6];
    int cut = 0;
    size_t n;
    s.p = (const unsigned char *)"ab\xe2\x82\xac" "cd"; /* "ab€cd" raw */
    s.len = 7;
    n = llmb_json_str_copy(&s, out, 5, &cut); /* room for 4 bytes: "ab" + 2 of 3 */
    CHECK(cut == 1);
    CHECK(n == 2);
    CHECK_STR(out, "ab");
    s.p = (const unsigned char *)"ab\\u20accd";
    s.len = 10;
    n = llmb_json_str_copy(&s, out, 5, &cut);
    CHECK(cut == 1 && n == 2);
    n = llmb_json_str_copy(&s, out, 6, &cut);
    CHECK(cut == 1 && n == 5);
    CHECK_STR(out, "ab\xe2\x82\xac");
    CHECK(llmb_json_str_copy(&s, out, 0, &cut) == 0 && cut == 1);
}

TEST(json_numbers)
{
    int32_t v = 0;
    int is_int = 0;
    CHECK(number("0", &v, &is_int) == 0 && v == 0 && is_int);
    CHECK(number("42", &v, &is_int) == 0 && v == 42 && is_int);
    CHECK(number("-7", &v, &is_int) == 0 && v == -7 && is_int);
    CHECK(number("12.9", &v, &is_int) == 0 && v == 12 && !is_int);
    CHECK(number("-12.9", &v, &is_int) == 0 && v == -12 && !is_int);
    CHECK(number("1e3", &v, &is_int) == 0 && v == 1000 && !is_int);
    CHECK(number("1.5E+2", &v, &is_int) == 0 && v == 150);
    CHECK(number("2.5e-1", &v, &is_int) == 0 && v == 0);
    CHECK(number("0.001", &v, &is_int) == 0 && v == 0);
    CHECK(number("1e999999999", &v, &is_int) == 0 && v == INT32_MAX && !is_int);
    CHECK(number("1e-999999999", &v, &is_int) == 0 && v == 0);
    CHECK(number("2147483647", &v, &is_int) == 0 && v == INT32_MAX && is_int);
    CHECK(number("2147483648", &v, &is_int) == 0 && v == INT32_MAX && !is_int);
    CHECK(number("-2147483648", &v, &is_int) == 0 && v == INT32_MIN);
    CHECK(number("99999999999999999999", &v, &is_int) == 0 && v == INT32_MAX && !is_int);
    CHECK(number("123456789.123456789", &v, &is_int) == 0 && v == 123456789);
    CHECK(number("01", &v, &is_int) != 0);
    CHECK(number("-", &v, &is_int) != 0);
    CHECK(number("1.", &v, &is_int) != 0);
    CHECK(number(".5", &v, &is_int) != 0);
    CHECK(number("1e", &v, &is_int) != 0);
    CHECK(number("1e+", &v, &is_int) != 0);
    CHECK(number("+1", &v, &is_int) != 0);
    CHECK(number("0x10", &v, &is_int) != 0);
}

TEST(json_skip_values)
{
    char deep[200];
    int i;
    CHECK(skips("{}"));
    CHECK(skips("[]"));
    CHECK(skips(" { \"a\" : [1, 2.5, -3e2, true, false, null, \"x\", {\"b\":{}}] } "));
    CHECK(skips("\"s\""));
    CHECK(skips("null"));
    CHECK(!skips("{\"a\":1,}"));
    CHECK(!skips("[1,]"));
    CHECK(!skips("{\"a\" 1}"));
    CHECK(!skips("{1:2}"));
    CHECK(!skips("[1 2]"));
    CHECK(!skips("{\"a\":1]"));
    CHECK(!skips("[1}"));
    CHECK(!skips("[1"));
    CHECK(!skips("{"));
    CHECK(!skips("tru"));
    CHECK(!skips("nul"));
    CHECK(!skips("[] []"));
    CHECK(!skips(""));
    CHECK(!skips("   "));
    /* 64 levels pass, 65 do not */
    for (i = 0; i < 64; i++) {
        deep[i] = '[';
        deep[64 + i] = ']';
    }
    deep[128] = '\0';
    CHECK(skips(deep));
    for (i = 0; i < 65; i++) {
        deep[i] = '[';
        deep[65 + i] = ']';
    }
    deep[130] = '\0';
    CHECK(!skips(deep));
}

TEST(json_object_members)
{
    llmb_json j;
    llmb_json_str key, val;
    size_t count = 0;
    const char *text = "{\"a\":\"x\", \"b\" : \"y\"}";
    llmb_json_init(&j, text, strlen(text));
    CHECK(llmb_json_object_begin(&j) == 0);
    CHECK(llmb_json_object_next(&j, &count, &key) == 1 && llmb_json_str_equals(&key, "a"));
    CHECK(llmb_json_string(&j, &val) == 0 && llmb_json_str_equals(&val, "x"));
    CHECK(llmb_json_object_next(&j, &count, &key) == 1 && llmb_json_str_equals(&key, "b"));
    CHECK(llmb_json_string(&j, &val) == 0 && !llmb_json_str_equals(&val, "yy"));
    CHECK(llmb_json_object_next(&j, &count, &key) == 0);
    CHECK(llmb_json_end(&j) == 0);
}

/* --------------------------------------------------------------------- requests */

TEST(request_json)
{
    llmb_request r;
    setup();
    CHECK(payload_len == (long)strlen(payload));
    CHECK_STR(topic, "llm/request/kitchen");
    CHECK_STR(payload, "{\"id\":\"req-1\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
                       "\"max_packet\":256}");
    memset(&r, 0, sizeof r);
    r.id = "x.y_z-1";
    r.prompt = "say \"hi\"\\\n\t\x01\x1f caf\xc3\xa9";
    r.plain_completion = 1;
    r.max_tokens = 48;
    r.has_temperature = 1;
    r.temperature_milli = 700;
    r.has_seed = 1;
    r.seed = -5;
    r.session = "s1";
    r.profile = "p";
    r.chunk_bytes = 128;
    CHECK(llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload) > 0);
    CHECK_STR(payload, "{\"id\":\"x.y_z-1\",\"prompt\":\"say \\\"hi\\\"\\\\\\n\\t\\u0001\\u001f "
                       "caf\xc3\xa9\",\"session\":\"s1\",\"profile\":\"p\",\"max_tokens\":48,"
                       "\"temperature\":0.7,\"seed\":-5,\"chunk_bytes\":128,\"max_packet\":256}");
}

TEST(request_temperatures)
{
    static const struct { int32_t milli; const char *json; } cases[] = {
        {0, "0"}, {1, "0.001"}, {10, "0.01"}, {1250, "1.25"}, {99000, "99"}, {5000, "5"},
        {-300, "-0.3"},
    };
    size_t i;
    llmb_request r;
    setup();
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char want[128];
        memset(&r, 0, sizeof r);
        r.id = "t";
        r.prompt = "p";
        r.plain_completion = 1;
        r.has_temperature = 1;
        r.temperature_milli = cases[i].milli;
        snprintf(want, sizeof want, "{\"id\":\"t\",\"prompt\":\"p\",\"temperature\":%s,"
                 "\"max_packet\":256}", cases[i].json);
        CHECK(llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload) > 0);
        CHECK_STR(payload, want);
    }
}

TEST(request_does_not_fit)
{
    /* every buffer one byte too small is refused without writing past it */
    llmb_request r;
    long need;
    size_t cap;
    setup();
    memset(&r, 0, sizeof r);
    r.id = "abc";
    r.prompt = "a \"quoted\" prompt\n";
    need = llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload);
    CHECK(need > 0);
    for (cap = 0; cap <= (size_t)need; cap++) {
        char *p = (char *)malloc(cap ? cap : 1);
        long got = llmb_build_request(&cl, &r, topic, sizeof topic, p, cap);
        CHECK(got == LLMB_ERR_SPACE);
        free(p);
    }
    {
        char *p = (char *)malloc((size_t)need + 1);
        CHECK(llmb_build_request(&cl, &r, topic, sizeof topic, p, (size_t)need + 1) == need);
        CHECK(p[need] == '\0');
        free(p);
    }
    {
        char small_topic[19]; /* "llm/request/kitchen" is 19 + NUL */
        CHECK(llmb_build_request(&cl, &r, small_topic, sizeof small_topic, payload,
                                 sizeof payload) == LLMB_ERR_SPACE);
    }
}

TEST(request_arguments)
{
    llmb_request r;
    char long_id[70];
    setup();
    memset(&r, 0, sizeof r);
    r.prompt = "x";
    CHECK(llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload)
          == LLMB_ERR_ARG); /* no id */
    r.id = "a/b";
    CHECK(llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload)
          == LLMB_ERR_ARG);
    r.id = "";
    CHECK(llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload)
          == LLMB_ERR_ARG);
    memset(long_id, 'a', 65);
    long_id[65] = '\0';
    r.id = long_id;
    CHECK(llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload)
          == LLMB_ERR_ARG);
    long_id[64] = '\0';
    CHECK(llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload) > 0);
    r.id = "ok";
    r.session = "bad session";
    CHECK(llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload)
          == LLMB_ERR_ARG);
    r.session = NULL;
    r.prompt = NULL;
    CHECK(llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload)
          == LLMB_ERR_ARG);
}

TEST(init_arguments)
{
    llmb_config cfg;
    llmb_client c;
    memset(&cfg, 0, sizeof cfg);
    CHECK(llmb_init(&c, &cfg) == LLMB_ERR_ARG); /* no client */
    cfg.client = "-dash";
    CHECK(llmb_init(&c, &cfg) == LLMB_ERR_ARG);
    cfg.client = "a b";
    CHECK(llmb_init(&c, &cfg) == LLMB_ERR_ARG);
    cfg.client = "dev1";
    cfg.prefix = "a/+";
    CHECK(llmb_init(&c, &cfg) == LLMB_ERR_ARG);
    cfg.prefix = "";
    CHECK(llmb_init(&c, &cfg) == LLMB_ERR_ARG);
    cfg.prefix = "home/llm";
    CHECK(llmb_init(&c, &cfg) == 0);
    CHECK(c.cfg.resend_after_ms == 15000 && c.cfg.max_resends == 3 && c.cfg.timeout_ms == 60000);
    CHECK(llmb_reply_filter(&c, topic, sizeof topic) > 0);
    CHECK_STR(topic, "home/llm/reply/dev1/#");
    CHECK(llmb_reply_topic(&c, topic, sizeof topic) == LLMB_ERR_ARG); /* no request yet */
}

TEST(cancel_message)
{
    setup();
    CHECK(llmb_build_cancel(&cl, topic, sizeof topic, payload, sizeof payload) == 14);
    CHECK_STR(topic, "llm/cancel/kitchen");
    CHECK_STR(payload, "{\"id\":\"req-1\"}");
    CHECK(llmb_reply_topic(&cl, topic, sizeof topic) > 0);
    CHECK_STR(topic, REPLY);
}

/* ----------------------------------------------------------------------- replies */

TEST(stream_in_order)
{
    setup();
    CHECK(llmb_active(&cl));
    CHECK(start(0) == LLMB_FEED_OK);
    CHECK(chunk(1, "Hello") == LLMB_FEED_OK);
    CHECK(chunk(2, ", w\\u00f6rld \\ud83d\\ude00\\n") == LLMB_FEED_OK);
    CHECK(progress(3) == LLMB_FEED_OK);
    CHECK(feed("{\"id\":\"req-1\",\"seq\":4,\"type\":\"done\",\"finish_reason\":\"length\","
               "\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":48},"
               "\"timings\":{\"queue_ms\":1.5,\"ttft_ms\":80.25,\"total_ms\":912.0,"
               "\"tokens_per_s\":52.7}}") == LLMB_FEED_OK);
    CHECK_STR(rc.text, "Hello, w\xc3\xb6rld \xf0\x9f\x98\x80\n");
    CHECK(rc.done == 1 && rc.errors == 0 && rc.restarts == 0);
    CHECK_STR(rc.reason, "length");
    CHECK_STR(rc.last_done.type, "done");
    CHECK(rc.last_done.prompt_tokens == 12 && rc.last_done.completion_tokens == 48);
    CHECK(rc.last_done.queue_ms == 1 && rc.last_done.ttft_ms == 80);
    CHECK(rc.last_done.total_ms == 912 && rc.last_done.tokens_per_s == 52);
    CHECK(!llmb_active(&cl));
    CHECK(chunk(5, "late") == LLMB_FEED_OTHER); /* after the end: nothing */
    CHECK(rc.done == 1);
}

TEST(done_without_optional_fields)
{
    setup();
    start(0);
    CHECK(feed("{\"type\":\"done\",\"id\":\"req-1\",\"seq\":1,\"finish_reason\":\"stop\"}")
          == LLMB_FEED_OK);
    CHECK(rc.done == 1);
    CHECK(rc.last_done.prompt_tokens == LLMB_ABSENT && rc.last_done.tokens_per_s == LLMB_ABSENT);
    setup();
    start(0);
    CHECK(feed("{\"type\":\"done\",\"id\":\"req-1\",\"seq\":1,\"finish_reason\":\"stop\","
               "\"usage\":{\"completion_tokens\":3},\"timings\":{\"total_ms\":5}}")
          == LLMB_FEED_OK);
    CHECK(rc.last_done.prompt_tokens == LLMB_ABSENT && rc.last_done.completion_tokens == 3);
    CHECK(rc.last_done.queue_ms == LLMB_ABSENT && rc.last_done.total_ms == 5);
}

TEST(start_and_progress_without_fields)
{
    setup();
    CHECK(feed("{\"type\":\"start\",\"id\":\"req-1\",\"seq\":0}") == LLMB_FEED_OK);
    CHECK(feed("{\"type\":\"progress\",\"id\":\"req-1\",\"seq\":1,"
               "\"prompt_progress\":{\"total\":10,\"cache\":[1,{\"x\":null}]}}") == LLMB_FEED_OK);
    CHECK(feed("{\"type\":\"progress\",\"id\":\"req-1\",\"seq\":2,\"queued_ms\":5000.5}")
          == LLMB_FEED_OK);
    CHECK(chunk(3, "ok") == LLMB_FEED_OK);
    CHECK_STR(rc.text, "ok");
}

TEST(duplicates_dropped)
{
    setup();
    start(0);
    chunk(1, "a");
    CHECK(chunk(1, "a") == LLMB_FEED_DUPLICATE);
    chunk(2, "b");
    CHECK(chunk(1, "a") == LLMB_FEED_DUPLICATE);
    CHECK(chunk(2, "b") == LLMB_FEED_DUPLICATE);
    done_msg(3);
    CHECK_STR(rc.text, "ab");
    CHECK(rc.done == 1);
}

TEST(gap_is_an_error)
{
    setup();
    start(0);
    chunk(1, "a");
    CHECK(chunk(3, "c") == LLMB_FEED_OK);
    CHECK(rc.errors == 1);
    CHECK_STR(rc.code, "gap");
    CHECK(rc.last_error.local == 1 && rc.last_error.retryable == 1);
    CHECK_MSG(rc.message, "expected seq 2, got 3: messages of the request were lost");
    CHECK(!llmb_active(&cl));
    CHECK_STR(rc.text, "a");
}

TEST(first_message_lost_is_a_gap)
{
    setup();
    CHECK(chunk(1, "a") == LLMB_FEED_OK);
    CHECK(rc.errors == 1);
    CHECK_STR(rc.code, "gap");
}

TEST(other_topics_and_ids_ignored)
{
    setup();
    CHECK(feed_on("llm/reply/kitchen/req-2", "{\"type\":\"start\",\"id\":\"req-2\",\"seq\":0}")
          == LLMB_FEED_OTHER);
    CHECK(feed_on("llm/reply/kitchen/req-1/x", "{\"type\":\"start\",\"id\":\"req-1\",\"seq\":0}")
          == LLMB_FEED_OTHER);
    CHECK(feed_on("llm/reply/kitche/req-1", "{\"type\":\"start\",\"id\":\"req-1\",\"seq\":0}")
          == LLMB_FEED_OTHER);
    CHECK(feed_on("llm/status/b1", "{\"state\":\"online\"}") == LLMB_FEED_OTHER);
    CHECK(feed_on("", "") == LLMB_FEED_OTHER);
    /* the right topic with another id in the payload */
    CHECK(feed("{\"type\":\"start\",\"id\":\"req-2\",\"seq\":0}") == LLMB_FEED_OTHER);
    CHECK(start(0) == LLMB_FEED_OK);
    CHECK(rc.errors == 0 && rc.done == 0);
}

TEST(malformed_dropped)
{
    static const char *const bad[] = {
        "", "{", "[]", "null", "{\"type\":\"chunk\",\"id\":\"req-1\"}",          /* no seq */
        "{\"type\":\"chunk\",\"seq\":0}",                                      /* no id */
        "{\"id\":\"req-1\",\"seq\":0}",                                        /* no type */
        "{\"type\":\"start\",\"id\":\"req-1\",\"seq\":-1}",
        "{\"type\":\"start\",\"id\":\"req-1\",\"seq\":1.0}",
        "{\"type\":\"start\",\"id\":\"req-1\",\"seq\":\"0\"}",
        "{\"type\":\"start\",\"id\":\"req-1\",\"seq\":99999999999}",
        "{\"type\":\"start\",\"id\":\"req-1\",\"seq\":0} x",
        "{\"type\":\"start\",\"id\":\"req-1\",\"seq\":0,}",
        "{\"type\":1,\"id\":\"req-1\",\"seq\":0}",
        "{\"type\":\"done\",\"id\":\"req-1\",\"seq\":0}",                      /* no finish */
        "{\"type\":\"error\",\"id\":\"req-1\",\"seq\":0,\"message\":\"m\"}",   /* no code */
        "{\"type\":\"chunk\",\"id\":\"req-1\",\"seq\":0,\"text\":\"a\\q\"}",
        "{\"type\":\"chunk\",\"id\":\"req-1\",\"seq\":0,\"usage\":{\"x\":}}",
    };
    size_t i;
    setup();
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int r = feed(bad[i]);
        CHECK(r == LLMB_FEED_MALFORMED);
        if (r != LLMB_FEED_MALFORMED) {
            fprintf(stderr, "  payload: %s -> %d\n", bad[i], r);
        }
    }
    CHECK(rc.errors == 0 && rc.done == 0 && rc.text_len == 0);
    CHECK(start(0) == LLMB_FEED_OK); /* still following */
}

TEST(unknown_fields_and_types)
{
    setup();
    CHECK(feed("{\"future\":[1,{\"a\":[[],{}]}],\"type\":\"start\",\"id\":\"req-1\","
               "\"model\":\"gemma\",\"seq\":0,\"queue\":2,\"x\":null}") == LLMB_FEED_OK);
    CHECK(feed("{\"type\":\"hint\",\"id\":\"req-1\",\"seq\":1,\"text\":\"not text\"}")
          == LLMB_FEED_OK); /* an unknown type takes its seq, its fields mean nothing */
    CHECK(feed("{\"text\":\"X\",\"seq\":2,\"id\":\"req-1\",\"type\":\"chunk\"}")
          == LLMB_FEED_OK); /* any member order */
    CHECK(feed("{\"\\u0074ype\":\"chunk\",\"id\":\"req\\u002d1\",\"seq\":3,"
               "\"te\\u0078t\":\"Y\"}") == LLMB_FEED_OK); /* escaped keys and values */
    CHECK(feed("{\"type\":\"chunk\",\"id\":\"req-1\",\"seq\":4,\"reasoning\":\"hmm\"}")
          == LLMB_FEED_OK); /* reasoning is not text */
    CHECK(feed("{\"type\":\"chunk\",\"id\":\"req-1\",\"seq\":5,\"text\":null}") == LLMB_FEED_OK);
    CHECK_STR(rc.text, "XY");
    CHECK(rc.errors == 0);
}

TEST(error_with_all_fields)
{
    setup();
    start(0);
    CHECK(feed("{\"type\":\"error\",\"id\":\"req-1\",\"seq\":1,\"code\":\"backend_error\","
               "\"message\":\"llama said \\\"no\\\"\",\"retryable\":true,"
               "\"retry_after_ms\":2500,\"backend_type\":\"server_error\"}") == LLMB_FEED_OK);
    CHECK(rc.errors == 1 && rc.done == 0);
    CHECK_STR(rc.code, "backend_error");
    CHECK_MSG(rc.message, "llama said \"no\"");
    CHECK(rc.last_error.message_len == strlen(rc.message));
    CHECK(rc.last_error.message_truncated == (LLMB_TEXT_BUF - 1 < 15));
    CHECK(rc.last_error.retryable == 1 && rc.last_error.retry_after_ms == 2500);
    CHECK_STR(rc.backend, "server_error");
    CHECK(rc.last_error.local == 0);
}

TEST(error_shrunk_to_fit)
{
    setup();
    CHECK(feed("{\"type\":\"error\",\"id\":\"req-1\",\"seq\":0,\"code\":\"busy\","
               "\"retryable\":true}") == LLMB_FEED_OK);
    CHECK_STR(rc.code, "busy");
    CHECK_STR(rc.message, "");
    CHECK(rc.last_error.retry_after_ms == LLMB_ABSENT && rc.last_error.retryable == 1);
    CHECK_STR(rc.backend, "");
    setup();
    CHECK(feed("{\"type\":\"error\",\"id\":\"req-1\",\"seq\":0,\"code\":\"bad_request\","
               "\"message\":\"\",\"retryable\":false}") == LLMB_FEED_OK);
    CHECK_STR(rc.code, "bad_request");
    CHECK(rc.last_error.retryable == 0);
}

TEST(long_error_message_truncated)
{
    char buf[1024], msg[400];
    size_t i;
    for (i = 0; i < 300; i++) {
        msg[i] = (char)('a' + i % 26);
    }
    msg[300] = '\0';
    setup();
    snprintf(buf, sizeof buf, "{\"type\":\"error\",\"id\":\"req-1\",\"seq\":0,\"code\":\"bad_request\","
             "\"message\":\"%s\",\"retryable\":false}", msg);
    CHECK(feed(buf) == LLMB_FEED_OK);
    CHECK(rc.last_error.message_truncated == 1);
    CHECK(rc.last_error.message_len == LLMB_TEXT_BUF - 1);
    CHECK(strncmp(rc.message, msg, LLMB_TEXT_BUF - 1) == 0);
}

TEST(reply_message)
{
    setup();
    start(0);
    CHECK(feed("{\"type\":\"reply\",\"id\":\"req-1\",\"seq\":1,\"content\":\"The answer.\","
               "\"tool_calls\":[{\"id\":\"c1\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}],"
               "\"finish_reason\":\"stop\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}")
          == LLMB_FEED_OK);
    CHECK_STR(rc.text, "The answer.");
    CHECK(rc.done == 1);
    CHECK_STR(rc.last_done.type, "reply");
    CHECK(rc.last_done.completion_tokens == 4 && rc.last_done.total_ms == LLMB_ABSENT);
    /* a reply too large for one message: chunks, then a reply without content */
    setup();
    start(0);
    chunk(1, "part one, ");
    chunk(2, "part two");
    CHECK(feed("{\"type\":\"reply\",\"id\":\"req-1\",\"seq\":3,\"finish_reason\":\"stop\"}")
          == LLMB_FEED_OK);
    CHECK_STR(rc.text, "part one, part two");
    CHECK(rc.done == 1);
}

TEST(long_text_in_pieces)
{
    /* 300 characters of 1 to 4 bytes: delivered in pieces of at most LLMB_TEXT_BUF bytes,
       each piece whole UTF-8 characters */
    static char json[4096], want[4096];
    size_t jl = 0, wl = 0, i, at;
    for (i = 0; i < 300; i++) {
        switch (i % 5) {
        case 0: json[jl++] = 'a'; want[wl++] = 'a'; break;
        case 1: memcpy(json + jl, "\xc3\xa9", 2); jl += 2; memcpy(want + wl, "\xc3\xa9", 2); wl += 2; break;
        case 2: memcpy(json + jl, "\\u20ac", 6); jl += 6; memcpy(want + wl, "\xe2\x82\xac", 3); wl += 3; break;
        case 3: memcpy(json + jl, "\xf0\x9f\x98\x80", 4); jl += 4; memcpy(want + wl, "\xf0\x9f\x98\x80", 4); wl += 4; break;
        default: memcpy(json + jl, "\\ud83d\\ude00", 12); jl += 12; memcpy(want + wl, "\xf0\x9f\x98\x80", 4); wl += 4; break;
        }
    }
    json[jl] = want[wl] = '\0';
    setup();
    start(0);
    CHECK(chunk(1, json) == LLMB_FEED_OK);
    CHECK(rc.text_len == wl);
    CHECK(memcmp(rc.text, want, wl) == 0);
    CHECK(rc.pieces > 1);
    CHECK(rc.max_piece <= LLMB_TEXT_BUF);
    /* the whole text is well-formed UTF-8 (pieces_never_split_a_character checks each piece) */
    for (at = 0; at < wl;) {
        unsigned char b = (unsigned char)rc.text[at];
        size_t n = b < 0x80 ? 1 : b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : 2;
        CHECK((b & 0xC0) != 0x80);
        at += n;
    }
}

/* pieces must each be valid UTF-8 on their own */
static int pieces_ok;
static void on_text_utf8(void *user, const char *text, size_t len)
{
    size_t at = 0;
    (void)user;
    while (at < len) {
        unsigned char b = (unsigned char)text[at];
        size_t n = b < 0x80 ? 1 : b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 0;
        size_t k;
        if (n == 0 || at + n > len) {
            pieces_ok = 0;
            return;
        }
        for (k = 1; k < n; k++) {
            if (((unsigned char)text[at + k] & 0xC0) != 0x80) {
                pieces_ok = 0;
            }
        }
        at += n;
    }
}

TEST(pieces_never_split_a_character)
{
    llmb_config cfg;
    char json[2048];
    size_t jl = 0, i;
    memset(&cfg, 0, sizeof cfg);
    cfg.client = CLIENT;
    setup_with(&cfg);
    cl.cfg.on_text = on_text_utf8;
    pieces_ok = 1;
    for (i = 0; i < 200; i++) {
        static const char *const forms[] = {"x", "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80",
                                            "\\u00e9", "\\ud83d\\ude00"};
        const char *f = forms[(i * 7 + i / 3) % 6];
        memcpy(json + jl, f, strlen(f));
        jl += strlen(f);
    }
    json[jl] = '\0';
    start(0);
    CHECK(chunk(1, json) == LLMB_FEED_OK);
    CHECK(pieces_ok == 1);
}

/* ----------------------------------------------------------------------- restarts */

TEST(replay_after_lost_terminal_is_not_a_restart)
{
    /* the bridge finished, the device missed the done, resent: the same answer again */
    setup();
    start(0);
    chunk(1, "Hello");
    chunk(2, " world");
    CHECK(start(0) == LLMB_FEED_DUPLICATE);
    CHECK(chunk(1, "Hello") == LLMB_FEED_DUPLICATE);
    CHECK(chunk(2, " world") == LLMB_FEED_DUPLICATE);
    CHECK(done_msg(3) == LLMB_FEED_OK);
    CHECK_STR(rc.text, "Hello world");
    CHECK(rc.done == 1 && rc.restarts == 0 && rc.errors == 0);
}

TEST(restart_with_other_chunks)
{
    /* a bridge that lost the request answers the resend anew, cut differently */
    setup();
    start(0);
    chunk(1, "Hel");
    chunk(2, "lo wo");
    CHECK(start(0) == LLMB_FEED_DUPLICATE);
    CHECK(progress(1) == LLMB_FEED_DUPLICATE);
    CHECK(chunk(2, "Hello") == LLMB_FEED_DUPLICATE);   /* still within the text given */
    CHECK(chunk(3, " world!") == LLMB_FEED_OK);        /* goes beyond: "rld!" is new */
    CHECK(rc.restarts == 1);
    CHECK(chunk(4, " Bye.") == LLMB_FEED_OK);
    CHECK(done_msg(5) == LLMB_FEED_OK);
    CHECK_STR(rc.text, "Hello world! Bye.");
    CHECK(rc.done == 1 && rc.errors == 0);
}

TEST(restart_ending_exactly_at_the_text_given)
{
    setup();
    start(0);
    chunk(1, "Hi");
    start(0);
    chunk(1, "H");
    chunk(2, "i");
    CHECK(done_msg(3) == LLMB_FEED_OK); /* the first answer's next seq was 2: restarted */
    CHECK_STR(rc.text, "Hi");
    CHECK(rc.done == 1 && rc.errors == 0 && rc.restarts == 1);
    setup();
    start(0);
    chunk(1, "Hi");
    progress(2);
    progress(3);
    start(0);
    chunk(1, "Hi");
    CHECK(done_msg(2) == LLMB_FEED_OK); /* ends earlier than the first answer's seq */
    CHECK(rc.restarts == 1 && rc.done == 1);
    CHECK_STR(rc.text, "Hi");
}

TEST(restart_with_other_text)
{
    setup();
    start(0);
    chunk(1, "Hello");
    start(0);
    CHECK(chunk(1, "Howdy there") == LLMB_FEED_OK);
    CHECK(rc.errors == 1);
    CHECK_STR(rc.code, "answer_changed");
    CHECK(rc.last_error.local == 1);
    CHECK_STR(rc.text, "Hello");
}

TEST(restart_shorter)
{
    setup();
    start(0);
    chunk(1, "Hello");
    start(0);
    chunk(1, "Hel");
    CHECK(done_msg(2) == LLMB_FEED_OK);
    CHECK(rc.errors == 1 && rc.done == 0);
    CHECK_STR(rc.code, "answer_changed");
}

TEST(restart_failing)
{
    setup();
    start(0);
    chunk(1, "Hello");
    start(0);
    CHECK(feed("{\"type\":\"error\",\"id\":\"req-1\",\"seq\":1,\"code\":\"busy\","
               "\"retryable\":true,\"retry_after_ms\":1000}") == LLMB_FEED_OK);
    CHECK(rc.errors == 1);
    CHECK_STR(rc.code, "busy");
    CHECK(rc.last_error.local == 0);
}

TEST(stray_copy_of_start)
{
    /* a QoS 1 copy of start arrives mid-stream; the first answer simply goes on */
    setup();
    start(0);
    chunk(1, "a");
    chunk(2, "b");
    CHECK(start(0) == LLMB_FEED_DUPLICATE);
    CHECK(chunk(3, "c") == LLMB_FEED_OK);
    CHECK(chunk(1, "a") == LLMB_FEED_DUPLICATE);
    CHECK(done_msg(4) == LLMB_FEED_OK);
    CHECK_STR(rc.text, "abc");
    CHECK(rc.done == 1 && rc.restarts == 0 && rc.errors == 0);
}

TEST(restart_before_any_text)
{
    setup();
    start(0);
    progress(1);
    CHECK(start(0) == LLMB_FEED_DUPLICATE);
    CHECK(chunk(1, "new") == LLMB_FEED_OK);
    CHECK(rc.restarts == 1);
    CHECK(done_msg(2) == LLMB_FEED_OK);
    CHECK_STR(rc.text, "new");
}

TEST(gap_inside_a_restart)
{
    setup();
    start(0);
    chunk(1, "ab");
    start(0);
    chunk(1, "a");
    chunk(2, "b");
    CHECK(chunk(4, "c") == LLMB_FEED_OK);
    CHECK(rc.errors == 1);
    CHECK_STR(rc.code, "gap");
}

/* ------------------------------------------------------------------------ timing */

TEST(resend_and_timeout)
{
    uint32_t t0 = 1000;
    setup();
    CHECK(llmb_tick(&cl, t0) == LLMB_TICK_NONE);          /* starts the clock */
    CHECK(llmb_tick(&cl, t0 + 14999) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, t0 + 15000) == LLMB_TICK_RESEND);
    CHECK(llmb_tick(&cl, t0 + 15001) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, t0 + 29999) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, t0 + 30000) == LLMB_TICK_RESEND);
    CHECK(llmb_tick(&cl, t0 + 45000) == LLMB_TICK_RESEND);
    CHECK(llmb_tick(&cl, t0 + 59999) == LLMB_TICK_NONE);  /* 3 resends in a row at most */
    CHECK(rc.errors == 0);
    CHECK(llmb_tick(&cl, t0 + 60000) == LLMB_TICK_TIMEOUT);
    CHECK(rc.errors == 1);
    CHECK_STR(rc.code, "timeout");
    CHECK(rc.last_error.local == 1);
    CHECK_MSG(rc.message, "no reply for 60 s after 3 resends; is the bridge running?");
    CHECK(!llmb_active(&cl));
    CHECK(llmb_tick(&cl, t0 + 90000) == LLMB_TICK_NONE);
}

TEST(messages_postpone_resends)
{
    uint32_t t0 = 0;
    setup();
    llmb_tick(&cl, t0);
    CHECK(llmb_tick(&cl, t0 + 15000) == LLMB_TICK_RESEND);
    start(0); /* an answer: the resends in a row start over */
    CHECK(llmb_tick(&cl, t0 + 16000) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, t0 + 30999) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, t0 + 31000) == LLMB_TICK_RESEND);
    progress(1);
    CHECK(llmb_tick(&cl, t0 + 40000) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, t0 + 55000) == LLMB_TICK_RESEND);
    CHECK(llmb_tick(&cl, t0 + 70000) == LLMB_TICK_RESEND);
    CHECK(llmb_tick(&cl, t0 + 85000) == LLMB_TICK_RESEND);
    CHECK(llmb_tick(&cl, t0 + 99999) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, t0 + 100000) == LLMB_TICK_TIMEOUT);
}

TEST(copies_count_as_heard_but_not_as_progress)
{
    setup();
    llmb_tick(&cl, 0);
    start(0);
    chunk(1, "a");
    CHECK(llmb_tick(&cl, 1000) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, 16000) == LLMB_TICK_RESEND);
    CHECK(chunk(1, "a") == LLMB_FEED_DUPLICATE);
    CHECK(llmb_tick(&cl, 17000) == LLMB_TICK_NONE);      /* heard at 17000 */
    CHECK(llmb_tick(&cl, 31999) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, 32000) == LLMB_TICK_RESEND);    /* 15 s after the copy */
}

TEST(clock_wraps)
{
    uint32_t t0 = 0xFFFFFFFFu - 5000u;
    setup();
    llmb_tick(&cl, t0);
    CHECK(llmb_tick(&cl, t0 + 14999u) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, t0 + 15000u) == LLMB_TICK_RESEND); /* past the wrap */
    start(0);
    CHECK(llmb_tick(&cl, t0 + 20000u) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, t0 + 35000u) == LLMB_TICK_RESEND);
}

TEST(configured_timing_and_no_resends)
{
    llmb_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.client = CLIENT;
    cfg.heartbeat_s = 1;
    setup_with(&cfg);
    CHECK(cl.cfg.resend_after_ms == 3000 && cl.cfg.timeout_ms == 12000);
    llmb_tick(&cl, 0);
    CHECK(llmb_tick(&cl, 3000) == LLMB_TICK_RESEND);
    memset(&cfg, 0, sizeof cfg);
    cfg.client = CLIENT;
    cfg.max_resends = -1;
    cfg.timeout_ms = 5000;
    setup_with(&cfg);
    llmb_tick(&cl, 0);
    CHECK(llmb_tick(&cl, 4999) == LLMB_TICK_NONE);
    CHECK(llmb_tick(&cl, 5000) == LLMB_TICK_TIMEOUT);
}

TEST(cancel_stops_resends)
{
    setup();
    llmb_tick(&cl, 0);
    start(0);
    chunk(1, "partial");
    CHECK(llmb_build_cancel(&cl, topic, sizeof topic, payload, sizeof payload) > 0);
    CHECK(llmb_tick(&cl, 20000) == LLMB_TICK_NONE);
    CHECK(feed("{\"type\":\"done\",\"id\":\"req-1\",\"seq\":2,\"finish_reason\":\"cancelled\","
               "\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":1}}") == LLMB_FEED_OK);
    CHECK_STR(rc.reason, "cancelled");
}

TEST(no_request_no_callbacks)
{
    llmb_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.client = CLIENT;
    cfg.on_error = on_error;
    cfg.user = &rc;
    memset(&rc, 0, sizeof rc);
    CHECK(llmb_init(&cl, &cfg) == 0);
    CHECK(!llmb_active(&cl));
    CHECK(start(0) == LLMB_FEED_OTHER);
    CHECK(llmb_tick(&cl, 100000) == LLMB_TICK_NONE);
    CHECK(llmb_build_cancel(&cl, topic, sizeof topic, payload, sizeof payload) == LLMB_ERR_ARG);
    setup();
    llmb_reset(&cl);
    CHECK(start(0) == LLMB_FEED_OTHER);
    CHECK(rc.errors == 0);
}

/* on_done may start the next request on the same client */
static int chained;
static void on_done_chain(void *user, const llmb_done *d)
{
    llmb_request r;
    (void)user;
    (void)d;
    memset(&r, 0, sizeof r);
    r.id = "req-2";
    r.prompt = "next";
    chained = llmb_build_request(&cl, &r, topic, sizeof topic, payload, sizeof payload) > 0;
}

TEST(next_request_from_on_done)
{
    setup();
    cl.cfg.on_done = on_done_chain;
    chained = 0;
    start(0);
    done_msg(1);
    CHECK(chained == 1);
    CHECK(llmb_active(&cl));
    CHECK(feed_on("llm/reply/kitchen/req-2", "{\"type\":\"start\",\"id\":\"req-2\",\"seq\":0}")
          == LLMB_FEED_OK);
}

int main(void)
{
    RUN(json_string_escapes);
    RUN(json_surrogates);
    RUN(json_bad_strings);
    RUN(json_copy_truncates_on_character_boundary);
    RUN(json_numbers);
    RUN(json_skip_values);
    RUN(json_object_members);
    RUN(request_json);
    RUN(request_temperatures);
    RUN(request_does_not_fit);
    RUN(request_arguments);
    RUN(init_arguments);
    RUN(cancel_message);
    RUN(stream_in_order);
    RUN(done_without_optional_fields);
    RUN(start_and_progress_without_fields);
    RUN(duplicates_dropped);
    RUN(gap_is_an_error);
    RUN(first_message_lost_is_a_gap);
    RUN(other_topics_and_ids_ignored);
    RUN(malformed_dropped);
    RUN(unknown_fields_and_types);
    RUN(error_with_all_fields);
    RUN(error_shrunk_to_fit);
    RUN(long_error_message_truncated);
    RUN(reply_message);
    RUN(long_text_in_pieces);
    RUN(pieces_never_split_a_character);
    RUN(replay_after_lost_terminal_is_not_a_restart);
    RUN(restart_with_other_chunks);
    RUN(restart_ending_exactly_at_the_text_given);
    RUN(restart_with_other_text);
    RUN(restart_shorter);
    RUN(restart_failing);
    RUN(stray_copy_of_start);
    RUN(restart_before_any_text);
    RUN(gap_inside_a_restart);
    RUN(resend_and_timeout);
    RUN(messages_postpone_resends);
    RUN(copies_count_as_heard_but_not_as_progress);
    RUN(clock_wraps);
    RUN(configured_timing_and_no_resends);
    RUN(cancel_stops_resends);
    RUN(no_request_no_callbacks);
    RUN(next_request_from_on_done);
    if (failures) {
        printf("%d tests, %d of %d checks FAILED\n", tests, failures, checks);
        return 1;
    }
    printf("%d tests, %d checks passed\n", tests, checks);
    return 0;
}
