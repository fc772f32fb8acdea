"""Every block saves and loads through a real Prefect server; secrets stay masked."""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr

import blocks
from camfleet.commands.blocks import blocks_from_env

SECRET = "s3cr3t-Value-42"


def _examples():
    return [
        blocks.MqttBroker(host="127.0.0.1", port=8883, tls=True, username="u", password=SECRET),
        blocks.PostgresDatabase(host="127.0.0.1", dbname="camfleet", password=SECRET),
        blocks.SftpServer(host="127.0.0.1", username="u", private_key=SECRET, passphrase=SECRET),
        blocks.S3Bucket(bucket="b", access_key_id="AKIA", secret_access_key=SECRET),
        blocks.SupabaseProject(url="http://127.0.0.1:1", service_role_key=SECRET),
        blocks.CamfleetSecrets(secret_key=SECRET),
    ]


@pytest.mark.parametrize("block", _examples(), ids=lambda b: type(b).__name__)
def test_block_saves_loads_and_masks_secrets(prefect_api_url, block, caplog):
    name = f"test-{type(block).__name__.lower()}"
    block.save(name, overwrite=True)
    loaded = type(block).load(name)
    assert loaded.model_dump() == block.model_dump()
    secrets = [v for v in loaded.model_dump().values() if isinstance(v, SecretStr)]
    assert secrets and all(s.get_secret_value() == SECRET for s in secrets)

    with caplog.at_level(logging.DEBUG):
        logging.getLogger("camfleet.test").info("loaded %r %s", loaded, loaded)
    assert SECRET not in repr(loaded) and SECRET not in str(loaded)
    assert SECRET not in caplog.text
    if hasattr(loaded, "describe"):
        assert SECRET not in loaded.describe()


def test_secrets_stay_out_of_exceptions():
    with pytest.raises(Exception) as excinfo:
        blocks.MqttBroker(host="h", port="not-a-port", password=SECRET)
    assert SECRET not in str(excinfo.value)
    with pytest.raises(ValueError) as excinfo:
        blocks.PostgresDatabase.from_url(f"mysql://u:{SECRET}@h/db")
    assert SECRET not in str(excinfo.value)


def test_blocks_from_env_uses_the_seed_variable_names(monkeypatch):
    monkeypatch.setenv("MQTT_HOST", "127.0.0.1")
    monkeypatch.setenv("MQTT_PORT", "8883")
    monkeypatch.setenv("MQTT_TLS", "true")
    monkeypatch.setenv("MQTT_USERNAME", "fleet")
    monkeypatch.setenv("MQTT_PASSWORD", SECRET)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://cam:{SECRET}@127.0.0.1:5432/fleet")
    monkeypatch.setenv("SUPABASE_URL", "http://127.0.0.1:54321")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE", SECRET)
    monkeypatch.setenv("SUPABASE_STORAGE_BUCKET", "gxp-captures")
    found = blocks_from_env()
    mqtt = found["camfleet-mqtt-broker"]
    assert (mqtt.host, mqtt.port, mqtt.tls, mqtt.username) == ("127.0.0.1", 8883, True, "fleet")
    assert mqtt.password.get_secret_value() == SECRET
    pg = found["camfleet-postgres"]
    assert (pg.user, pg.dbname) == ("cam", "fleet") and SECRET in pg.dsn()
    assert found["camfleet-supabase-project"].bucket == "gxp-captures"
    assert all(SECRET not in repr(b) for b in found.values())


def test_blocks_from_env_cli_saves_blocks(prefect_api_url, run_cli):
    env = {
        "MQTT_HOST": "127.0.0.1",
        "MQTT_PASSWORD": SECRET,
        "PREFECT_API_URL": prefect_api_url,
        "DATABASE_URL": f"postgresql://cam:{SECRET}@127.0.0.1:5432/fleet",
    }
    result = run_cli(["camfleet", "blocks", "from-env", "--name", "from-env-test"], env=env)
    assert "saved camfleet-mqtt-broker/from-env-test" in result.stdout
    assert SECRET not in result.stdout + result.stderr
    loaded = blocks.MqttBroker.load("from-env-test")
    assert loaded.password.get_secret_value() == SECRET
    assert blocks.PostgresDatabase.load("from-env-test").user == "cam"


def test_resolve_loads_blocks_inside_async_flows(prefect_api_url):
    import asyncio

    from prefect import flow

    from camfleet import resolve

    blocks.PostgresDatabase(host="127.0.0.1", dbname="fleet", password=SECRET).save(
        "resolve-test", overwrite=True
    )
    blocks.MqttBroker(host="127.0.0.1", port=1884).save("resolve-test", overwrite=True)

    @flow
    async def uses_blocks() -> tuple[str, int]:
        return resolve.database_url("resolve-test"), resolve.mqtt_broker("resolve-test").port

    dsn, port = asyncio.run(uses_blocks())
    assert dsn.startswith("postgresql://postgres:") and dsn.endswith("/fleet?sslmode=prefer")
    assert port == 1884
    assert resolve.database_url("resolve-test") == dsn  # and the same outside a flow
