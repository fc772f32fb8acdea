"""The demo's simulated devices send real pictures under new names each round (issue
18: the demo resent undecodable `image_0.jpg`, so captures were deduplicated away and
evaluation failed a third of them)."""

from __future__ import annotations

import io
import time

from PIL import Image

from blocks.mqtt import MqttBroker
from camfleet.simulators.esp32 import Esp32Fleet, SimOptions
from camfleet.simulators.pictures import picture


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every byte: a random payload behind a JPEG header fails here
    return image


def test_pictures_are_decodable_jpegs_that_differ_by_device_and_frame():
    a, b, a2 = picture("DEV-A", 0), picture("DEV-B", 0), picture("DEV-A", 1)
    assert len({a, b, a2}) == 3
    for data in (a, b, a2):
        image = _decoded(data)
        assert image.format == "JPEG" and image.size == (320, 240)
        assert len(image.getcolors(1 << 16) or range(1 << 16)) > 50  # a scene, not a flat fill


def test_demo_esp32_rounds_send_decodable_pictures_under_new_names(mosquitto):
    broker = MqttBroker(host=mosquitto.host, port=mosquitto.port)
    names = []
    for _ in range(2):  # two demo rounds of the same devices
        opts = SimOptions(devices=2, images=2, wait_ack=False, id_prefix="D3D3D3", pictures=True)
        fleet = Esp32Fleet(broker, opts)
        result = fleet.run()
        assert result.images_sent == 4 and result.images_failed == 0
        for (device, name), data in result.sent.items():
            _decoded(data)
            names.append((device, name))
        time.sleep(0.002)  # names carry the time to the millisecond
    assert len(names) == 8 and len(set(names)) == 8, names
