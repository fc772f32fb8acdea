"""The simulate commands run through their progress wrapper and report a summary."""

from __future__ import annotations

import json


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
