/* llm_bridge: see llm_bridge.h. The client's set-up and state; the rest is in the llmb_*.c
   files listed in llmb_internal.h. No malloc, no stdio; <string.h> for memset/strlen. */
#include "llm_bridge.h"

#include <string.h>

#include "llmb_internal.h"

#define DEFAULT_PREFIX "llm"
#define DEFAULT_HEARTBEAT_S 5u
#define DEFAULT_MAX_RESENDS 3
#define MAX_DELAY_MS 0x7FFFFFFFul /* wrap-safe comparisons of a 32-bit clock reach this far */

static int id_char(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9')
           || ch == '_' || ch == '.' || ch == '-';
}

size_t llmb_id_len(const char *s)
{
    size_t n = 0;
    if (!s) {
        return 0;
    }
    while (s[n] && n <= LLMB_ID_MAX) {
        if (!id_char(s[n])) {
            return 0;
        }
        n++;
    }
    return n <= LLMB_ID_MAX ? n : 0;
}

static uint32_t clamp_ms(uint64_t ms)
{
    return ms > MAX_DELAY_MS ? (uint32_t)MAX_DELAY_MS : (uint32_t)ms;
}

int llmb_init(llmb_client *c, const llmb_config *cfg)
{
    size_t i;
    if (!c || !cfg) {
        return LLMB_ERR_ARG;
    }
    memset(c, 0, sizeof *c);
    c->cfg = *cfg;
    if (!c->cfg.prefix) {
        c->cfg.prefix = DEFAULT_PREFIX;
    }
    c->prefix_len = strlen(c->cfg.prefix);
    if (c->prefix_len == 0 || c->prefix_len > LLMB_PREFIX_MAX) {
        return LLMB_ERR_ARG;
    }
    for (i = 0; i < c->prefix_len; i++) {
        if (c->cfg.prefix[i] == '+' || c->cfg.prefix[i] == '#') {
            return LLMB_ERR_ARG;
        }
    }
    c->client_len = llmb_id_len(c->cfg.client);
    if (c->client_len == 0 || c->client_len > LLMB_NAME_MAX || c->cfg.client[0] == '_'
        || c->cfg.client[0] == '.' || c->cfg.client[0] == '-') {
        return LLMB_ERR_ARG;
    }
    if (c->cfg.heartbeat_s == 0) {
        c->cfg.heartbeat_s = DEFAULT_HEARTBEAT_S;
    }
    if (c->cfg.resend_after_ms == 0) {
        c->cfg.resend_after_ms = clamp_ms(3000ull * c->cfg.heartbeat_s);
    }
    c->cfg.resend_after_ms = clamp_ms(c->cfg.resend_after_ms);
    if (c->cfg.max_resends == 0) {
        c->cfg.max_resends = DEFAULT_MAX_RESENDS;
    } else if (c->cfg.max_resends < 0) {
        c->cfg.max_resends = 0;
    } else if (c->cfg.max_resends > 255) {
        c->cfg.max_resends = 255;
    }
    if (c->cfg.timeout_ms == 0) {
        c->cfg.timeout_ms = clamp_ms((uint64_t)c->cfg.resend_after_ms
                                     * (uint64_t)(c->cfg.max_resends + 1));
    }
    c->cfg.timeout_ms = clamp_ms(c->cfg.timeout_ms);
    c->state = LLMB_IDLE;
    return 0;
}

int llmb_active(const llmb_client *c)
{
    return c && c->state == LLMB_ACTIVE;
}

void llmb_reset(llmb_client *c)
{
    if (c) {
        c->state = LLMB_IDLE;
        c->id_len = 0;
        c->id[0] = '\0';
    }
}
