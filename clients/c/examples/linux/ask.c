/*
 * ask: one question to llamacpp-mqtt-bridge from Linux, with libmosquitto.
 *
 *   ask -h HOST -p PORT -c CLIENT [-q QOS] [-m MAX_PACKET] [-i ID] [-n MAX_TOKENS]
 *       [-t TEMPERATURE] [-s SEED] [-S SESSION] [-P PREFIX] [-V 311|5] PROMPT
 *
 * -q is the QoS of the subscription and of the request (default 1); -m is sent as the
 * request's max_packet (default: not sent, libmosquitto takes packets of any size; give
 * a device's buffer size to see what that device would get); -i is the request id
 * (default: 16 random hex digits); -V the MQTT version (default 3.1.1).
 *
 * Subscribes to P/reply/CLIENT/#, publishes the request on P/request/CLIENT, writes the
 * answer's text to stdout as it arrives and exits 0 at its end. An error reply, a gap
 * or silence (after resends) is reported on stderr with the code; exit status 1 for an
 * error the bridge sent, 2 for one found here (timeout, gap, answer_changed), 3 for a
 * wrong command line, 4 when the broker cannot be reached. Ctrl-C sends a cancel (the
 * bridge then ends the answer with finish_reason "cancelled"); a second Ctrl-C quits.
 *
 * Every wait is bounded: CONNACK and SUBACK within 10 s, the answer by the client's
 * silence timeout (60 s without a message of the request, resends included).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <mosquitto.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "llm_bridge.h"

#define SETUP_TIMEOUT_MS 10000u
#define LOOP_MS 100

enum { EXIT_BRIDGE_ERROR = 1, EXIT_LOCAL_ERROR = 2, EXIT_USAGE = 3, EXIT_CONNECT = 4 };

typedef struct app {
    llmb_client llm;
    struct mosquitto *mosq;
    int qos;
    uint32_t max_packet;
    char filter[160];
    int subscribed;     /* SUBACK for the current connection */
    int sub_mid;
    int connect_rc;     /* CONNACK's code, -1 before */
    int exit_code;
    unsigned long oversized; /* messages larger than max_packet (a device would lose them) */
} app;

static volatile sig_atomic_t interrupts;

static void on_sigint(int sig)
{
    (void)sig;
    interrupts++;
}

static uint32_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

/* ------------------------------------------------------------------ llmb callbacks */

static void on_text(void *user, const char *text, size_t len)
{
    (void)user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
}

static void on_done(void *user, const llmb_done *d)
{
    app *a = (app *)user;
    if (isatty(STDOUT_FILENO)) {
        fputc('\n', stdout);
    }
    fflush(stdout);
    if (strcmp(d->finish_reason, "cancelled") == 0) {
        fprintf(stderr, "ask: cancelled\n");
    }
    a->exit_code = 0;
}

static void on_error(void *user, const llmb_error *e)
{
    app *a = (app *)user;
    fflush(stdout);
    fprintf(stderr, "ask: %s error %s%s%s%s", e->local ? "local" : "bridge", e->code,
            e->message[0] ? ": " : "", e->message, e->message_truncated ? "..." : "");
    if (e->backend_type[0]) {
        fprintf(stderr, " (backend_type %s)", e->backend_type);
    }
    if (e->retryable) {
        fprintf(stderr, " [retryable");
        if (e->retry_after_ms != LLMB_ABSENT) {
            fprintf(stderr, " after %ld ms", (long)e->retry_after_ms);
        }
        fprintf(stderr, "]");
    }
    fputc('\n', stderr);
    a->exit_code = e->local ? EXIT_LOCAL_ERROR : EXIT_BRIDGE_ERROR;
}

static void on_restart(void *user)
{
    (void)user;
    fprintf(stderr, "ask: the bridge answered the resend anew; continuing after the text "
                    "already written\n");
}

/* ------------------------------------------------------------- mosquitto callbacks */

static void on_connect(struct mosquitto *mosq, void *obj, int rc)
{
    app *a = (app *)obj;
    a->connect_rc = rc;
    a->subscribed = 0;
    if (rc == 0) {
        /* clean session: subscribe on every connection, before any request goes out */
        if (mosquitto_subscribe(mosq, &a->sub_mid, a->filter, a->qos) != MOSQ_ERR_SUCCESS) {
            fprintf(stderr, "ask: subscribe to %s failed\n", a->filter);
        }
    }
}

static void on_subscribe(struct mosquitto *mosq, void *obj, int mid, int count,
                         const int *granted)
{
    app *a = (app *)obj;
    (void)mosq;
    if (mid == a->sub_mid && count == 1 && granted[0] <= 2) {
        a->subscribed = 1;
    } else if (mid == a->sub_mid) {
        fprintf(stderr, "ask: the broker refused the subscription to %s\n", a->filter);
    }
}

/* The PUBLISH packet's size on the wire (MQTT 3.1.1; MQTT 5 adds its properties). */
static size_t packet_size(size_t topic_len, size_t payload_len, int qos)
{
    size_t rest = 2 + topic_len + (qos > 0 ? 2 : 0) + payload_len;
    size_t len_bytes = rest < 128 ? 1 : rest < 16384 ? 2 : rest < 2097152 ? 3 : 4;
    return 1 + len_bytes + rest;
}

static void on_message(struct mosquitto *mosq, void *obj, const struct mosquitto_message *m)
{
    app *a = (app *)obj;
    size_t topic_len = strlen(m->topic);
    size_t len = m->payloadlen > 0 ? (size_t)m->payloadlen : 0;
    (void)mosq;
    if (a->max_packet && packet_size(topic_len, len, m->qos) > a->max_packet) {
        a->oversized++;
        fprintf(stderr, "ask: a message of %lu bytes on %s exceeds max_packet %lu\n",
                (unsigned long)packet_size(topic_len, len, m->qos), m->topic,
                (unsigned long)a->max_packet);
    }
    llmb_feed(&a->llm, m->topic, topic_len, m->payload, len);
}

/* ------------------------------------------------------------------------ main */

static void usage(void)
{
    fprintf(stderr,
            "usage: ask -h HOST -p PORT -c CLIENT [-q QOS] [-m MAX_PACKET] [-i ID]\n"
            "           [-n MAX_TOKENS] [-t TEMPERATURE] [-s SEED] [-S SESSION]\n"
            "           [-P PREFIX] [-V 311|5] PROMPT\n");
}

/* "0.7" -> 700 (three decimals at most); -1 if not a number. */
static long parse_milli(const char *s)
{
    long whole = 0, frac = 0, scale = 100;
    const char *p = s;
    if (!*p) {
        return -1;
    }
    while (*p >= '0' && *p <= '9' && whole < 1000000) {
        whole = whole * 10 + (*p++ - '0');
    }
    if (*p == '.') {
        p++;
        while (*p >= '0' && *p <= '9') {
            frac += scale * (*p++ - '0');
            scale /= 10;
        }
    }
    return *p ? -1 : whole * 1000 + frac;
}

static int parse_long(const char *s, long min, long max, long *out)
{
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) {
        return -1;
    }
    *out = v;
    return 0;
}

static void random_id(char *out, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char raw[8];
    size_t i;
    int fd = open("/dev/urandom", O_RDONLY);
    ssize_t got = fd >= 0 ? read(fd, raw, sizeof raw) : -1;
    if (fd >= 0) {
        close(fd);
    }
    if (got != (ssize_t)sizeof raw) {
        uint64_t x = ((uint64_t)now_ms() << 20) ^ (uint64_t)getpid();
        for (i = 0; i < sizeof raw; i++, x >>= 8) {
            raw[i] = (unsigned char)x;
        }
    }
    for (i = 0; i < sizeof raw && 2 * i + 2 < n; i++) {
        out[2 * i] = hex[raw[i] >> 4];
        out[2 * i + 1] = hex[raw[i] & 15];
    }
    out[2 * i] = '\0';
}

/* Run the network until cond() holds or timeout_ms pass; 0 if it held. */
static int wait_for(app *a, int (*cond)(const app *), uint32_t timeout_ms)
{
    uint32_t t0 = now_ms();
    while (!cond(a)) {
        int rc = mosquitto_loop(a->mosq, LOOP_MS, 1);
        if (rc != MOSQ_ERR_SUCCESS && rc != MOSQ_ERR_NO_CONN && rc != MOSQ_ERR_CONN_LOST) {
            fprintf(stderr, "ask: %s\n", mosquitto_strerror(rc));
            return -1;
        }
        if (a->connect_rc > 0) {
            fprintf(stderr, "ask: connection refused: %s\n",
                    mosquitto_connack_string(a->connect_rc));
            return -1;
        }
        if (now_ms() - t0 >= timeout_ms) {
            return -1;
        }
    }
    return 0;
}

static int is_subscribed(const app *a)
{
    return a->subscribed;
}

int main(int argc, char **argv)
{
    static app a;
    static char topic[256], payload[65536];
    const char *host = NULL, *client = NULL, *prefix = NULL, *id = NULL, *session = NULL;
    char id_buf[32];
    long port = 0, qos = 1, max_packet = 0, max_tokens = 0, seed = 0, protocol = 311;
    long temp_milli = -1;
    int has_seed = 0, opt, rc, cancel_sent = 0;
    llmb_config cfg;
    llmb_request req;
    long payload_len;
    uint32_t last_reconnect = 0;
    struct sigaction sa;

    while ((opt = getopt(argc, argv, "h:p:c:q:m:i:n:t:s:S:P:V:")) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'c': client = optarg; break;
        case 'i': id = optarg; break;
        case 'S': session = optarg; break;
        case 'P': prefix = optarg; break;
        case 'p':
            if (parse_long(optarg, 1, 65535, &port)) { usage(); return EXIT_USAGE; }
            break;
        case 'q':
            if (parse_long(optarg, 0, 1, &qos)) { usage(); return EXIT_USAGE; }
            break;
        case 'm':
            if (parse_long(optarg, 0, 268435460L, &max_packet)) { usage(); return EXIT_USAGE; }
            break;
        case 'n':
            if (parse_long(optarg, 1, 1000000L, &max_tokens)) { usage(); return EXIT_USAGE; }
            break;
        case 's':
            if (parse_long(optarg, -2147483647L, 2147483647L, &seed)) { usage(); return EXIT_USAGE; }
            has_seed = 1;
            break;
        case 't':
            temp_milli = parse_milli(optarg);
            if (temp_milli < 0 || temp_milli > 2000000000L) { usage(); return EXIT_USAGE; }
            break;
        case 'V':
            if (parse_long(optarg, 5, 311, &protocol) || (protocol != 5 && protocol != 311)) {
                usage();
                return EXIT_USAGE;
            }
            break;
        default: usage(); return EXIT_USAGE;
        }
    }
    if (!host || !port || !client || optind != argc - 1) {
        usage();
        return EXIT_USAGE;
    }
    if (!id) {
        random_id(id_buf, sizeof id_buf);
        id = id_buf;
    }

    memset(&cfg, 0, sizeof cfg);
    cfg.prefix = prefix;
    cfg.client = client;
    cfg.max_packet = (uint32_t)max_packet;
    cfg.on_text = on_text;
    cfg.on_done = on_done;
    cfg.on_error = on_error;
    cfg.on_restart = on_restart;
    cfg.user = &a;
    if (llmb_init(&a.llm, &cfg) != 0) {
        fprintf(stderr, "ask: invalid client name or prefix\n");
        return EXIT_USAGE;
    }
    memset(&req, 0, sizeof req);
    req.id = id;
    req.prompt = argv[optind];
    req.session = session;
    req.max_tokens = (int32_t)max_tokens;
    req.has_temperature = temp_milli >= 0;
    req.temperature_milli = (int32_t)temp_milli;
    req.has_seed = has_seed;
    req.seed = (int32_t)seed;
    payload_len = llmb_build_request(&a.llm, &req, topic, sizeof topic, payload, sizeof payload);
    if (payload_len < 0) {
        fprintf(stderr, "ask: %s\n", payload_len == LLMB_ERR_SPACE
                ? "the prompt is too long" : "invalid id, session or prompt");
        return EXIT_USAGE;
    }
    if (llmb_reply_filter(&a.llm, a.filter, sizeof a.filter) < 0) {
        return EXIT_USAGE;
    }
    a.qos = (int)qos;
    a.max_packet = (uint32_t)max_packet;
    a.connect_rc = -1;
    a.exit_code = EXIT_LOCAL_ERROR;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    mosquitto_lib_init();
    a.mosq = mosquitto_new(NULL, true, &a);
    if (!a.mosq) {
        fprintf(stderr, "ask: out of memory\n");
        return EXIT_CONNECT;
    }
    mosquitto_int_option(a.mosq, MOSQ_OPT_PROTOCOL_VERSION,
                         protocol == 5 ? MQTT_PROTOCOL_V5 : MQTT_PROTOCOL_V311);
    /* small messages, sent at once: no Nagle delay on the request or the PUBACKs */
    mosquitto_int_option(a.mosq, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_connect_callback_set(a.mosq, on_connect);
    mosquitto_subscribe_callback_set(a.mosq, on_subscribe);
    mosquitto_message_callback_set(a.mosq, on_message);

    rc = mosquitto_connect(a.mosq, host, (int)port, 30);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "ask: cannot connect to %s:%ld: %s\n", host, port,
                rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc));
        mosquitto_destroy(a.mosq);
        mosquitto_lib_cleanup();
        return EXIT_CONNECT;
    }
    if (wait_for(&a, is_subscribed, SETUP_TIMEOUT_MS) != 0) {
        fprintf(stderr, "ask: no CONNACK/SUBACK from %s:%ld within %u s\n", host, port,
                SETUP_TIMEOUT_MS / 1000u);
        mosquitto_destroy(a.mosq);
        mosquitto_lib_cleanup();
        return EXIT_CONNECT;
    }

    mosquitto_publish(a.mosq, NULL, topic, (int)payload_len, payload, a.qos, false);
    llmb_tick(&a.llm, now_ms()); /* the clock starts with the publish */

    while (llmb_active(&a.llm)) {
        rc = mosquitto_loop(a.mosq, LOOP_MS, 1);
        if (rc != MOSQ_ERR_SUCCESS && now_ms() - last_reconnect >= 1000u) {
            /* the connection broke: reconnect (on_connect subscribes again); what was
               lost meanwhile shows as a gap or as silence, which resends cover */
            last_reconnect = now_ms();
            mosquitto_reconnect(a.mosq);
        }
        if (interrupts == 1 && !cancel_sent) {
            char ctopic[256], cpayload[128];
            long n = llmb_build_cancel(&a.llm, ctopic, sizeof ctopic, cpayload, sizeof cpayload);
            if (n > 0) {
                mosquitto_publish(a.mosq, NULL, ctopic, (int)n, cpayload, a.qos, false);
            }
            cancel_sent = 1;
        } else if (interrupts > 1) {
            fprintf(stderr, "ask: interrupted\n");
            a.exit_code = EXIT_LOCAL_ERROR;
            break;
        }
        if (llmb_tick(&a.llm, now_ms()) == LLMB_TICK_RESEND) {
            fprintf(stderr, "ask: no message for a while; sending the request again\n");
            mosquitto_publish(a.mosq, NULL, topic, (int)payload_len, payload, a.qos, false);
        }
    }
    if (a.oversized) {
        fprintf(stderr, "ask: %lu messages exceeded max_packet %lu\n", a.oversized,
                (unsigned long)a.max_packet);
    }
    mosquitto_disconnect(a.mosq);
    mosquitto_loop(a.mosq, LOOP_MS, 1);
    mosquitto_destroy(a.mosq);
    mosquitto_lib_cleanup();
    return a.exit_code;
}
