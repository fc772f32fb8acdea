"""Whether a command reports to a Prefect server: decided here, once, for every command.

A device (a Raspberry Pi beside a camera) reports its runs to a central Prefect server
when one is configured, and otherwise runs the very same steps without Prefect. It
never starts Prefect's temporary local server: on a slow or busy machine that server
misses its 20 s start-up deadline ("Timed out while attempting to connect to
ephemeral Prefect API server"), and a killed command leaves it running.

    url = prefect_mode.use_prefect(choice)   # choice: --prefect True, --no-prefect False,
    if url:                                  # neither None (= whether one is configured)
        with prefect_mode.reporting_to(url):
            flow(...)
    else:
        plain_steps(...)

"Configured" means what Prefect itself reads: PREFECT_API_URL in the environment, or
the active Prefect profile, `prefect.toml`, `pyproject.toml` or `.env`. Prefect is
imported only when one of those files exists and the variable is not set, so the
plain path loads no Prefect at all.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

API_URL_ENV = "PREFECT_API_URL"
# Prefect's switch for its temporary server (alias PREFECT_SERVER_ALLOW_EPHEMERAL_MODE).
EPHEMERAL_ENV = "PREFECT_SERVER_EPHEMERAL_ENABLED"

HOW_TO_CONFIGURE = (
    f"set {API_URL_ENV} to your Prefect server (e.g. http://prefect.example:4200/api), "
    "or run without Prefect (--no-prefect; the same steps, no flow run)"
)


class NoPrefectApi(RuntimeError):
    """Prefect was asked for, but no Prefect server is configured to report to."""

    def __init__(self, what: str = "this command"):
        super().__init__(
            f"{what} needs a Prefect server and none is configured: {HOW_TO_CONFIGURE}. "
            "camfleet never starts a temporary Prefect server on a device"
        )


def _prefect_config_files() -> bool:
    """Whether any file Prefect reads its settings from exists (cheap: no Prefect import)."""
    if os.environ.get("PREFECT_PROFILES_PATH"):
        return True
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    if (home / "profiles.toml").is_file():
        return True
    if Path("prefect.toml").is_file() or Path(".env").is_file():
        return True
    pyproject = Path("pyproject.toml")
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if pyproject.is_file() and "tool.prefect" in pyproject.read_text():
            return True
    return False


def api_url() -> str | None:
    """The Prefect API this process would report to, or None (never a temporary server)."""
    value = os.environ.get(API_URL_ENV)
    if value is not None:
        return value.strip() or None  # set but empty: explicitly none
    if not _prefect_config_files():
        return None
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return (str(url).strip() or None) if url else None


def use_prefect(choice: bool | None, what: str = "this command") -> str | None:
    """The API URL to report to, or None to run without Prefect.

    choice None: Prefect when a server is configured. True: a server is required
    (NoPrefectApi otherwise). False: never.
    """
    if choice is False:
        return None
    url = api_url()
    if url is None and choice:
        raise NoPrefectApi(what)
    return url


def refuse(exc: NoPrefectApi):
    """The CLI's answer to NoPrefectApi: the message on stderr, exit code 2 (usage)."""
    import typer

    typer.echo(f"Error: {exc}", err=True)
    return typer.Exit(2)


def require_api(what: str = "this command") -> str:
    """For commands that only make sense with a server (serving a deployment)."""
    url = use_prefect(True, what)
    assert url is not None
    return url


@contextlib.contextmanager
def prefect_env(*, refresh: bool = True, **values: str) -> Iterator[None]:
    """Set PREFECT_* variables for a while, for this process and the children it starts,
    and put them back afterwards (unset ones unset again).

    Prefect reads the environment once, into a process-global settings context that
    every thread without a context of its own falls back to (the assembler's recorder,
    the signer's hand-off); it is rebuilt both ways when Prefect is already loaded, so
    those threads follow too (unless ``refresh=False``). The plain path still loads no
    Prefect.
    """
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    if refresh:
        _refresh_prefect_settings()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if refresh:
            _refresh_prefect_settings()


def _refresh_prefect_settings() -> None:
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def reporting_to(url: str) -> contextlib.AbstractContextManager[None]:
    """Run Prefect code against `url` only: Prefect may not fall back to a temporary
    server if the URL turns out unreachable (it fails instead, and says so).

    Prefect's global settings context is left alone: in a command's process Prefect is
    first imported after these are set (this module imports none of it) and reads
    them then, and a process that already runs Prefect for something else (a service,
    the test session) keeps its own server for that."""
    return prefect_env(refresh=False, **{API_URL_ENV: url, EPHEMERAL_ENV: "false"})
