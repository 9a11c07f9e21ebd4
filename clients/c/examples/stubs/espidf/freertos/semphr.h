/* Host stub of FreeRTOS semphr.h: the mutex calls examples/espidf uses. */
#ifndef LLMB_STUB_FREERTOS_SEMPHR_H
#define LLMB_STUB_FREERTOS_SEMPHR_H

#include "freertos/FreeRTOS.h"

typedef struct stub_semaphore *SemaphoreHandle_t;

SemaphoreHandle_t xSemaphoreCreateMutex(void);
BaseType_t xSemaphoreTake(SemaphoreHandle_t semaphore, TickType_t ticks);
BaseType_t xSemaphoreGive(SemaphoreHandle_t semaphore);

#endif
