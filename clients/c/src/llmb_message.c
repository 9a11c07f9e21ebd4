/* llmb_message: one reply message's JSON scanned into an llmb_msg (llmb_internal.h).
   <string.h> for memset. */
#include <string.h>

#include "llmb_internal.h"

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

int llmb_parse_message(const void *payload, size_t len, llmb_msg *m)
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
