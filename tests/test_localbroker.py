"""The broker `camfleet up` runs (camfleet/localbroker.py), against real Mosquitto:
no anonymous clients, a device account reaches only its own topics, oversized packets
are refused, and accounts and sessions survive a restart (state under the data dir)."""

from __future__ import annotations

import queue
import shutil
import tempfile
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from camfleet import localbroker
from camfleet.localsvc import free_port


@pytest.fixture
def broker_dir():
    path = Path(tempfile.mkdtemp(prefix="camfleet-broker-"))
    path.chmod(0o755)  # as root Mosquitto runs as `mosquitto` and must traverse it
    yield path / "mosquitto"
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def broker(broker_dir):
    instance, password = localbroker.broker(broker_dir, free_port())
    with instance:
        yield instance, password


class Client:
    """A paho client that records the messages it receives and whether it was dropped."""

    def __init__(self, port: int, user: str | None, password: str | None, client_id: str = ""):
        self.messages: queue.Queue = queue.Queue()
        self.connected: queue.Queue = queue.Queue()
        self.disconnected: queue.Queue = queue.Queue()
        self.subscribed: queue.Queue = queue.Queue()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not client_id
        )
        if user:
            self.c.username_pw_set(user, password)
        self.c.on_connect = lambda c, u, f, rc, p=None: self.connected.put(rc)
        self.c.on_disconnect = lambda c, u, f, rc, p=None: self.disconnected.put(rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p=None: self.subscribed.put(rcs)
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.rc = self.connected.get(timeout=10)

    def subscribe(self, topic: str) -> None:
        self.c.subscribe(topic, qos=1)
        self.subscribed.get(timeout=10)

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(timeout=10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _drain(q: queue.Queue, timeout: float) -> list:
    out = []
    try:
        out.append(q.get(timeout=timeout))
        while True:
            out.append(q.get_nowait())
    except queue.Empty:
        return out


def test_anonymous_and_wrong_passwords_are_refused(broker):
    instance, password = broker
    assert Client(instance.port, None, None).rc.is_failure
    assert Client(instance.port, localbroker.SERVICE_USER, password + "x").rc.is_failure
    assert not Client(instance.port, localbroker.SERVICE_USER, password).rc.is_failure


def test_a_device_reaches_only_its_own_topics(broker, broker_dir):
    instance, password = broker
    auth = localbroker.BrokerAuth(broker_dir)
    dev_pw = auth.add_device("DEV01")
    assert localbroker.reload(instance.pid)
    service = Client(instance.port, localbroker.SERVICE_USER, password)
    service.subscribe("ESP32CAM/+/status")
    device = Client(instance.port, "DEV01", dev_pw)
    assert not device.rc.is_failure
    device.subscribe("ESP32CAM/+/ack")  # allowed to ask; only its own is delivered
    device.publish("ESP32CAM/DEV02/status", b"forged")
    device.publish("ESP32CAM/DEV01/status", b"own")
    service.publish("ESP32CAM/DEV02/ack", b"not yours")
    service.publish("ESP32CAM/DEV01/ack", b"yours")
    assert _drain(service.messages, 3) == [("ESP32CAM/DEV01/status", b"own")]
    assert _drain(device.messages, 3) == [("ESP32CAM/DEV01/ack", b"yours")]
    service.close()
    device.close()


@pytest.mark.parametrize("bad", ["", "+", "#", "a/b", "a b", "camfleet", "x" * 65, "é"])
def test_device_ids_that_cannot_be_usernames_are_refused(broker_dir, bad):
    with pytest.raises(localbroker.BrokerAuthError):
        localbroker.BrokerAuth(broker_dir).add_device(bad)


def test_packets_over_the_limit_are_refused(broker):
    instance, password = broker
    service = Client(instance.port, localbroker.SERVICE_USER, password)
    service.subscribe("big/#")
    sender = Client(instance.port, localbroker.SERVICE_USER, password)
    sender.c.publish("big/ok", b"x" * (localbroker.MAX_PACKET_SIZE - 1024), qos=1)
    sender.c.publish("big/huge", b"x" * (localbroker.MAX_PACKET_SIZE + 1), qos=1)
    got = [topic for topic, _ in _drain(service.messages, 3)]
    assert got == ["big/ok"]
    assert _drain(sender.disconnected, 5), "the broker kept the connection that sent it"
    service.close()


def test_accounts_and_queued_messages_survive_a_restart(broker, broker_dir):
    instance, password = broker
    dev_pw = localbroker.BrokerAuth(broker_dir).add_device("DEV07")
    localbroker.reload(instance.pid)
    # A persistent session that is offline while its ACK is published.
    device = Client(instance.port, "DEV07", dev_pw, client_id="DEV07")
    device.subscribe("ESP32CAM/DEV07/ack")
    device.close()
    service = Client(instance.port, localbroker.SERVICE_USER, password)
    service.publish("ESP32CAM/DEV07/ack", b"while you slept")
    service.close()
    instance.restart()
    # A fresh stack start regenerates the ACL and keeps the device's account.
    assert localbroker.BrokerAuth(broker_dir).ensure() == password
    device = Client(instance.port, "DEV07", dev_pw, client_id="DEV07")
    assert not device.rc.is_failure
    assert _drain(device.messages, 5) == [("ESP32CAM/DEV07/ack", b"while you slept")]
    device.close()


def test_add_device_command_prints_credentials_once_and_refuses_bad_ids(broker_dir, run_cli):
    env = {"CAMFLEET_DATA_DIR": str(broker_dir.parent)}
    result = run_cli(["camfleet", "broker", "add-device", "ESP32-GARDEN"], env=env)
    password = result.stdout.split("password:", 1)[1].split()[0]
    assert "username: ESP32-GARDEN" in result.stdout and len(password) >= 20
    assert "next `camfleet up`" in result.stdout  # no broker running to reload
    assert password not in (broker_dir / "passwd").read_text()  # stored hashed
    bad = run_cli(["camfleet", "broker", "add-device", "ESP32/#"], env=env, check=False)
    assert bad.returncode == 2 and "device id must be" in bad.stderr
    # the next start keeps the account and the broker accepts it
    instance, _ = localbroker.broker(broker_dir, free_port())
    with instance:
        assert not Client(instance.port, "ESP32-GARDEN", password).rc.is_failure
