"""The seed's `/etc/entomologist/ento.conf`, read as is, plus optional camfleet keys.

The seed's file is JSON with a `device` object::

    {"device": {"SERIAL_ID": "ENTO-0001", "PROVISION_STATUS": "...",
                "ENDPOINT_URL": "xxxx-ats.iot.eu-west-1.amazonaws.com",
                "STORAGE_PATH": "/media/mmcblk1p1/bufferStorage/"}}

Every key camfleet adds is optional and has the seed's behaviour as its default:

    PORT (8883), IMAGE_REPO_PATH (cameraImageRepo/ beside STORAGE_PATH),
    BUCKET_NAME, BATCH_SIZE (5), ROOT_CA / CERT / PRIVATE_KEY (the seed's
    /etc/entomologist/cert/ files), TLS (true), MQTT_USERNAME / MQTT_PASSWORD,
    TOPIC_REQUEST / TOPIC_URLS / TOPIC_VERIFIED (templates with {serial}).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from camfleet.keys import BadName, safe_id
from camfleet.protocol import edge_batch as eb

DEFAULT_CONFIG_PATH = "/etc/entomologist/ento.conf"
SEED_CERT_DIR = "/etc/entomologist/cert"
SEED_MQTT_PORT = 8883

# An ento.conf is a few hundred bytes; refusing more keeps a corrupt file from being
# read whole into memory.
MAX_CONFIG_BYTES = 64 * 1024


class ConfigError(ValueError):
    """ento.conf is missing, not JSON, or lacks a required key (never shows secrets)."""


@dataclass
class EdgeConfig:
    serial: str
    buffer_dir: Path
    repo_dir: Path
    broker_host: str
    broker_port: int = SEED_MQTT_PORT
    tls: bool = True
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    bucket_name: str = "camfleet"
    batch_size: int = eb.DEFAULT_BATCH_SIZE
    topics: eb.Topics = field(default_factory=eb.Topics)

    def broker(self):
        """An (unsaved) MqttBroker block for this device's broker settings."""
        from blocks.mqtt import MqttBroker

        return MqttBroker(
            host=self.broker_host,
            port=self.broker_port,
            tls=self.tls,
            ca_certs=self.ca_certs,
            certfile=self.certfile,
            keyfile=self.keyfile,
            username=self.username,
            password=self.password,
        )


def load_ento_conf(path: str | Path = DEFAULT_CONFIG_PATH) -> EdgeConfig:
    path = Path(path)
    try:
        raw = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ConfigError(f"{path} is not JSON") from None
    device = data.get("device") if isinstance(data, dict) else None
    if not isinstance(device, dict):
        raise ConfigError(f'{path} has no "device" object')
    try:
        return config_from_device_section(device, base=path.parent)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        # No detail: a wrongly typed MQTT_PASSWORD would otherwise be echoed back.
        raise ConfigError(f"{path}: a device setting has the wrong type") from None


def config_from_device_section(device: dict, base: Path | None = None) -> EdgeConfig:
    def need(key: str) -> str:
        value = device.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"ento.conf: device.{key} must be a non-empty string")
        return value

    try:
        serial = safe_id(need("SERIAL_ID"), "SERIAL_ID")
    except BadName as exc:
        raise ConfigError(f"ento.conf: {exc}") from None
    buffer_dir = Path(need("STORAGE_PATH"))
    repo = device.get("IMAGE_REPO_PATH")
    repo_dir = Path(repo) if repo else buffer_dir.parent / "cameraImageRepo"
    cert_dir = Path(SEED_CERT_DIR)
    tls = bool(device.get("TLS", True))
    password = device.get("MQTT_PASSWORD")
    topics = eb.Topics(
        request=device.get("TOPIC_REQUEST", eb.Topics.request),
        urls=device.get("TOPIC_URLS", eb.Topics.urls),
        verified=device.get("TOPIC_VERIFIED", eb.Topics.verified),
    )
    batch_size = device.get("BATCH_SIZE", eb.DEFAULT_BATCH_SIZE)
    if type(batch_size) is not int or not 1 <= batch_size <= eb.MAX_REQUEST_FILES:
        raise ConfigError(f"ento.conf: BATCH_SIZE must be 1-{eb.MAX_REQUEST_FILES}")
    return EdgeConfig(
        serial=serial,
        buffer_dir=buffer_dir,
        repo_dir=repo_dir,
        broker_host=need("ENDPOINT_URL"),
        broker_port=int(device.get("PORT", SEED_MQTT_PORT)),
        tls=tls,
        ca_certs=device.get("ROOT_CA", str(cert_dir / "AmazonRootCA1.pem")) if tls else None,
        certfile=device.get("CERT", str(cert_dir / "certificate.pem.crt")) if tls else None,
        keyfile=device.get("PRIVATE_KEY", str(cert_dir / "private.pem.key")) if tls else None,
        username=device.get("MQTT_USERNAME"),
        password=SecretStr(password) if password else None,
        bucket_name=device.get("BUCKET_NAME", "camfleet"),
        batch_size=batch_size,
        topics=topics,
    )
