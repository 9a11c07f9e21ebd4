/*
 * sizeof of the client's structures on a cross-compiled target (make sizes-mcu), where
 * nothing can be run: each is the size of an array, read back with nm -S.
 */
#include "llm_bridge.h"

char sizeof_llmb_client[sizeof(llmb_client)];
char sizeof_llmb_config[sizeof(llmb_config)];
char sizeof_llmb_request[sizeof(llmb_request)];
