"""A deployed seed-000 device, as its firmware behaves on the wire (for simulation and
compatibility tests): the cloud side must serve it unchanged.

It publishes only names (`{"device-serialID", "bucket-name", "files"}`), subscribes to
the URL topic at QoS 0 and writes the first payload verbatim to `signedUrls.json`,
parses that file with `ast.literal_eval`, POSTs each file as multipart (`data=fields`,
`files={"file": ...}`), and only then subscribes to the verification topic, parsing
each message with `ast.literal_eval` and deleting `STORAGE_PATH + file`.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import threading
import time
from pathlib import Path

import httpx

from camfleet.protocol import edge_batch as eb


def _subscribe(broker, topic: str, qos: int) -> tuple[object, queue.Queue]:
    inbox: queue.Queue = queue.Queue()
    ready = threading.Event()
    client = broker.client()
    client.on_connect = lambda c, *a: c.subscribe(topic, qos)
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = lambda c, u, m: inbox.put(bytes(m.payload))
    client.connect(broker.host, broker.port, broker.keepalive)
    client.loop_start()
    if not ready.wait(10):
        raise ConnectionError("broker did not accept the subscription")
    return client, inbox


def run_seed_batch(
    broker,
    serial: str,
    buffer_dir: Path,
    names: list[str],
    workdir: Path,
    url_timeout: float = 10.0,
    verify_timeout: float = 15.0,
    bucket_name: str = "test-entomologist-2",
) -> list[str]:
    """One batch as the seed firmware runs it; returns the names it deleted."""
    topics = eb.Topics()
    request_topic, urls_topic, verified_topic = topics.for_device(serial)
    sub, urls = _subscribe(broker, urls_topic, 0)
    pub = broker.client()
    pub.connect(broker.host, broker.port, broker.keepalive)
    pub.loop_start()
    body = {"device-serialID": serial, "bucket-name": bucket_name, "files": names}
    pub.publish(request_topic, json.dumps(body), qos=1).wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()
    try:
        payload = urls.get(timeout=url_timeout)
    finally:
        sub.disconnect()
        sub.loop_stop()
    signed = Path(workdir) / "signedUrls.json"
    signed.write_bytes(payload)  # sub.py writes the payload verbatim

    payload_dict = ast.literal_eval(signed.read_text())  # imageUpload.py's parser
    with httpx.Client(trust_env=False, timeout=30) as http:
        for entry in payload_dict["files"]:
            filename, response = entry["filename"], entry["url"]
            with open(str(buffer_dir) + "/" + filename, "rb") as f:
                http.post(response["url"], data=response["fields"], files={"file": (filename, f)})

    # verification.py: subscribe only now, delete on each {"file": name}.
    verifier, verified = _subscribe(broker, verified_topic, 1)
    deleted: list[str] = []
    deadline = time.monotonic() + verify_timeout
    try:
        while len(deleted) < len(payload_dict["files"]) and time.monotonic() < deadline:
            try:
                message = verified.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            filename = ast.literal_eval(message.decode("utf-8"))["file"]
            os.remove(str(buffer_dir) + "/" + filename)
            deleted.append(filename)
    finally:
        verifier.disconnect()
        verifier.loop_stop()
    return deleted
