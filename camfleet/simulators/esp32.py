"""Simulated ESP32S3-CAM devices speaking seed 002's MQTT protocol.

Each device (a thread) publishes a status message, then per image the metadata and
1 KiB base64 chunks on ``ESP32CAM/{MAC}/data`` at QoS 1, and waits on
``ESP32CAM/{MAC}/ack``: a NACK ``missing_chunks`` list is answered by resending those
chunks, ACK_OK ends the image (latency measured from the last chunk), and no answer
within ``ack_timeout`` resends the whole image (up to ``max_resends`` times), exactly
what the firmware does with its SD-card copy.  ``drop``/``duplicate``/``reorder`` are
probabilities applied to the first send of each chunk.  Devices share a few MQTT
connections (``clients``) so a 2-core machine can run a hundred of them.
"""

from __future__ import annotations

import base64
import json
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass, field

CHUNK_SIZE = 1024  # the firmware's chunk size (seed: "1KB base64-encoded chunks")
IMAGE_BYTES = 45 * CHUNK_SIZE - 100  # 45 chunks, as the seed's metadata example


@dataclass
class SimOptions:
    devices: int = 1
    images: int = 1
    image_bytes: int = IMAGE_BYTES
    # Real JPEGs naming the device and time, under names unique across runs (demo);
    # otherwise image_bytes of random payload named image_N.jpg (tests, benchmarks).
    pictures: bool = False
    chunk_size: int = CHUNK_SIZE
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    wait_ack: bool = True
    ack_timeout: float = 15.0
    max_resends: int = 3
    clients: int = 1
    id_prefix: str = "A0B0C0"
    seed: int = 0
    qos: int = 1


@dataclass
class SimResult:
    images_sent: int = 0
    images_acked: int = 0
    images_failed: int = 0
    chunks_sent: int = 0
    nacks: int = 0
    resends: int = 0
    ack_latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    sent: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (device, name) -> jpeg
    next_wake_times: list[str] = field(default_factory=list)


def fake_jpeg(size: int, rnd: random.Random) -> bytes:
    """SOI + random bytes + EOI: passes the assembler's signature gate."""
    return b"\xff\xd8" + rnd.randbytes(max(0, size - 4)) + b"\xff\xd9"


def device_id(prefix: str, i: int) -> str:
    return f"{prefix}{i:06X}"


class Esp32Fleet:
    def __init__(self, broker, opts: SimOptions):
        self.broker = broker
        self.opts = opts
        self.result = SimResult()
        self._lock = threading.Lock()
        self._inboxes: dict[str, queue.SimpleQueue] = {}
        self._clients = []

    # -- MQTT ----------------------------------------------------------------------
    def _connect(self, n: int):
        ready = threading.Event()
        client = self.broker.client(client_id=f"esp32sim-{self.opts.id_prefix}-{n}")
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)

        def on_connect(c, userdata, flags, rc, props=None):
            sock = c.socket()
            if sock is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            c.subscribe("ESP32CAM/+/ack", qos=1)

        def on_subscribe(c, userdata, mid, rcs, props=None):
            ready.set()

        def on_message(c, userdata, msg):
            dev = msg.topic.split("/")[1]
            box = self._inboxes.get(dev)
            if box is not None:
                box.put(msg.payload)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(self.broker.host, self.broker.port, 60)
        client.loop_start()
        if not ready.wait(15):
            raise ConnectionError("simulator could not connect/subscribe")
        return client

    # -- device behaviour ----------------------------------------------------------
    def _device(self, i: int, client) -> None:
        o = self.opts
        rnd = random.Random(o.seed * 1_000_003 + i)
        dev = device_id(o.id_prefix, i)
        box = self._inboxes[dev]
        data_topic = f"ESP32CAM/{dev}/data"

        def pub(topic, body):
            client.publish(topic, json.dumps(body, separators=(",", ":")), qos=o.qos)

        pub(f"ESP32CAM/{dev}/status", {"device_id": dev, "status": "Alive", "pendingImg": o.images})
        for j in range(o.images):
            if o.pictures:
                from camfleet.simulators.pictures import picture, unique_name

                data, name = picture(dev, j), unique_name(j)
            else:
                data, name = fake_jpeg(o.image_bytes, rnd), f"image_{j}.jpg"
            with self._lock:
                self.result.sent[(dev, name)] = data
            total = (len(data) + o.chunk_size - 1) // o.chunk_size

            def chunk(cid, data=data, name=name):
                part = data[cid * o.chunk_size : (cid + 1) * o.chunk_size]
                return {
                    "device_id": dev,
                    "image_name": name,
                    "chunk_id": cid,
                    "max_chunk_size": o.chunk_size,
                    "payload": base64.b64encode(part).decode(),
                }

            meta = {
                "device_id": dev,
                "capture_timeStamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "image_name": name,
                "image_size": len(data),
                "max_chunks_size": o.chunk_size,
                "total_chunk_count": total,
                "location": "sim",
                "error": 0,
                "temperature": round(20 + rnd.random() * 5, 2),
                "humidity": round(40 + rnd.random() * 10, 2),
                "pressure": 1013.25,
                "gas_resistance": 12345.67,
            }
            encoded = [json.dumps(chunk(cid), separators=(",", ":")) for cid in range(total)]
            acked = False
            for attempt in range(o.max_resends + 1):
                if attempt:
                    with self._lock:
                        self.result.resends += 1
                pub(data_topic, meta)
                order = list(range(total))
                if o.reorder and attempt == 0:
                    for k in range(total - 1):
                        if rnd.random() < o.reorder:
                            order[k], order[k + 1] = order[k + 1], order[k]
                sent = 0
                last_info = None
                for cid in order:
                    if attempt == 0 and rnd.random() < o.drop:
                        continue
                    last_info = client.publish(data_topic, encoded[cid], qos=o.qos)
                    sent += 1
                    if attempt == 0 and rnd.random() < o.duplicate:
                        client.publish(data_topic, encoded[cid], qos=o.qos)
                        sent += 1
                if last_info is not None and o.wait_ack:
                    # latency counts from when the broker has the last chunk (PUBACK),
                    # not from when it entered this process's own send queue
                    try:
                        last_info.wait_for_publish(o.ack_timeout)
                    except (RuntimeError, ValueError):
                        # The broker is unreachable right now: paho sends the queued
                        # message after reconnecting; the ACK wait below decides.
                        pass
                t_last = time.monotonic()
                with self._lock:
                    self.result.chunks_sent += sent
                    self.result.images_sent += attempt == 0
                if not o.wait_ack:
                    acked = True
                    break
                deadline = t_last + o.ack_timeout
                while True:
                    try:
                        raw = box.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break  # resend the whole image
                    try:
                        msg = json.loads(raw)
                    except ValueError:
                        continue
                    if not isinstance(msg, dict) or msg.get("image_name") != name:
                        continue
                    if "ACK_OK" in msg:
                        with self._lock:
                            self.result.ack_latencies.append(time.monotonic() - t_last)
                            self.result.next_wake_times.append(
                                str(msg["ACK_OK"].get("next_wake_time"))
                            )
                        acked = True
                        break
                    if "missing_chunks" in msg:
                        with self._lock:
                            self.result.nacks += 1
                        for cid in msg["missing_chunks"]:
                            if isinstance(cid, int) and 0 <= cid < total:
                                client.publish(data_topic, encoded[cid], qos=o.qos)
                        t_last = time.monotonic()
                        deadline = t_last + o.ack_timeout
                if acked:
                    break
            with self._lock:
                if acked and o.wait_ack:
                    self.result.images_acked += 1
                elif not acked:
                    self.result.images_failed += 1

    def run(self) -> SimResult:
        o = self.opts
        for i in range(o.devices):
            self._inboxes[device_id(o.id_prefix, i)] = queue.SimpleQueue()
        self._clients = [self._connect(n) for n in range(max(1, min(o.clients, o.devices)))]
        threads = [
            threading.Thread(
                target=self._device, args=(i, self._clients[i % len(self._clients)]), daemon=True
            )
            for i in range(o.devices)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.result.elapsed = time.monotonic() - t0
        # let QoS 1 publishes drain before disconnecting (not while the broker is away)
        for c in self._clients:
            end = time.monotonic() + 120
            while c._out_messages and c.is_connected() and time.monotonic() < end:  # noqa: SLF001
                time.sleep(0.01)
            c.disconnect()
            c.loop_stop()
        return self.result


def simulate(broker, opts: SimOptions) -> SimResult:
    return Esp32Fleet(broker, opts).run()
