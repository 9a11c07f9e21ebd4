/* Host stub of ESP-IDF's esp_err.h: only what examples/espidf uses. */
#ifndef LLMB_STUB_ESP_ERR_H
#define LLMB_STUB_ESP_ERR_H

#include <stdio.h>
#include <stdlib.h>

typedef int esp_err_t;

#define ESP_OK 0
#define ESP_FAIL -1

#define ESP_ERROR_CHECK(x)                                                             \
    do {                                                                               \
        esp_err_t err_rc_ = (x);                                                       \
        if (err_rc_ != ESP_OK) {                                                       \
            fprintf(stderr, "ESP_ERROR_CHECK failed: %d at %s:%d\n", err_rc_, __FILE__,  \
                    __LINE__);                                                         \
            abort();                                                                   \
        }                                                                              \
    } while (0)

#endif
