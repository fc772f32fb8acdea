"""Fixtures: real services on private loopback ports (camfleet.localsvc).

Session-scoped instances are shared by every test: never kill() or stop() them. A
test that breaks a service on purpose starts its own (`with MosquittoInstance() as m:`;
mosquitto and sshd start in tens of milliseconds, PostgreSQL in under a second).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator

import pytest

from camfleet.commands.prefect_mode import prefect_env
from camfleet.localsvc import (
    MosquittoInstance,
    PostgresInstance,
    PrefectServerInstance,
    S3Instance,
    SshdInstance,
    run_command,
)

TEMPLATE_DB = "camfleet_template"

# Subprocesses find the `camfleet` command of the interpreter running the tests, even
# when the virtualenv is not activated.
os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresInstance]:
    """One PostgreSQL for the session (fsync off). Use `database_url` for a fresh DB."""
    with PostgresInstance(fast=True) as pg:
        yield pg


@pytest.fixture(scope="session")
def _template_db(postgres: PostgresInstance) -> str:
    """A database with every migration applied, copied for each test (copy: ~50 ms)."""
    from camfleet import db

    dsn = postgres.create_database(TEMPLATE_DB)
    db.migrate(dsn)  # closes its connection: a template must have no sessions
    return TEMPLATE_DB


@pytest.fixture
def database_url(postgres: PostgresInstance, _template_db: str) -> Iterator[str]:
    """DSN of a fresh, fully migrated database of this test's own; dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    dsn = postgres.create_database(name, template=_template_db)
    yield dsn
    postgres.drop_database(name)


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoInstance]:
    """A plain broker: anonymous, no TLS. Attributes .host, .port."""
    with MosquittoInstance() as broker:
        yield broker


@pytest.fixture(scope="session")
def mosquitto_tls() -> Iterator[MosquittoInstance]:
    """Mutual TLS + password: .ca_file, .client_cert, .client_key, .username, .password."""
    with MosquittoInstance(tls=True, password=True) as broker:
        yield broker


@pytest.fixture(scope="session")
def sshd() -> Iterator[SshdInstance]:
    """OpenSSH sshd with SFTP; .root is the remote base directory for tests."""
    with SshdInstance() as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Instance]:
    """moto's S3 server: .endpoint_url, .access_key, .secret_key, .region."""
    with S3Instance() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Instance) -> str:
    """Name of a fresh, empty bucket on the session S3 server."""
    return s3.create_bucket(f"test-{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
def prefect_server(postgres: PostgresInstance) -> Iterator[PrefectServerInstance]:
    """A real Prefect server for the session, its state in the session PostgreSQL.

    Not prefect_test_harness: the harness keeps the server's state in SQLite, which
    answers "database is locked" when several flows and services write at once on a
    busy machine, and a test then fails for the harness' sake. `.processes()` gives
    the server's processes (a test may suspend and resume them, never stop them).
    """
    dsn = postgres.create_database("prefect_server")
    with PrefectServerInstance(database_url=dsn) as server:
        yield server


@pytest.fixture(scope="session")
def prefect_api_url(prefect_server: PrefectServerInstance) -> Iterator[str]:
    """The session Prefect server's API URL, exported as PREFECT_API_URL for this
    process and the subprocesses tests start.

    Prefect reads the environment once, into a process-global settings context that
    every thread falls back to; it is refreshed here so a flow run from a service's
    own thread finds this server too (instead of starting a temporary one).
    """
    url = prefect_server.api_url
    with prefect_env(PREFECT_API_URL=url):
        yield url


@pytest.fixture
def run_cli():
    """run_cli(args, timeout=60, env=None, cwd=None, input=None, check=True).

    Runs a command-line tool as a subprocess and returns the CompletedProcess with
    text stdout/stderr; a non-zero exit (with check=True) fails with both streams shown.
    `env` entries are added to the current environment.
    """
    return run_command
