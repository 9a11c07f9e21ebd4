/*
 * Host stub of knolleary's PubSubClient 2.8: only what examples/arduino uses, with its
 * signatures. Like the real one it has ONE buffer (256 bytes by default) for every
 * packet, and drops a received packet that does not fit it without a word.
 */
#ifndef LLMB_STUB_PUBSUBCLIENT_H
#define LLMB_STUB_PUBSUBCLIENT_H

#include <Arduino.h>

#include "Client.h"

#define MQTT_MAX_PACKET_SIZE 256
#define MQTT_CALLBACK_SIGNATURE void (*callback)(char *, uint8_t *, unsigned int)

class PubSubClient {
public:
    explicit PubSubClient(Client &client);
    PubSubClient &setServer(const char *domain, uint16_t port);
    PubSubClient &setCallback(MQTT_CALLBACK_SIGNATURE);
    boolean setBufferSize(uint16_t size);
    boolean connect(const char *id);
    boolean connected();
    boolean beginPublish(const char *topic, unsigned int plength, boolean retained);
    size_t write(const uint8_t *buffer, size_t size);
    int endPublish();
    boolean subscribe(const char *topic, uint8_t qos);
    boolean loop();

private:
    MQTT_CALLBACK_SIGNATURE;
    uint16_t bufferSize;
    bool isConnected;
};

#endif
