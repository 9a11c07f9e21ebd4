/* Host stub of ESP-IDF's esp_event.h: only what examples/espidf uses. */
#ifndef LLMB_STUB_ESP_EVENT_H
#define LLMB_STUB_ESP_EVENT_H

#include <stdint.h>

#include "esp_err.h"

typedef const char *esp_event_base_t;
typedef void (*esp_event_handler_t)(void *event_handler_arg, esp_event_base_t event_base,
                                    int32_t event_id, void *event_data);

#define ESP_EVENT_ANY_ID -1

esp_err_t esp_event_loop_create_default(void);

#endif
