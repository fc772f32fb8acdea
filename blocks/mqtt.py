"""MQTT broker block: host, TLS (CA, client certificate and key as AWS IoT uses) and login."""

from __future__ import annotations

import ssl
import uuid

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class MqttBroker(Block):
    _block_type_name = "camfleet MQTT Broker"
    _block_type_slug = "camfleet-mqtt-broker"
    _description = "An MQTT broker camfleet's devices and services talk through."

    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, description="8883 is the usual TLS port.")
    tls: bool = Field(False, description="Connect with TLS.")
    ca_certs: str | None = Field(None, description="Path to the CA bundle (AWS IoT root CA).")
    certfile: str | None = Field(None, description="Path to the client certificate.")
    keyfile: str | None = Field(None, description="Path to the client private key.")
    username: str | None = None
    password: SecretStr | None = None
    keepalive: int = Field(60, description="Seconds between keepalive pings.")

    @classmethod
    def from_env(cls) -> MqttBroker:
        """The seed's MQTT_* environment variables as a block (not saved)."""
        from camfleet.settings import Settings

        s = Settings()
        return cls(
            host=s.mqtt_host,
            port=s.mqtt_port,
            tls=s.mqtt_tls or bool(s.mqtt_ca_certs),
            ca_certs=s.mqtt_ca_certs,
            certfile=s.mqtt_certfile,
            keyfile=s.mqtt_keyfile,
            username=s.mqtt_username,
            password=s.mqtt_password,
        )

    def client(self, client_id: str | None = None, clean_session: bool = True):
        """A configured paho-mqtt 2 client (MQTT 3.1.1), not yet connected.

        Long-running services pass a stable `client_id` with `clean_session=False` so the
        broker keeps their QoS 1 subscriptions and queued messages across a reconnect.
        """
        import paho.mqtt.client as mqtt

        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"camfleet-{uuid.uuid4().hex[:12]}",
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        if self.tls:
            client.tls_set(
                ca_certs=self.ca_certs,
                certfile=self.certfile,
                keyfile=self.keyfile,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if self.username:
            password = self.password.get_secret_value() if self.password else None
            client.username_pw_set(self.username, password)
        return client

    def describe(self) -> str:
        auth = f" as {self.username}" if self.username else ""
        return f"{self.host}:{self.port} (TLS: {self.tls}){auth}"
