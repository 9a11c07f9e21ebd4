/* llmb_tick: silence, the request resent after resend_after_ms and given up after
   timeout_ms (llm_bridge.h). */
#include "llmb_internal.h"

int llmb_tick(llmb_client *c, uint32_t now_ms)
{
    uint32_t quiet;
    llmb_out o;
    if (!c || c->state != LLMB_ACTIVE) {
        return LLMB_TICK_NONE;
    }
    if (!c->clock || c->heard) {
        c->clock = 1;
        c->heard = 0;
        c->heard_at = now_ms;
    }
    quiet = now_ms - c->heard_at;
    if (quiet >= c->cfg.timeout_ms) {
        llmb_out_init(&o, c->buf, sizeof c->buf);
        llmb_puts(&o, "no reply for ");
        llmb_put_uint(&o, quiet / 1000u);
        llmb_puts(&o, " s after ");
        llmb_put_uint(&o, c->resends);
        llmb_puts(&o, " resends; is the bridge running?");
        llmb_finish_local(c, "timeout", 1, &o);
        return LLMB_TICK_TIMEOUT;
    }
    if (c->cancelled || c->resends_in_row >= c->cfg.max_resends) {
        return LLMB_TICK_NONE;
    }
    if (c->has_resent && now_ms - c->resent_at < quiet) {
        quiet = now_ms - c->resent_at;
    }
    if (quiet < c->cfg.resend_after_ms) {
        return LLMB_TICK_NONE;
    }
    c->resends_in_row++;
    c->resends++;
    c->has_resent = 1;
    c->resent_at = now_ms;
    return LLMB_TICK_RESEND;
}
