/*
 * LlmBridgeAsk: ask llamacpp-mqtt-bridge a question from an ESP32/ESP8266 with
 * PubSubClient, and print the answer on Serial as it arrives.
 *
 * Install clients/c as an Arduino library (copy or link it into ~/Arduino/libraries/
 * llm_bridge; library.properties is there), and PubSubClient. Set WIFI_*, BROKER_*
 * and DEVICE below.
 *
 * PubSubClient keeps ONE buffer (256 bytes by default) for every packet it sends or
 * receives, and drops a received packet that does not fit without telling anyone. So
 * the request says max_packet = the buffer size, and the bridge makes every reply
 * message fit it. PubSubClient publishes at QoS 0 only and subscribes at QoS 0 or 1:
 * the reply subscription uses QoS 1, and a request lost on the way in is covered by the
 * client's resends. The request itself may be longer than the buffer: it is streamed
 * out with beginPublish()/write()/endPublish().
 */
#include <Arduino.h>
#include <PubSubClient.h>
#if defined(ESP8266)
#include <ESP8266WiFi.h>
#else
#include <WiFi.h>
#endif

#include <llm_bridge.h>

static const char WIFI_SSID[] = "my-wifi";
static const char WIFI_PASSWORD[] = "my-password";
static const char BROKER_HOST[] = "192.168.1.10";
static const uint16_t BROKER_PORT = 1883;
static const char DEVICE[] = "kitchen";   /* the device's name: llm/request/kitchen */
static const uint16_t MQTT_BUFFER = 256;  /* PubSubClient's default, set explicitly */

static WiFiClient net;
static PubSubClient mqtt(net);
static llmb_client llm;

static char req_topic[96];
static char req_payload[384];
static long req_len = -1;
static char reply_filter[96];
static unsigned long asked_at;
static unsigned request_number;

static void on_text(void *user, const char *text, size_t len)
{
    (void)user;
    Serial.write(reinterpret_cast<const uint8_t *>(text), len);
}

static void on_done(void *user, const llmb_done *d)
{
    (void)user;
    Serial.println();
    Serial.print("[done: ");
    Serial.print(d->finish_reason);
    if (d->completion_tokens != LLMB_ABSENT) {
        Serial.print(", ");
        Serial.print(static_cast<long>(d->completion_tokens));
        Serial.print(" tokens");
    }
    Serial.println("]");
}

static void on_error(void *user, const llmb_error *e)
{
    (void)user;
    Serial.println();
    Serial.print("[error ");
    Serial.print(e->code);
    if (e->message[0]) {
        Serial.print(": ");
        Serial.print(e->message);
    }
    Serial.println(e->retryable ? " (retryable)]" : "]");
}

static void on_message(char *topic, uint8_t *payload, unsigned int length)
{
    /* PubSubClient NUL-terminates the topic; the payload is not terminated */
    llmb_feed(&llm, topic, strlen(topic), payload, length);
}

static bool publish_request()
{
    /* streamed: the request does not have to fit PubSubClient's buffer */
    if (!mqtt.beginPublish(req_topic, static_cast<unsigned int>(req_len), false)) {
        return false;
    }
    mqtt.write(reinterpret_cast<const uint8_t *>(req_payload), static_cast<size_t>(req_len));
    return mqtt.endPublish() == 1;
}

static void ask(const char *question)
{
    char id[24];
    llmb_request r;
    memset(&r, 0, sizeof r);
    /* unique per request: a resend must reuse it, a new question must not */
    snprintf(id, sizeof id, "q%lx-%u", static_cast<unsigned long>(millis()), ++request_number);
    r.id = id;
    r.prompt = question;
    r.max_tokens = 64;
    r.has_temperature = 1;
    r.temperature_milli = 0; /* with a seed: a resend answered anew repeats the answer */
    r.has_seed = 1;
    r.seed = 42;
    req_len = llmb_build_request(&llm, &r, req_topic, sizeof req_topic, req_payload,
                                 sizeof req_payload);
    if (req_len < 0) {
        Serial.println("[request does not fit its buffer]");
        return;
    }
    if (!publish_request()) {
        Serial.println("[publish failed; the resend timer will try again]");
    }
    llmb_tick(&llm, millis());
}

static void connect_mqtt()
{
    while (!mqtt.connected()) {
        if (mqtt.connect(DEVICE)) {
            mqtt.subscribe(reply_filter, 1); /* before any request */
        } else {
            delay(2000);
        }
    }
}

void setup()
{
    Serial.begin(115200);
    WiFi.begin(WIFI_SSID, WIFI_PASSWORD);
    while (WiFi.status() != WL_CONNECTED) {
        delay(250);
    }
    net.setNoDelay(true); /* small messages: no Nagle delay */

    llmb_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.client = DEVICE;
    cfg.max_packet = MQTT_BUFFER; /* the whole packet PubSubClient can take in */
    cfg.on_text = on_text;
    cfg.on_done = on_done;
    cfg.on_error = on_error;
    if (llmb_init(&llm, &cfg) != 0 || llmb_reply_filter(&llm, reply_filter,
                                                        sizeof reply_filter) < 0) {
        Serial.println("[bad device name]");
        for (;;) {
            delay(1000);
        }
    }
    mqtt.setServer(BROKER_HOST, BROKER_PORT);
    mqtt.setBufferSize(MQTT_BUFFER);
    mqtt.setCallback(on_message);
    connect_mqtt();
    ask("Why is the sky blue? Answer in one sentence.");
    asked_at = millis();
}

void loop()
{
    connect_mqtt();
    mqtt.loop();
    switch (llmb_tick(&llm, millis())) {
    case LLMB_TICK_RESEND:
        Serial.println("[silence: sending the request again]");
        publish_request();
        break;
    case LLMB_TICK_TIMEOUT: /* on_error said it */
    default:
        break;
    }
    /* another question a minute after the last one, once it has ended */
    if (!llmb_active(&llm) && millis() - asked_at > 60000UL) {
        ask("Tell me a short fact about lighthouses.");
        asked_at = millis();
    }
}
