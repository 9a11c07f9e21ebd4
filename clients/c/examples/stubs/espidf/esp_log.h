/* Host stub of ESP-IDF's esp_log.h: the ESP_LOGx macros, printf-checked. */
#ifndef LLMB_STUB_ESP_LOG_H
#define LLMB_STUB_ESP_LOG_H

void esp_log_stub(char level, const char *tag, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

#define ESP_LOGE(tag, format, ...) esp_log_stub('E', tag, format, ##__VA_ARGS__)
#define ESP_LOGW(tag, format, ...) esp_log_stub('W', tag, format, ##__VA_ARGS__)
#define ESP_LOGI(tag, format, ...) esp_log_stub('I', tag, format, ##__VA_ARGS__)

#endif
