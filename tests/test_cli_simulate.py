"""The simulate commands run through their progress wrapper and report a summary."""

from __future__ import annotations

import json

from tests.helpers import wait_until


def test_simulate_esp32_cli_sends_every_image(mosquitto, run_cli):
    result = run_cli(
        [
            "camfleet",
            "simulate",
            "esp32",
            "--devices",
            "3",
            "--images",
            "2",
            "--no-wait-ack",
            "--broker",
            f"{mosquitto.host}:{mosquitto.port}",
            "--id-prefix",
            "C11C11",
            "--json",
        ],
        timeout=120,
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images_sent"] == 6 and summary["images_failed"] == 0
    assert summary["chunks_sent"] == 6 * 45


def test_esp32_devices_outlive_a_broker_outage_and_account_for_every_image():
    """A simulated device whose broker dies keeps trying and ends each image ACKed or
    failed; it used to die with the broker (paho's wait_for_publish raised)."""
    import threading

    from blocks.mqtt import MqttBroker
    from camfleet.localsvc import MosquittoInstance
    from camfleet.simulators.esp32 import Esp32Fleet, SimOptions

    with MosquittoInstance() as mq:
        opts = SimOptions(devices=2, images=1, ack_timeout=0.5, max_resends=4, id_prefix="0DD0DD")
        fleet = Esp32Fleet(MqttBroker(host=mq.host, port=mq.port), opts)
        done = threading.Event()
        runner = threading.Thread(target=lambda: (fleet.run(), done.set()), daemon=True)
        runner.start()
        # Connected and sending (nothing ACKs: no assembler here), then the broker dies.
        wait_until(lambda: fleet.result.chunks_sent > 0, "the fleet's first chunk")
        mq.kill()
        assert done.wait(60), "the simulated devices hung"
    assert fleet.result.images_failed == 2
    assert fleet.result.images_acked == 0


def test_simulate_esp32_names_the_broker_when_nothing_acknowledges(mosquitto, run_cli):
    """Nobody ingests from this broker: the failure says which broker it used."""
    result = run_cli(
        ["camfleet", "simulate", "esp32", "--ack-timeout", "0.3", "--id-prefix", "B0B0B0"]
        + ["--broker", f"{mosquitto.host}:{mosquitto.port}"],
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert f"mqtt://{mosquitto.host}:{mosquitto.port}" in result.stderr, result.stderr
