/*
 * Unit tests of llmb_feed (llmb_message.c, llmb_reply.c): messages in order, optional
 * fields missing, copies, gaps, other topics, malformed payloads, errors, text in pieces.
 */
#include "test_harness.h"

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

void run_reply_tests(void)
{
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
}
