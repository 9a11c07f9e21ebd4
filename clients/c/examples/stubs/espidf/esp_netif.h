/* Host stub of ESP-IDF's esp_netif.h: only what examples/espidf uses. */
#ifndef LLMB_STUB_ESP_NETIF_H
#define LLMB_STUB_ESP_NETIF_H

#include "esp_err.h"

esp_err_t esp_netif_init(void);

#endif
