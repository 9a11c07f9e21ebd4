/* Host stub of ESP-IDF's esp_timer.h: only what examples/espidf uses. */
#ifndef LLMB_STUB_ESP_TIMER_H
#define LLMB_STUB_ESP_TIMER_H

#include <stdint.h>

int64_t esp_timer_get_time(void); /* microseconds since boot */

#endif
