"""MQTT wiring: the signer's one client, its subscription, its answers.

paho's network thread only enqueues (`_on_message` puts the request in the signer's
`FairInbox`); everything else happens on the signer's own threads. Ready means
subscribed: `connected` is set on the broker's SUBACK, not on its CONNACK.

`MqttShell` is built with the broker block, the client id, the topics, the share group,
the inbox it fills and the stats it counts published messages in; the other parts
publish through its `publish_answer` and `publish_verification`, passed to them as
plain callables.
"""

from __future__ import annotations

import json
import logging
import threading

from camfleet.edge.link import no_delay
from camfleet.protocol import edge_batch as eb
from services.signer.limits import FairInbox
from services.signer.watch import SignerStats

log = logging.getLogger("camfleet.signer")

MQTT_QOS = 1


class MqttShell:
    """The signer's broker connection (paho), requests in and answers out."""

    def __init__(
        self,
        broker,
        client_id: str,
        topics: eb.Topics,
        share_group: str | None,
        inbox: FairInbox,
        stats: SignerStats,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.topics = topics
        # Replicas: requests arrive through the broker's shared subscription
        # `$share/{group}/...` (each request to one instance).
        self.share_group = share_group
        self.inbox = inbox
        self.stats = stats
        self.connected = threading.Event()  # set on the broker's SUBACK, not before
        self.subscribe_mid: int | None = None
        self.client = None

    def connect(self, connect_timeout: float) -> None:
        """Connect and subscribe in the background; wait up to `connect_timeout` for it."""
        # A shared subscription with a persistent session would keep receiving its
        # share of requests while its instance is dead (Mosquitto queues them for the
        # session): replicas use clean sessions, so the broker routes around a dead one.
        client = self.broker.client(self.client_id, clean_session=self.share_group is not None)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = lambda *a, **k: self.connected.clear()
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive)
        client.loop_start()
        self.client = client
        if not self.connected.wait(connect_timeout):
            log.warning("signer: broker %s not reachable yet; retrying", self.broker.describe())

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.warning("signer: broker refused the connection: %s", reason_code)
            return
        no_delay(client)
        _, self.subscribe_mid = client.subscribe(self.subscription(), qos=MQTT_QOS)

    def subscription(self) -> str:
        """Every device's request topic; through the share group for replicas."""
        topic = self.topics.request_filter()
        return f"$share/{self.share_group}/{topic}" if self.share_group else topic

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        # Ready only now: before the SUBACK, a request published to the broker may not
        # be routed to us.
        if any(getattr(rc, "is_failure", False) for rc in reason_codes or []):
            log.error("signer: broker refused the subscription to %s", self.subscription())
            return
        self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        payload = bytes(message.payload[: eb.MAX_REQUEST_BYTES + 1])  # parser refuses
        if not self.inbox.put(message.topic, (message.topic, payload)):
            if self.inbox.dropped in (1, 10, 100) or self.inbox.dropped % 1000 == 0:
                log.warning(
                    "signer: request queue full, %d requests dropped (latest on %s)",
                    self.inbox.dropped,
                    eb._printable(message.topic, 120),
                )

    def publish_answer(self, serial: str, answer: dict) -> None:
        _, urls_topic, _ = self.topics.for_device(serial)
        self.client.publish(urls_topic, json.dumps(answer), qos=MQTT_QOS)

    def publish_verification(self, pub: eb.Publish) -> None:
        _, _, verified_topic = self.topics.for_device(pub.serial)
        self.client.publish(verified_topic, eb.verification_message(pub.name), qos=MQTT_QOS)
        self.stats.published += 1
