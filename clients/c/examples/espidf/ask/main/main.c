/*
 * ask: one question to llamacpp-mqtt-bridge from ESP-IDF (v5) with esp-mqtt; the answer
 * is printed on the console as it arrives.
 *
 * Set BROKER_URI and DEVICE below (Wi-Fi via `idf.py menuconfig`, "Example Connection
 * Configuration"), then `idf.py build flash monitor` in examples/espidf/ask.
 *
 * esp-mqtt reads each packet into a buffer of buffer.size bytes (1024 by default) and
 * hands a longer message over in pieces (several MQTT_EVENT_DATA with current_data_offset
 * and total_data_len; only the first carries the topic). The request says max_packet =
 * that buffer size, so the bridge keeps every reply packet within it and messages arrive
 * whole; the handler below still puts pieces back together, for a broker or bridge that
 * does not keep to it. esp-mqtt calls the handler from its own task: llmb_feed() and
 * llmb_tick() are called under one mutex.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "esp_err.h"
#include "esp_event.h"
#include "esp_log.h"
#include "esp_netif.h"
#include "esp_timer.h"
#include "freertos/FreeRTOS.h"
#include "freertos/semphr.h"
#include "freertos/task.h"
#include "mqtt_client.h"
#include "nvs_flash.h"
#include "protocol_examples_common.h"

#include "llm_bridge.h"

#define BROKER_URI "mqtt://192.168.1.10:1883"
#define DEVICE "esp-kitchen"
#define MQTT_BUFFER 1024 /* esp-mqtt's default buffer.size, set explicitly */
#define QUESTION "Why is the sky blue? Answer in one sentence."
#define SETUP_TIMEOUT_MS 10000

static const char *TAG = "llm_ask";

static llmb_client llm;
static SemaphoreHandle_t llm_lock;
static volatile int subscribed;
static char reply_filter[96];

/* a message being put back together from esp-mqtt's pieces */
static char rx_topic[160];
static size_t rx_topic_len;
static char rx_data[MQTT_BUFFER];
static int rx_total, rx_got, rx_taking;

static uint32_t now_ms(void)
{
    return (uint32_t)(esp_timer_get_time() / 1000);
}

static void on_text(void *user, const char *text, size_t len)
{
    (void)user;
    printf("%.*s", (int)len, text);
    fflush(stdout);
}

static void on_done(void *user, const llmb_done *d)
{
    (void)user;
    printf("\n");
    ESP_LOGI(TAG, "done: %s, %ld tokens", d->finish_reason, (long)d->completion_tokens);
}

static void on_error(void *user, const llmb_error *e)
{
    (void)user;
    printf("\n");
    ESP_LOGE(TAG, "error %s%s%s%s", e->code, e->message[0] ? ": " : "", e->message,
             e->retryable ? " (retryable)" : "");
}

static void on_data(const esp_mqtt_event_t *ev)
{
    if (ev->current_data_offset == 0) {
        rx_taking = ev->topic_len > 0 && (size_t)ev->topic_len <= sizeof rx_topic
                    && ev->total_data_len >= 0 && ev->total_data_len <= (int)sizeof rx_data;
        if (!rx_taking) {
            ESP_LOGW(TAG, "dropped a message of %d bytes", ev->total_data_len);
            return;
        }
        memcpy(rx_topic, ev->topic, (size_t)ev->topic_len);
        rx_topic_len = (size_t)ev->topic_len;
        rx_total = ev->total_data_len;
        rx_got = 0;
    }
    if (!rx_taking) {
        return;
    }
    if (ev->current_data_offset != rx_got || ev->total_data_len != rx_total
        || ev->data_len < 0 || ev->data_len > rx_total - rx_got) {
        rx_taking = 0; /* out of order: drop it; the seq check will tell */
        return;
    }
    memcpy(rx_data + rx_got, ev->data, (size_t)ev->data_len);
    rx_got += ev->data_len;
    if (rx_got == rx_total) {
        rx_taking = 0;
        xSemaphoreTake(llm_lock, portMAX_DELAY);
        llmb_feed(&llm, rx_topic, rx_topic_len, rx_data, (size_t)rx_total);
        xSemaphoreGive(llm_lock);
    }
}

static void mqtt_event(void *arg, esp_event_base_t base, int32_t event_id, void *event_data)
{
    esp_mqtt_event_handle_t ev = event_data;
    (void)arg;
    (void)base;
    switch ((esp_mqtt_event_id_t)event_id) {
    case MQTT_EVENT_CONNECTED:
        subscribed = 0;
        esp_mqtt_client_subscribe(ev->client, reply_filter, 1); /* before any request */
        break;
    case MQTT_EVENT_SUBSCRIBED:
        subscribed = 1;
        break;
    case MQTT_EVENT_DISCONNECTED:
        subscribed = 0;
        rx_taking = 0;
        break;
    case MQTT_EVENT_DATA:
        on_data(ev);
        break;
    default:
        break;
    }
}

void app_main(void)
{
    static char topic[96], payload[512];
    llmb_config cfg;
    llmb_request req;
    long len;
    int waited, tick, active;
    esp_mqtt_client_handle_t mqtt;
    esp_mqtt_client_config_t mqtt_cfg = {
        .broker.address.uri = BROKER_URI,
        .credentials.client_id = DEVICE,
        .buffer.size = MQTT_BUFFER,
    };

    ESP_ERROR_CHECK(nvs_flash_init());
    ESP_ERROR_CHECK(esp_netif_init());
    ESP_ERROR_CHECK(esp_event_loop_create_default());
    ESP_ERROR_CHECK(example_connect());
    llm_lock = xSemaphoreCreateMutex();

    memset(&cfg, 0, sizeof cfg);
    cfg.client = DEVICE;
    cfg.max_packet = MQTT_BUFFER;
    cfg.on_text = on_text;
    cfg.on_done = on_done;
    cfg.on_error = on_error;
    if (llmb_init(&llm, &cfg) != 0
        || llmb_reply_filter(&llm, reply_filter, sizeof reply_filter) < 0) {
        ESP_LOGE(TAG, "invalid device name");
        return;
    }

    mqtt = esp_mqtt_client_init(&mqtt_cfg);
    esp_mqtt_client_register_event(mqtt, ESP_EVENT_ANY_ID, mqtt_event, NULL);
    esp_mqtt_client_start(mqtt);
    for (waited = 0; !subscribed && waited < SETUP_TIMEOUT_MS; waited += 100) {
        vTaskDelay(pdMS_TO_TICKS(100));
    }
    if (!subscribed) {
        ESP_LOGE(TAG, "no connection to %s within %d s", BROKER_URI, SETUP_TIMEOUT_MS / 1000);
        return;
    }

    memset(&req, 0, sizeof req);
    req.id = "esp-q1"; /* unique per question in a real device (a counter in NVS) */
    req.prompt = QUESTION;
    req.max_tokens = 64;
    req.has_temperature = 1;
    req.temperature_milli = 0;
    req.has_seed = 1;
    req.seed = 42;
    xSemaphoreTake(llm_lock, portMAX_DELAY);
    len = llmb_build_request(&llm, &req, topic, sizeof topic, payload, sizeof payload);
    xSemaphoreGive(llm_lock);
    if (len < 0) {
        ESP_LOGE(TAG, "the request does not fit its buffer");
        return;
    }
    esp_mqtt_client_publish(mqtt, topic, payload, (int)len, 1, 0);
    do {
        xSemaphoreTake(llm_lock, portMAX_DELAY);
        tick = llmb_tick(&llm, now_ms());
        active = llmb_active(&llm);
        xSemaphoreGive(llm_lock);
        if (tick == LLMB_TICK_RESEND) {
            ESP_LOGW(TAG, "silence: sending the request again");
            esp_mqtt_client_publish(mqtt, topic, payload, (int)len, 1, 0);
        }
        if (active) {
            vTaskDelay(pdMS_TO_TICKS(100));
        }
    } while (active);
    ESP_LOGI(TAG, "finished");
}
