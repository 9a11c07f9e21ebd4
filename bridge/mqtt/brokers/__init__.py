"""Brokers the bridge can start for itself: Mosquitto as a child process, or amqtt in-process."""
