"""What the tests of ``run``'s own broker look at: the ``mosquitto`` binary, the Mosquitto
processes and folders a local broker leaves behind, and the machine's other addresses."""

from __future__ import annotations

import fcntl
import socket
import struct
from pathlib import Path

import pytest

from bridge.mqtt.brokers.mosquitto import find_binary
from tests.support.processes import mosquitto_available

FOLDER_GLOB = "llamacpp-mqtt-bridge-mosquitto-*"  # the folder of a local Mosquitto, in TMPDIR
PROTOCOL = {"mosquitto": "5", "amqtt": "3.1.1"}  # the MQTT version of each local broker


def require_mosquitto() -> str:
    """The ``mosquitto`` binary; the test fails (never skips) if it or ``mosquitto_passwd``
    is missing, saying how to install them."""
    binary = find_binary("mosquitto")
    if binary is None or not mosquitto_available():
        pytest.fail(
            "mosquitto is not installed; the test suite needs it and does not skip. "
            "Install it with: apt-get install -y mosquitto mosquitto-clients",
            pytrace=False,
        )
    return binary


def broker_processes(port: int) -> list[int]:
    """Pids of Mosquitto processes running a configuration generated for ``port``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # it ended while we looked
        if f"llamacpp-mqtt-bridge-mosquitto-{port}-" in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def non_loopback_ipv4() -> list[str]:
    """This machine's IPv4 addresses other than loopback (Linux ioctl SIOCGIFADDR)."""
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue  # no IPv4 address on this interface
        address = socket.inet_ntoa(packed[20:24])
        if not address.startswith("127."):
            found.append(address)
    return found
