/*
 * Unit tests of llmb_tick.c: resends after silence, the timeout, the clock wrapping.
 */
#include "test_harness.h"

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

void run_tick_tests(void)
{
    RUN(resend_and_timeout);
    RUN(messages_postpone_resends);
    RUN(copies_count_as_heard_but_not_as_progress);
    RUN(clock_wraps);
    RUN(configured_timing_and_no_resends);
    RUN(cancel_stops_resends);
}
