"""One settings model (camfleet/settings.py) for every service and command (issue 17).

The device API's command delivery, rate limits, body limits and upload checks used to
read os.environ or a second settings class of their own; each is now a field of
`Settings`, and these tests check that every one is honoured from its environment
variable (and that unset ones keep the defaults documented beside the code). The
commands take a block name, never a database URL (a password in the process list).
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from camfleet.settings import Settings, get_settings
from services.api import bodies, ratelimit
from services.api.routes_devices import DEFAULT_CONTENT_TYPES, MAX_UPLOAD_BYTES, DeviceApiConfig

API_VARIABLES = [
    str(field.validation_alias)
    for field in Settings.model_fields.values()
    if str(field.validation_alias).startswith("CAMFLEET_")
]


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No camfleet variable from the session, no .env, no running stack's settings."""
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        for name in getattr(alias, "choices", [alias]):
            monkeypatch.delenv(str(name), raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAMFLEET_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("variable", "text", "field", "value"),
    [
        ("CAMFLEET_SSE_PING_SECONDS", "2.5", "sse_ping_seconds", 2.5),
        ("CAMFLEET_ALLOW_DEVICE_ID_ONLY", "true", "allow_device_id_only", True),
        ("CAMFLEET_API_INSTANCE_ID", "api-7", "api_instance_id", "api-7"),
        ("CAMFLEET_TRIGGER_MQTT", "on", "trigger_mqtt", True),
        ("CAMFLEET_TRIGGER_TOPIC", "cam/{device_id}/c", "trigger_topic", "cam/{device_id}/c"),
    ],
)
def test_command_delivery_settings_from_the_environment(clean_env, variable, text, field, value):
    assert getattr(Settings(), field) != value  # the default differs, so the test can fail
    clean_env.setenv(variable, text)
    assert getattr(Settings(), field) == value


def test_a_dotenv_file_is_read_like_the_environment(clean_env, tmp_path):
    (tmp_path / ".env").write_text("CAMFLEET_SSE_PING_SECONDS=7\n")
    assert Settings().sse_ping_seconds == 7.0


def test_invalid_values_are_refused(clean_env):
    clean_env.setenv("CAMFLEET_SSE_PING_SECONDS", "0")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize("name", ratelimit.LIMIT_NAMES)
def test_each_rate_limit_from_the_environment(clean_env, name):
    default = ratelimit.RateLimits()
    assert getattr(ratelimit.RateLimits.from_settings(), name) == getattr(default, name)
    clean_env.setenv(f"CAMFLEET_RATE_LIMIT_{name.upper()}", "3/second")
    limits = ratelimit.RateLimits.from_settings()
    assert getattr(limits, name) == "3/second"
    assert [str(item) for item in limits.items(name)] == ["3 per 1 second"]
    others = [n for n in ratelimit.LIMIT_NAMES if n != name]
    assert all(getattr(limits, n) == getattr(default, n) for n in others)


def test_rate_limit_switch_and_storage_from_the_environment(clean_env):
    limits = ratelimit.RateLimits.from_settings()
    assert limits.enabled and limits.storage == "postgresql"
    clean_env.setenv("CAMFLEET_RATE_LIMITS", "off")
    clean_env.setenv("CAMFLEET_RATE_LIMIT_STORAGE", "memory")
    limits = ratelimit.RateLimits.from_settings()
    assert not limits.enabled and limits.storage == "memory"
    clean_env.setenv("CAMFLEET_RATE_LIMIT_STORAGE", "sqlite://nope")
    with pytest.raises(ValueError, match="CAMFLEET_RATE_LIMIT_STORAGE"):
        ratelimit.RateLimits.from_settings()


def test_body_limits_from_the_environment(clean_env):
    assert bodies.BodyLimits.from_settings() == bodies.BodyLimits()
    clean_env.setenv("CAMFLEET_BODY_IDLE_TIMEOUT_S", "3")
    clean_env.setenv("CAMFLEET_CAPTURE_BODY_DEADLINE_S", "9")
    clean_env.setenv("CAMFLEET_MAX_CONCURRENT_UPLOADS", "5")
    clean_env.setenv("CAMFLEET_MAX_UPLOADS_PER_DEVICE", "2")
    assert bodies.BodyLimits.from_settings() == bodies.BodyLimits(
        idle_timeout_s=3.0, deadline_s=9.0, max_concurrent_uploads=5, max_uploads_per_device=2
    )


def test_upload_settings_from_the_environment(clean_env):
    config = DeviceApiConfig.from_settings()
    assert config.content_types == DEFAULT_CONTENT_TYPES
    assert config.max_upload_bytes == MAX_UPLOAD_BYTES and config.check_object
    clean_env.setenv("CAMFLEET_UPLOAD_CONTENT_TYPES", "image/png, image/webp")
    clean_env.setenv("CAMFLEET_MAX_UPLOAD_BYTES", "1234")
    clean_env.setenv("CAMFLEET_INGEST_CHECK_OBJECT", "off")
    config = DeviceApiConfig.from_settings()
    assert config.content_types == ("image/png", "image/webp")
    assert config.max_upload_bytes == 1234 and not config.check_object


def test_every_api_setting_is_shown_by_camfleet_config(clean_env):
    """`camfleet config` lists each setting with its variable: none is hidden in code."""
    from camfleet.cli import app

    out = CliRunner().invoke(app, ["config"], env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    missing = [v for v in API_VARIABLES if v not in out.output]
    assert missing == []
    assert "CAMFLEET_RATE_LIMIT_STORAGE" in API_VARIABLES  # the list itself is not empty


def test_assembler_takes_a_database_block_not_a_url(clean_env):
    """No password on the command line: --database-url is gone; the database comes from
    the environment or the named block, through camfleet.resolve like every command."""
    from camfleet.cli import app

    runner = CliRunner()
    refused = runner.invoke(app, ["assembler", "--database-url", "postgresql://u:pw@h/db"])
    assert refused.exit_code == 2 and "No such option" in refused.output
    # Neither DATABASE_URL nor a block nor a running stack: it says what to set.
    missing = runner.invoke(app, ["assembler", "--no-prefect"])
    assert missing.exit_code == 2
    assert "DATABASE_URL" in missing.output and "camfleet-postgres block" in missing.output
