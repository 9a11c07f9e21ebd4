/* Host stub of FreeRTOS task.h: only what examples/espidf uses. */
#ifndef LLMB_STUB_FREERTOS_TASK_H
#define LLMB_STUB_FREERTOS_TASK_H

#include "freertos/FreeRTOS.h"

void vTaskDelay(const TickType_t ticks);

#endif
