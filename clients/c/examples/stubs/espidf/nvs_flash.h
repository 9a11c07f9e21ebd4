/* Host stub of ESP-IDF's nvs_flash.h: only what examples/espidf uses. */
#ifndef LLMB_STUB_NVS_FLASH_H
#define LLMB_STUB_NVS_FLASH_H

#include "esp_err.h"

esp_err_t nvs_flash_init(void);

#endif
