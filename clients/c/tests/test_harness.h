/*
 * The unit tests' harness (tests/test_*.c, make test): CHECK and its counters, and a
 * client following the request ID of CLIENT with a recorder of its callbacks. Each
 * test_*.c file has run_*_tests(); test_llmb.c runs them all and prints the count.
 */
#ifndef TEST_HARNESS_H
#define TEST_HARNESS_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llm_bridge.h"
#include "llmb_json.h"

extern int checks, failures, tests;
extern const char *current; /* the test running */

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
int same_message(const char *got, const char *want);

#define CHECK_MSG(got, want) CHECK(same_message((got), (want)))

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

void on_text(void *user, const char *text, size_t len);
void on_done(void *user, const llmb_done *d);
void on_error(void *user, const llmb_error *e);
void on_restart(void *user);

extern llmb_client cl;
extern rec rc;
extern char topic[256], payload[1024];
extern long payload_len;

#define CLIENT "kitchen"
#define ID "req-1"
#define REPLY "llm/reply/" CLIENT "/" ID

/* A client for CLIENT (extra: its config, else max_packet 256) recording into rc, with
   the request ID built into topic and payload. */
void setup_with(const llmb_config *extra);
void setup(void);

/* Feed s (strlen) on topic t from a heap block of exactly its length. */
int feed_on(const char *t, const char *s);
/* ... on REPLY */
int feed(const char *s);
/* Messages of the request ID: json_text is the JSON-escaped text. */
int chunk(unsigned seq, const char *json_text);
int start(unsigned seq);
int done_msg(unsigned seq);
int progress(unsigned seq);

/* the tests, one function per file */
void run_json_tests(void);
void run_request_tests(void);
void run_reply_tests(void);
void run_restart_tests(void);
void run_tick_tests(void);

#endif /* TEST_HARNESS_H */
