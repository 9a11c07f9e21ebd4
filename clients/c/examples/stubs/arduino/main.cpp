/*
 * A host run of the Arduino sketch: fakes of the stubbed APIs and a main() that calls
 * setup() and loop() like the Arduino core. The fake PubSubClient answers the request
 * the sketch publishes with canned reply messages (one of them twice, as QoS 1 may),
 * handing each to the sketch's callback from its one buffer, as the real library does.
 * Exits 0 when the sketch printed the whole answer and its end.
 */
#include <Arduino.h>
#include <PubSubClient.h>
#include <WiFi.h>

#include <string>

void setup();
void loop();

static unsigned long clock_ms = 1000;
static std::string serial_out;

unsigned long millis()
{
    return ++clock_ms;
}

void delay(unsigned long ms)
{
    clock_ms += ms;
}

HardwareSerial Serial;

void HardwareSerial::begin(unsigned long baud)
{
    (void)baud;
}

size_t HardwareSerial::write(const uint8_t *buffer, size_t size)
{
    serial_out.append(reinterpret_cast<const char *>(buffer), size);
    return fwrite(buffer, 1, size, stdout);
}

size_t HardwareSerial::print(const char *s)
{
    return write(reinterpret_cast<const uint8_t *>(s), strlen(s));
}

size_t HardwareSerial::print(long n)
{
    char buf[24];
    snprintf(buf, sizeof buf, "%ld", n);
    return print(buf);
}

size_t HardwareSerial::println(const char *s)
{
    return print(s) + println();
}

size_t HardwareSerial::println()
{
    return print("\n");
}

WiFiClass WiFi;

wl_status_t WiFiClass::begin(const char *ssid, const char *passphrase)
{
    (void)ssid;
    (void)passphrase;
    return WL_CONNECTED;
}

wl_status_t WiFiClass::status()
{
    return WL_CONNECTED;
}

void WiFiClient::setNoDelay(bool nodelay)
{
    (void)nodelay;
}

/* ------------------------------------------------------------ the fake PubSubClient */

static std::string subscribed_filter, publishing_topic, request_payload;
static std::string replies[8], reply_topic;
static int replies_queued, replies_sent;
static uint8_t packet_buffer[4096];

PubSubClient::PubSubClient(Client &client)
    : callback(NULL), bufferSize(MQTT_MAX_PACKET_SIZE), isConnected(false)
{
    (void)client;
}

PubSubClient &PubSubClient::setServer(const char *domain, uint16_t port)
{
    (void)domain;
    (void)port;
    return *this;
}

PubSubClient &PubSubClient::setCallback(void (*cb)(char *, uint8_t *, unsigned int))
{
    callback = cb;
    return *this;
}

boolean PubSubClient::setBufferSize(uint16_t size)
{
    if (size == 0 || size > sizeof packet_buffer) {
        return false;
    }
    bufferSize = size;
    return true;
}

boolean PubSubClient::connect(const char *id)
{
    (void)id;
    isConnected = true;
    return true;
}

boolean PubSubClient::connected()
{
    return isConnected;
}

boolean PubSubClient::subscribe(const char *topic, uint8_t qos)
{
    subscribed_filter = topic;
    return qos <= 1;
}

boolean PubSubClient::beginPublish(const char *topic, unsigned int plength, boolean retained)
{
    (void)plength;
    (void)retained;
    publishing_topic = topic;
    request_payload.clear();
    return isConnected;
}

size_t PubSubClient::write(const uint8_t *buffer, size_t size)
{
    request_payload.append(reinterpret_cast<const char *>(buffer), size);
    return size;
}

int PubSubClient::endPublish()
{
    /* the bridge's answer to the request: its id, from the payload */
    size_t at = request_payload.find("\"id\":\"");
    if (publishing_topic != "llm/request/kitchen" || at == std::string::npos
        || request_payload.find("\"max_packet\":256") == std::string::npos) {
        fprintf(stderr, "stub: unexpected request on %s: %s\n", publishing_topic.c_str(),
                request_payload.c_str());
        return 0;
    }
    at += 6;
    std::string id = request_payload.substr(at, request_payload.find('"', at) - at);
    std::string head = "{\"id\":\"" + id + "\",";
    reply_topic = "llm/reply/kitchen/" + id;
    replies[0] = head + "\"seq\":0,\"type\":\"start\",\"model\":\"gemma\",\"queue\":0}";
    replies[1] = head + "\"seq\":1,\"type\":\"chunk\",\"text\":\"The sky looks blue \"}";
    replies[2] = replies[1]; /* a QoS 1 copy */
    replies[3] = head + "\"seq\":2,\"type\":\"chunk\",\"text\":\"because air scatters "
                        "blue light. \\u00dcber \\ud83c\\udf0a\"}";
    replies[4] = head + "\"seq\":3,\"type\":\"done\",\"finish_reason\":\"stop\","
                        "\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":20}}";
    replies_queued = 5;
    replies_sent = 0;
    return 1;
}

boolean PubSubClient::loop()
{
    if (replies_sent >= replies_queued || !callback) {
        return isConnected;
    }
    const std::string &payload = replies[replies_sent++];
    /* fixed header (2) + topic length (2) + topic + packet id (2) + payload */
    size_t packet = 2 + 2 + reply_topic.size() + 2 + payload.size();
    if (reply_topic.compare(0, subscribed_filter.size() - 1, subscribed_filter, 0,
                            subscribed_filter.size() - 1) != 0) {
        return isConnected; /* not subscribed */
    }
    if (packet > bufferSize) {
        fprintf(stderr, "stub: dropped a %zu-byte packet (buffer %u)\n", packet, bufferSize);
        return isConnected;
    }
    /* like PubSubClient: topic NUL-terminated and payload in the one buffer */
    memcpy(packet_buffer, reply_topic.c_str(), reply_topic.size() + 1);
    memcpy(packet_buffer + reply_topic.size() + 1, payload.data(), payload.size());
    callback(reinterpret_cast<char *>(packet_buffer), packet_buffer + reply_topic.size() + 1,
             static_cast<unsigned int>(payload.size()));
    return isConnected;
}

int main()
{
    static const char want[] = "The sky looks blue because air scatters blue light. "
                               "\xc3\x9c" "ber \xf0\x9f\x8c\x8a\n[done: stop, 20 tokens]\n";
    setup();
    for (int i = 0; i < 20; i++) {
        loop();
    }
    if (serial_out != want) {
        fprintf(stderr, "stub: the sketch printed %s\n", serial_out.c_str());
        return 1;
    }
    printf("stub: the sketch printed the answer and its end\n");
    return 0;
}
