/*
 * A host run of the ESP-IDF example: fakes of the stubbed APIs and a main() that calls
 * app_main(). The fake esp-mqtt answers the request the example publishes with canned
 * reply messages (one twice, as QoS 1 may), from vTaskDelay() (where the real client's
 * own task would run). It hands every message longer than STUB_PIECE bytes over in
 * pieces, as esp-mqtt does with a message longer than its buffer, so that the example's
 * reassembly runs. Exits 0 when the example logged the end of the answer.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

#define STUB_PIECE 64
#define MAX_DELAYS 2000

void app_main(void);

struct esp_mqtt_client {
    esp_mqtt_client_config_t cfg;
    esp_event_handler_t handler;
    void *handler_arg;
    int started, connected, subscribed;
    char filter[128];
};

struct stub_semaphore {
    int taken;
};

static struct esp_mqtt_client the_client;
static struct stub_semaphore the_mutex;
static int64_t clock_us = 1000000;
static int delays, done_logged, failures;
static char replies[8][512], reply_topic[128];
static int replies_queued, replies_sent;

void esp_log_stub(char level, const char *tag, const char *format, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, format);
    vsnprintf(line, sizeof line, format, ap);
    va_end(ap);
    fprintf(stderr, "%c (%s) %s\n", level, tag, line);
    if (strcmp(line, "done: stop, 20 tokens") == 0) {
        done_logged = 1;
    }
}

esp_err_t esp_event_loop_create_default(void) { return ESP_OK; }
esp_err_t esp_netif_init(void) { return ESP_OK; }
esp_err_t nvs_flash_init(void) { return ESP_OK; }
esp_err_t example_connect(void) { return ESP_OK; }
int64_t esp_timer_get_time(void) { return clock_us; }

SemaphoreHandle_t xSemaphoreCreateMutex(void)
{
    return &the_mutex;
}

BaseType_t xSemaphoreTake(SemaphoreHandle_t s, TickType_t ticks)
{
    (void)ticks;
    if (s->taken) {
        fprintf(stderr, "stub: mutex taken twice\n");
        failures++;
    }
    s->taken = 1;
    return 1;
}

BaseType_t xSemaphoreGive(SemaphoreHandle_t s)
{
    s->taken = 0;
    return 1;
}

esp_mqtt_client_handle_t esp_mqtt_client_init(const esp_mqtt_client_config_t *config)
{
    the_client.cfg = *config;
    return &the_client;
}

esp_err_t esp_mqtt_client_register_event(esp_mqtt_client_handle_t client,
                                         esp_mqtt_event_id_t event,
                                         esp_event_handler_t event_handler,
                                         void *event_handler_arg)
{
    if (event != MQTT_EVENT_ANY) {
        return ESP_FAIL;
    }
    client->handler = event_handler;
    client->handler_arg = event_handler_arg;
    return ESP_OK;
}

esp_err_t esp_mqtt_client_start(esp_mqtt_client_handle_t client)
{
    client->started = 1;
    return ESP_OK;
}

int esp_mqtt_client_subscribe_single(esp_mqtt_client_handle_t client, const char *topic,
                                     int qos)
{
    snprintf(client->filter, sizeof client->filter, "%s", topic);
    client->subscribed = qos <= 2;
    return 1;
}

int esp_mqtt_client_publish(esp_mqtt_client_handle_t client, const char *topic,
                            const char *data, int len, int qos, int retain)
{
    char payload[1024], id[80];
    const char *at, *end;
    (void)client;
    (void)qos;
    (void)retain;
    if (len <= 0 || len >= (int)sizeof payload) {
        return -1;
    }
    memcpy(payload, data, (size_t)len);
    payload[len] = '\0';
    at = strstr(payload, "\"id\":\"");
    if (strcmp(topic, "llm/request/esp-kitchen") != 0 || !at
        || !strstr(payload, "\"max_packet\":1024")) {
        fprintf(stderr, "stub: unexpected request on %s: %s\n", topic, payload);
        failures++;
        return -1;
    }
    at += 6;
    end = strchr(at, '"');
    snprintf(id, sizeof id, "%.*s", (int)(end - at), at);
    snprintf(reply_topic, sizeof reply_topic, "llm/reply/esp-kitchen/%s", id);
    snprintf(replies[0], sizeof replies[0],
             "{\"type\":\"start\",\"id\":\"%s\",\"seq\":0,\"model\":\"gemma\",\"queue\":0}", id);
    snprintf(replies[1], sizeof replies[1],
             "{\"type\":\"chunk\",\"id\":\"%s\",\"seq\":1,\"text\":\"The sky looks blue "
             "because the air scatters blue light more than red light, \"}", id);
    memcpy(replies[2], replies[1], sizeof replies[1]); /* a QoS 1 copy */
    snprintf(replies[3], sizeof replies[3],
             "{\"type\":\"chunk\",\"id\":\"%s\",\"seq\":2,\"text\":\"said Rayleigh. "
             "\\u00dcber \\ud83c\\udf0a\"}", id);
    snprintf(replies[4], sizeof replies[4],
             "{\"type\":\"done\",\"id\":\"%s\",\"seq\":3,\"finish_reason\":\"stop\","
             "\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":20}}", id);
    replies_queued = 5;
    replies_sent = 0;
    return 1;
}

static void fire(esp_mqtt_event_t *ev)
{
    ev->client = &the_client;
    the_client.handler(the_client.handler_arg, "MQTT_EVENTS", ev->event_id, ev);
}

/* What esp-mqtt's own task would have done meanwhile. */
void vTaskDelay(const TickType_t ticks)
{
    esp_mqtt_event_t ev;
    clock_us += (int64_t)ticks * (1000000 / configTICK_RATE_HZ);
    if (++delays > MAX_DELAYS) {
        fprintf(stderr, "stub: the example never ended\n");
        exit(1);
    }
    memset(&ev, 0, sizeof ev);
    if (the_client.started && !the_client.connected) {
        the_client.connected = 1;
        ev.event_id = MQTT_EVENT_CONNECTED;
        fire(&ev);
        if (the_client.subscribed) {
            memset(&ev, 0, sizeof ev);
            ev.event_id = MQTT_EVENT_SUBSCRIBED;
            fire(&ev);
        }
        return;
    }
    if (replies_sent < replies_queued
        && strncmp(reply_topic, the_client.filter, strlen(the_client.filter) - 1) == 0) {
        char *msg = replies[replies_sent++];
        int total = (int)strlen(msg), offset;
        for (offset = 0; offset < total; offset += STUB_PIECE) {
            memset(&ev, 0, sizeof ev);
            ev.event_id = MQTT_EVENT_DATA;
            if (offset == 0) {
                ev.topic = reply_topic;
                ev.topic_len = (int)strlen(reply_topic);
            }
            ev.data = msg + offset;
            ev.data_len = total - offset < STUB_PIECE ? total - offset : STUB_PIECE;
            ev.total_data_len = total;
            ev.current_data_offset = offset;
            ev.qos = 1;
            fire(&ev);
        }
    }
}

int main(void)
{
    app_main();
    if (!done_logged || failures || replies_sent != replies_queued) {
        fprintf(stderr, "stub: the example did not finish the answer\n");
        return 1;
    }
    printf("stub: the example printed the answer and logged its end\n");
    return 0;
}
