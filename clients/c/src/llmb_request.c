/* llmb_request: the request, the cancel, and the topics (llm_bridge.h). <string.h> for
   memcpy/strlen. */
#include <string.h>

#include "llmb_internal.h"

static void put_prefix_topic(llmb_out *o, const llmb_client *c, const char *kind)
{
    llmb_put(o, c->cfg.prefix, c->prefix_len);
    llmb_puts(o, kind);
    llmb_put(o, c->cfg.client, c->client_len);
}

long llmb_build_request(llmb_client *c, const llmb_request *r, char *topic, size_t topic_cap,
                        char *payload, size_t payload_cap)
{
    llmb_out t, o;
    size_t n, plen;
    long tlen, len;
    if (!c || !r || !r->prompt || !topic || !payload || c->client_len == 0) {
        return LLMB_ERR_ARG;
    }
    n = llmb_id_len(r->id);
    if (n == 0 || (r->session && !llmb_id_len(r->session))
        || (r->profile && !llmb_id_len(r->profile))) {
        return LLMB_ERR_ARG;
    }
    llmb_out_init(&t, topic, topic_cap);
    put_prefix_topic(&t, c, "/request/");
    tlen = llmb_out_end(&t);

    plen = r->prompt_len ? r->prompt_len : strlen(r->prompt);
    llmb_out_init(&o, payload, payload_cap);
    llmb_puts(&o, "{\"id\":");
    llmb_put_json_str(&o, r->id, n);
    if (r->plain_completion) {
        llmb_puts(&o, ",\"prompt\":");
        llmb_put_json_str(&o, r->prompt, plen);
    } else {
        llmb_puts(&o, ",\"messages\":[{\"role\":\"user\",\"content\":");
        llmb_put_json_str(&o, r->prompt, plen);
        llmb_puts(&o, "}]");
    }
    if (r->session) {
        llmb_puts(&o, ",\"session\":");
        llmb_put_json_str(&o, r->session, strlen(r->session));
    }
    if (r->profile) {
        llmb_puts(&o, ",\"profile\":");
        llmb_put_json_str(&o, r->profile, strlen(r->profile));
    }
    if (r->max_tokens > 0) {
        llmb_puts(&o, ",\"max_tokens\":");
        llmb_put_int(&o, r->max_tokens);
    }
    if (r->has_temperature) {
        llmb_puts(&o, ",\"temperature\":");
        llmb_put_milli(&o, r->temperature_milli);
    }
    if (r->has_seed) {
        llmb_puts(&o, ",\"seed\":");
        llmb_put_int(&o, r->seed);
    }
    if (r->chunk_bytes > 0) {
        llmb_puts(&o, ",\"chunk_bytes\":");
        llmb_put_uint(&o, r->chunk_bytes);
    }
    if (c->cfg.max_packet > 0) {
        llmb_puts(&o, ",\"max_packet\":");
        llmb_put_uint(&o, c->cfg.max_packet);
    }
    llmb_puts(&o, "}");
    len = llmb_out_end(&o);
    if (tlen < 0 || len < 0) {
        return LLMB_ERR_SPACE;
    }

    memcpy(c->id, r->id, n);
    c->id[n] = '\0';
    c->id_len = n;
    c->state = LLMB_ACTIVE;
    c->clock = c->heard = c->cancelled = c->has_resent = 0;
    c->rerun = c->rerun_matched = 0;
    c->resends_in_row = 0;
    c->expected = c->resends = 0;
    c->heard_at = c->resent_at = 0;
    c->text_len = 0;
    c->text_hash = FNV_INIT;
    c->rerun_seq = c->rerun_len = 0;
    c->rerun_hash = FNV_INIT;
    return len;
}

long llmb_build_cancel(llmb_client *c, char *topic, size_t topic_cap, char *payload,
                       size_t payload_cap)
{
    llmb_out t, o;
    long tlen, len;
    if (!c || !topic || !payload || c->state == LLMB_IDLE || c->id_len == 0) {
        return LLMB_ERR_ARG;
    }
    llmb_out_init(&t, topic, topic_cap);
    put_prefix_topic(&t, c, "/cancel/");
    tlen = llmb_out_end(&t);
    llmb_out_init(&o, payload, payload_cap);
    llmb_puts(&o, "{\"id\":");
    llmb_put_json_str(&o, c->id, c->id_len);
    llmb_puts(&o, "}");
    len = llmb_out_end(&o);
    if (tlen < 0 || len < 0) {
        return LLMB_ERR_SPACE;
    }
    c->cancelled = 1;
    return len;
}

long llmb_reply_filter(const llmb_client *c, char *buf, size_t cap)
{
    llmb_out o;
    if (!c || c->client_len == 0) {
        return LLMB_ERR_ARG;
    }
    llmb_out_init(&o, buf, cap);
    put_prefix_topic(&o, c, "/reply/");
    llmb_puts(&o, "/#");
    return llmb_out_end(&o);
}

long llmb_reply_topic(const llmb_client *c, char *buf, size_t cap)
{
    llmb_out o;
    if (!c || c->client_len == 0 || c->id_len == 0) {
        return LLMB_ERR_ARG;
    }
    llmb_out_init(&o, buf, cap);
    put_prefix_topic(&o, c, "/reply/");
    llmb_puts(&o, "/");
    llmb_put(&o, c->id, c->id_len);
    return llmb_out_end(&o);
}
