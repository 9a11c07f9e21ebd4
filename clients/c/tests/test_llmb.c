/*
 * Unit tests of the C client (src/), run under AddressSanitizer and
 * UndefinedBehaviorSanitizer (make test): this file is the harness (test_harness.h) and
 * main; the tests are in test_json.c, test_request.c, test_reply.c, test_restart.c and
 * test_tick.c. Every payload is fed from a heap block of exactly its length, so reading
 * one byte past it is an ASan error.
 * Prints "N tests, M checks passed" (or the failures) and exits non-zero on a failure.
 */
#include "test_harness.h"

int checks, failures, tests;
const char *current = "";

int same_message(const char *got, const char *want)
{
    size_t n = strlen(want);
    if (n > LLMB_TEXT_BUF - 1) {
        n = LLMB_TEXT_BUF - 1;
    }
    return strlen(got) == n && strncmp(got, want, n) == 0;
}

/* ------------------------------------------------------------------------- recorder */

void on_text(void *user, const char *text, size_t len)
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

void on_done(void *user, const llmb_done *d)
{
    rec *r = (rec *)user;
    r->done++;
    r->last_done = *d;
    snprintf(r->reason, sizeof r->reason, "%s", d->finish_reason);
    r->last_done.finish_reason = r->reason;
}

void on_error(void *user, const llmb_error *e)
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

void on_restart(void *user)
{
    ((rec *)user)->restarts++;
}

llmb_client cl;
rec rc;
char topic[256], payload[1024];
long payload_len;

void setup_with(const llmb_config *extra)
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

void setup(void)
{
    setup_with(NULL);
}

/* Feed s (strlen) on topic t from a heap block of exactly its length. */
int feed_on(const char *t, const char *s)
{
    size_t n = strlen(s);
    char *p = (char *)malloc(n ? n : 1);
    int r;
    memcpy(p, s, n);
    r = llmb_feed(&cl, t, strlen(t), p, n);
    free(p);
    return r;
}

int feed(const char *s)
{
    return feed_on(REPLY, s);
}

/* A chunk message of the test request. */
int chunk(unsigned seq, const char *json_text)
{
    char buf[2048];
    snprintf(buf, sizeof buf, "{\"id\":\"" ID "\",\"seq\":%u,\"type\":\"chunk\",\"text\":\"%s\"}",
             seq, json_text);
    return feed(buf);
}

int start(unsigned seq)
{
    char buf[128];
    snprintf(buf, sizeof buf, "{\"type\":\"start\",\"id\":\"" ID "\",\"seq\":%u,\"queue\":0}", seq);
    return feed(buf);
}

int done_msg(unsigned seq)
{
    char buf[128];
    snprintf(buf, sizeof buf, "{\"type\":\"done\",\"id\":\"" ID "\",\"seq\":%u,"
             "\"finish_reason\":\"stop\"}", seq);
    return feed(buf);
}

int progress(unsigned seq)
{
    char buf[128];
    snprintf(buf, sizeof buf, "{\"type\":\"progress\",\"id\":\"" ID "\",\"seq\":%u}", seq);
    return feed(buf);
}

int main(void)
{
    run_json_tests();
    run_request_tests();
    run_reply_tests();
    run_restart_tests();
    run_tick_tests();
    if (failures) {
        printf("%d tests, %d of %d checks FAILED\n", tests, failures, checks);
        return 1;
    }
    printf("%d tests, %d checks passed\n", tests, checks);
    return 0;
}
