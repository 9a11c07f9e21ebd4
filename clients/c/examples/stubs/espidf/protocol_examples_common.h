/* Host stub of ESP-IDF's protocol_examples_common (Wi-Fi/Ethernet set-up of the examples). */
#ifndef LLMB_STUB_PROTOCOL_EXAMPLES_COMMON_H
#define LLMB_STUB_PROTOCOL_EXAMPLES_COMMON_H

#include "esp_err.h"

esp_err_t example_connect(void);

#endif
