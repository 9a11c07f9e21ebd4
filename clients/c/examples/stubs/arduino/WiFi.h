/* Host stub of the ESP32/ESP8266 WiFi library: only what examples/arduino uses. */
#ifndef LLMB_STUB_WIFI_H
#define LLMB_STUB_WIFI_H

#include "Client.h"

typedef enum {
    WL_IDLE_STATUS = 0,
    WL_NO_SSID_AVAIL = 1,
    WL_SCAN_COMPLETED = 2,
    WL_CONNECTED = 3,
    WL_CONNECT_FAILED = 4,
    WL_CONNECTION_LOST = 5,
    WL_DISCONNECTED = 6
} wl_status_t;

class WiFiClass {
public:
    wl_status_t begin(const char *ssid, const char *passphrase);
    wl_status_t status();
};

extern WiFiClass WiFi;

class WiFiClient : public Client {
public:
    void setNoDelay(bool nodelay); /* TCP_NODELAY on the connection */
};

#endif
