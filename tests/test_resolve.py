"""CLI commands beside a running `camfleet up` find its database and server secret with
nothing exported: the cluster's port from its postmaster.pid, the secret `up` generated."""

from __future__ import annotations

import pytest

from camfleet import resolve
from camfleet.settings import get_settings


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    for name in ("DATABASE_URL", "CAMFLEET_SECRET_KEY", "CAMFLEET_DATABASE_BLOCK",
                 "CAMFLEET_SECRETS_BLOCK"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CAMFLEET_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_database_of_a_running_local_cluster(data_dir):
    with pytest.raises(RuntimeError, match="no database configured"):
        resolve.database_url()
    (data_dir / "postgres").mkdir()
    pid = "4242\n/data/postgres\n1700000000\n25432\n/data/postgres\n127.0.0.1\n"
    (data_dir / "postgres" / "postmaster.pid").write_text(pid)
    assert resolve.database_url() == "postgresql://postgres@127.0.0.1:25432/camfleet"


def test_configured_database_wins_over_the_local_cluster(data_dir, monkeypatch):
    (data_dir / "postgres").mkdir()
    (data_dir / "postgres" / "postmaster.pid").write_text("1\nx\n2\n25432\n")
    monkeypatch.setenv("DATABASE_URL", "postgresql://db.invalid/x")
    get_settings.cache_clear()
    assert resolve.database_url() == "postgresql://db.invalid/x"


def test_secret_generated_by_up_is_used_when_none_is_configured(data_dir, monkeypatch):
    with pytest.raises(RuntimeError, match="no server secret"):
        resolve.secret_key()
    (data_dir / "secret_key").write_text("generated-by-up\n")
    assert resolve.secret_key() == b"generated-by-up"
    monkeypatch.setenv("CAMFLEET_SECRET_KEY", "configured")
    get_settings.cache_clear()
    assert resolve.secret_key() == b"configured"
