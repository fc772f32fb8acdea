"""The device's MQTT session: subscribe first, then publish; answers land in a queue.

paho calls `on_message` on its network thread, which only enqueues; the batch logic
(`DeviceBatch`) reads the queue and decides which messages belong to its request.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import uuid

from camfleet.protocol import edge_batch as eb

log = logging.getLogger("camfleet.edge")

MQTT_QOS = 1

# Messages buffered between reads: a batch's answer plus its verifications, with
# room for stale ones from earlier runs. Each is cut to just over the largest valid
# answer before queueing (the parser then refuses it), so the inbox stays under 26 MiB.
MAX_INBOX = 200


def no_delay(client) -> None:
    """Send small MQTT packets at once: with Nagle's algorithm a publish that follows a
    PUBACK waits for the broker's delayed TCP ACK (up to 40 ms per exchange)."""
    sock = client.socket()
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not a TCP socket (e.g. a websocket wrapper): keep the default


class LinkError(ConnectionError):
    """The broker could not be reached or refused us (no credentials in the text)."""


class EdgeLink:
    """One MQTT connection for a device: `connect()`, `publish_request()`, `next()`."""

    def __init__(self, broker, serial: str, topics: eb.Topics | None = None) -> None:
        self.broker = broker
        self.serial = serial
        self.topics = topics or eb.Topics()
        self.request_topic, self.urls_topic, self.verified_topic = self.topics.for_device(serial)
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(MAX_INBOX)
        self._subscribed = threading.Event()
        self._client = None

    def connect(self, timeout: float = 10.0) -> EdgeLink:
        client = self.broker.client(f"{self.serial}-camfleet-{uuid.uuid4().hex[:8]}", True)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *a, **k: self._subscribed.set()
        client.on_disconnect = lambda *a, **k: self._subscribed.clear()
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._client = client
        try:
            client.connect(self.broker.host, self.broker.port, self.broker.keepalive)
        except OSError as exc:
            raise LinkError(f"cannot reach broker {self.broker.describe()}: {exc}") from None
        client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise LinkError(f"broker {self.broker.describe()} did not accept the subscription")
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.warning("edge: broker refused the connection: %s", reason_code)
            return
        no_delay(client)
        client.subscribe([(self.urls_topic, MQTT_QOS), (self.verified_topic, MQTT_QOS)])

    def _on_message(self, client, userdata, message) -> None:
        try:
            payload = bytes(message.payload[: eb.MAX_ANSWER_BYTES + 1])
            self.inbox.put_nowait((message.topic, payload))
        except queue.Full:
            log.warning("edge: inbox full, dropping a message on %s", message.topic)

    def connected(self) -> bool:
        return self._subscribed.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def publish_request(self, payload: bytes, timeout: float = 10.0) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        if not self._subscribed.wait(timeout):
            raise LinkError("not connected to the broker")
        info = self._client.publish(self.request_topic, payload, qos=MQTT_QOS)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            raise LinkError("request not sent: the connection dropped") from None
        if not info.is_published():
            raise LinkError("request not acknowledged by the broker")

    def next(self, timeout: float) -> tuple[str, bytes] | None:
        try:
            return self.inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
