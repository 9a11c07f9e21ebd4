/*
 * The memory the C client needs (make sizes): its static structures and the buffers a
 * device should give it. The code size is printed by `size` after this.
 */
#include <stdio.h>

#include "llm_bridge.h"

int main(void)
{
    /* the longest request topic: P/request/{client} with a 64-character name, "llm" */
    unsigned topic = 3 + 9 + LLMB_NAME_MAX + 1;
    /* a request without the prompt: id, max_tokens, temperature, seed, session,
       max_packet and the JSON around them, as written by llmb_build_request */
    unsigned request_overhead = 80 + LLMB_ID_MAX + 2 * LLMB_ID_MAX;
    printf("LLMB_TEXT_BUF           %u\n", (unsigned)LLMB_TEXT_BUF);
    printf("sizeof(llmb_client)     %lu\n", (unsigned long)sizeof(llmb_client));
    printf("sizeof(llmb_config)     %lu\n", (unsigned long)sizeof(llmb_config));
    printf("sizeof(llmb_request)    %lu\n", (unsigned long)sizeof(llmb_request));
    printf("sizeof(llmb_done)       %lu\n", (unsigned long)sizeof(llmb_done));
    printf("sizeof(llmb_error)      %lu\n", (unsigned long)sizeof(llmb_error));
    printf("request topic buffer    %u (64-character client name, prefix \"llm\", NUL)\n",
           topic);
    printf("request payload buffer  %u + the prompt's JSON-escaped length (up to 6x for "
           "control characters)\n", request_overhead);
    printf("reply filter buffer     %u\n", 3 + 7 + LLMB_NAME_MAX + 2 + 1);
    return 0;
}
