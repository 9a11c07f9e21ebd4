/*
 * Unit tests of llmb_reply.c: an answer from seq 0 again (a replay, a stray copy, or
 * a restarted answer compared by hash with the text given).
 */
#include "test_harness.h"

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

void run_restart_tests(void)
{
    RUN(replay_after_lost_terminal_is_not_a_restart);
    RUN(restart_with_other_chunks);
    RUN(restart_ending_exactly_at_the_text_given);
    RUN(restart_with_other_text);
    RUN(restart_shorter);
    RUN(restart_failing);
    RUN(stray_copy_of_start);
    RUN(restart_before_any_text);
    RUN(gap_inside_a_restart);
}
