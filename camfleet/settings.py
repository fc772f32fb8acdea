"""Settings from the environment, under the seed systems' own variable names.

Every setting here has an environment variable (shown by `camfleet config`); the
credentials among them can instead live in Prefect Blocks (see `blocks/`), which is
what a deployment should use. Environment variables are the quick start.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    # Where `camfleet up` keeps its local PostgreSQL cluster, objects and logs.
    data_dir: Path = Field(Path(".camfleet"), validation_alias="CAMFLEET_DATA_DIR")

    # --- PostgreSQL (seed 003: DATABASE_URL) --------------------------------------
    database_url: SecretStr | None = Field(None, validation_alias="DATABASE_URL")
    database_block: str | None = Field(None, validation_alias="CAMFLEET_DATABASE_BLOCK")

    # --- Object storage: file:///dir, s3://bucket/prefix, supabase://bucket -------
    storage_url: str | None = Field(None, validation_alias="STORAGE_URL")

    # --- MQTT (seed 002) -----------------------------------------------------------
    mqtt_block: str | None = Field(None, validation_alias="CAMFLEET_MQTT_BLOCK")
    mqtt_host: str = Field("127.0.0.1", validation_alias="MQTT_HOST")
    mqtt_port: int = Field(1883, validation_alias="MQTT_PORT")
    mqtt_tls: bool = Field(False, validation_alias="MQTT_TLS")
    mqtt_username: str | None = Field(None, validation_alias="MQTT_USERNAME")
    mqtt_password: SecretStr | None = Field(None, validation_alias="MQTT_PASSWORD")
    mqtt_ca_certs: str | None = Field(None, validation_alias="MQTT_CA_CERTS")
    mqtt_certfile: str | None = Field(None, validation_alias="MQTT_CERTFILE")
    mqtt_keyfile: str | None = Field(None, validation_alias="MQTT_KEYFILE")
    mqtt_client_id: str | None = Field(None, validation_alias="MQTT_CLIENT_ID")
    topic_pattern_data: str = Field("ESP32CAM/+/data", validation_alias="TOPIC_PATTERN_DATA")
    topic_pattern_status: str = Field("ESP32CAM/+/status", validation_alias="TOPIC_PATTERN_STATUS")
    topic_pattern_ack: str = Field("ESP32CAM/+/ack", validation_alias="TOPIC_PATTERN_ACK")

    # --- Chunk assembly (seed 002) -------------------------------------------------
    capture_timeout_ms: int = Field(60_000, validation_alias="CAPTURE_TIMEOUT_MS")
    retransmit_delay_ms: int = Field(3_000, validation_alias="RETRANSMIT_DELAY_MS")
    retransmit_max: int = Field(3, validation_alias="RETRANSMIT_MAX")

    # --- Supabase (seed 002) -------------------------------------------------------
    supabase_block: str | None = Field(None, validation_alias="CAMFLEET_SUPABASE_BLOCK")
    supabase_url: str | None = Field(None, validation_alias="SUPABASE_URL")
    supabase_service_role: SecretStr | None = Field(None, validation_alias="SUPABASE_SERVICE_ROLE")
    supabase_storage_bucket: str = Field("gxp-captures", validation_alias="SUPABASE_STORAGE_BUCKET")

    # --- S3-compatible storage (boto3's own variable names) ------------------------
    s3_block: str | None = Field(None, validation_alias="CAMFLEET_S3_BLOCK")
    s3_endpoint_url: str | None = Field(
        None, validation_alias=AliasChoices("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
    )
    aws_region: str = Field(
        "us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    aws_access_key_id: str | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: SecretStr | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")

    # --- Device API and signer -----------------------------------------------------
    # Server secret keying device-token and pairing-code hashes and local upload URLs.
    secret_key: SecretStr | None = Field(None, validation_alias="CAMFLEET_SECRET_KEY")
    secrets_block: str | None = Field(None, validation_alias="CAMFLEET_SECRETS_BLOCK")
    api_host: str = Field("127.0.0.1", validation_alias="CAMFLEET_API_HOST")
    api_port: int = Field(8000, validation_alias="CAMFLEET_API_PORT")
    # Base URL devices use to reach the API (for local-storage upload URLs).
    public_url: str | None = Field(None, validation_alias="CAMFLEET_PUBLIC_URL")

    # --- Command delivery (docs/triggers.md, "Settings") -----------------------------
    # The seed sends a keepalive every 30 s; proxies drop idle streams after ~60 s.
    sse_ping_seconds: float = Field(30.0, validation_alias="CAMFLEET_SSE_PING_SECONDS", gt=0)
    # The seed's mode: devices identified by id only and triggers created without an
    # API key. Only for a trusted network; an operator must turn it on explicitly.
    allow_device_id_only: bool = Field(False, validation_alias="CAMFLEET_ALLOW_DEVICE_ID_ONLY")
    api_instance_id: str | None = Field(None, validation_alias="CAMFLEET_API_INSTANCE_ID")
    # MQTT delivery of the same commands for devices whose config has
    # {"trigger": {"transport": "mqtt"}} (ESP32-CAMs that listen on a cmd topic).
    trigger_mqtt: bool = Field(False, validation_alias="CAMFLEET_TRIGGER_MQTT")
    trigger_topic: str = Field(
        "ESP32CAM/{device_id}/cmd", validation_alias="CAMFLEET_TRIGGER_TOPIC"
    )

    # --- Device API rate limits (services/api/ratelimit.py; None: its default) ----------
    rate_limits: bool = Field(True, validation_alias="CAMFLEET_RATE_LIMITS")
    # postgresql (shared by every instance), memory (this process) or a redis:// URL.
    rate_limit_storage: str = Field("postgresql", validation_alias="CAMFLEET_RATE_LIMIT_STORAGE")
    rate_limit_device: str | None = Field(None, validation_alias="CAMFLEET_RATE_LIMIT_DEVICE")
    rate_limit_user: str | None = Field(None, validation_alias="CAMFLEET_RATE_LIMIT_USER")
    rate_limit_pair: str | None = Field(None, validation_alias="CAMFLEET_RATE_LIMIT_PAIR")
    rate_limit_activate: str | None = Field(None, validation_alias="CAMFLEET_RATE_LIMIT_ACTIVATE")
    rate_limit_activate_fail: str | None = Field(
        None, validation_alias="CAMFLEET_RATE_LIMIT_ACTIVATE_FAIL"
    )
    rate_limit_trigger: str | None = Field(None, validation_alias="CAMFLEET_RATE_LIMIT_TRIGGER")
    rate_limit_capture: str | None = Field(None, validation_alias="CAMFLEET_RATE_LIMIT_CAPTURE")
    rate_limit_stream: str | None = Field(None, validation_alias="CAMFLEET_RATE_LIMIT_STREAM")

    # --- Device API bodies and uploads (services/api/bodies.py, routes_devices.py) -----
    # None: the default documented next to the code that uses it.
    body_idle_timeout_s: float | None = Field(
        None, validation_alias="CAMFLEET_BODY_IDLE_TIMEOUT_S", gt=0
    )
    capture_body_deadline_s: float | None = Field(
        None, validation_alias="CAMFLEET_CAPTURE_BODY_DEADLINE_S", gt=0
    )
    max_concurrent_uploads: int | None = Field(
        None, validation_alias="CAMFLEET_MAX_CONCURRENT_UPLOADS", gt=0
    )
    max_uploads_per_device: int | None = Field(
        None, validation_alias="CAMFLEET_MAX_UPLOADS_PER_DEVICE", gt=0
    )
    # Comma-separated content types devices may upload.
    upload_content_types: str | None = Field(None, validation_alias="CAMFLEET_UPLOAD_CONTENT_TYPES")
    max_upload_bytes: int | None = Field(None, validation_alias="CAMFLEET_MAX_UPLOAD_BYTES", gt=0)
    # Off only to measure what the check costs (bench/bench_lifelog_ingest.py).
    ingest_check_object: bool = Field(True, validation_alias="CAMFLEET_INGEST_CHECK_OBJECT")

    # --- Flows (flows/): read by each run with a fresh Settings(), so that a retry or
    # the next scheduled run sees a corrected value or a restarted stack ------------------
    # The uploader's config file (seed 001's config.json) when a run names none.
    uploader_config: str = Field("config.json", validation_alias="CAMFLEET_UPLOADER_CONFIG")
    # Readiness URLs fleet-health checks (a JSON object name -> URL; `camfleet up` writes it).
    service_urls: str | None = Field(None, validation_alias="CAMFLEET_SERVICE_URLS")
    # Retention (flows/maintenance.py): finished flow runs, the MQTT publish log (the
    # fleet report's default window) and device status rows (one per wake).
    flow_run_retention_days: int = Field(
        14, validation_alias="CAMFLEET_FLOW_RUN_RETENTION_DAYS", ge=1
    )
    publish_log_retention_days: int = Field(
        7, validation_alias="CAMFLEET_PUBLISH_LOG_RETENTION_DAYS", ge=1
    )
    device_status_retention_days: int = Field(
        30, validation_alias="CAMFLEET_DEVICE_STATUS_RETENTION_DAYS", ge=1
    )

    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Lowest priority: what a running `camfleet up` wrote (camfleet/stackfile.py), so
        # commands in another terminal find its database, broker and API unexported.
        from camfleet import stackfile

        running_stack = InitSettingsSource(settings_cls, stackfile.settings_values())
        return (init_settings, env_settings, dotenv_settings, running_stack, file_secret_settings)

    def resolved_storage_url(self) -> str:
        """STORAGE_URL, or a local directory under the data dir (the default backend)."""
        if self.storage_url:
            return self.storage_url
        return (self.data_dir / "objects").resolve().as_uri()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
