/* Host stub of Arduino's Client (the network connection PubSubClient talks through). */
#ifndef LLMB_STUB_CLIENT_H
#define LLMB_STUB_CLIENT_H

class Client {
public:
    virtual ~Client() {}
};

#endif
