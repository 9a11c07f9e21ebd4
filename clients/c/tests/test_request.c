/*
 * Unit tests of llm_bridge.c and llmb_request.c: set-up, the request, the cancel,
 * the topics; the client without a request, and the next request built from on_done.
 */
#include "test_harness.h"

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

void run_request_tests(void)
{
    RUN(request_json);
    RUN(request_temperatures);
    RUN(request_does_not_fit);
    RUN(request_arguments);
    RUN(init_arguments);
    RUN(cancel_message);
    RUN(no_request_no_callbacks);
    RUN(next_request_from_on_done);
}
