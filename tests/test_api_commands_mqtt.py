"""The same capture commands over MQTT (`ESP32CAM/{id}/cmd`) for MQTT-transport devices."""

from __future__ import annotations

import json
import queue

import httpx
import paho.mqtt.client as mqtt

from tasks import triggers as trig
from tests.test_api_commands_helpers import ApiProcess, add_device


def test_trigger_for_an_mqtt_device_is_published_once_on_its_cmd_topic(
    database_url, mosquitto, tmp_path
):
    add_device(database_url, "AA:BB:CC:00:11:22", {"trigger": {"transport": "mqtt"}})
    add_device(database_url, "SSEONLY")
    got: queue.Queue = queue.Queue()
    sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: got.put((m.topic, json.loads(m.payload)))
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe("ESP32CAM/+/cmd", qos=1)
    sub.loop_start()
    env = {
        "CAMFLEET_TRIGGER_MQTT": "true",
        "MQTT_HOST": mosquitto.host,
        "MQTT_PORT": str(mosquitto.port),
    }
    storage = tmp_path / "objects"
    storage.mkdir()
    # two instances with MQTT on: the claim decides which one publishes
    a = ApiProcess(database_url, storage, **env).start()
    b = ApiProcess(database_url, storage, **env).start()
    try:
        r = httpx.post(a.url + "/v1/devices/AA:BB:CC:00:11:22/trigger", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "sent", r.text
        topic, payload = got.get(timeout=5)
        assert topic == "ESP32CAM/AA:BB:CC:00:11:22/cmd"
        assert payload == {"cmd": "capture", "trigger_id": r.json()["trigger_id"], "type": "manual"}
        # a device without the mqtt transport gets nothing on MQTT
        r2 = httpx.post(a.url + "/v1/devices/SSEONLY/trigger", timeout=10)
        assert r2.json()["status"] == "pending"
        try:
            extra = got.get(timeout=1.5)
        except queue.Empty:
            extra = None
        assert extra is None, f"unexpected second publish: {extra}"
        assert trig.trigger_state(database_url, r.json()["trigger_id"])["status"] == "sent"

        # made while no API runs: published when one starts again
        a.stop()
        b.stop()
        waiting = trig.create_manual(database_url, "AA:BB:CC:00:11:22", ttl_seconds=60)
        a.start()
        topic, payload = got.get(timeout=10)
        assert payload["trigger_id"] == waiting
        assert trig.trigger_state(database_url, waiting)["status"] == "sent"
    finally:
        sub.loop_stop()
        a.stop()
        b.stop()
