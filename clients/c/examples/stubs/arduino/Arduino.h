/* Host stub of the Arduino core: only what examples/arduino uses (see README.md here). */
#ifndef LLMB_STUB_ARDUINO_H
#define LLMB_STUB_ARDUINO_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint8_t byte;
typedef bool boolean;

unsigned long millis();
void delay(unsigned long ms);

class HardwareSerial {
public:
    void begin(unsigned long baud);
    size_t write(const uint8_t *buffer, size_t size);
    size_t print(const char *s);
    size_t print(long n);
    size_t println(const char *s);
    size_t println();
};

extern HardwareSerial Serial;

#endif
