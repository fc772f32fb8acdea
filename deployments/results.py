"""Result persistence for served flow runs: on by default, stored where the user says.

Persisted results let a retried run (the UI's Retry, or a flow's own retries) reuse
what its completed tasks returned instead of redoing them, and let the UI show each
run's result. Every camfleet task declares its cache policy (NO_CACHE where a call has
side effects), so persistence never turns a repeated call into a skipped one.

Settings (environment, read when `camfleet up` / `python -m deployments.serve` starts):

    CAMFLEET_RESULTS_PERSIST       "false" turns persistence off (default on)
    CAMFLEET_RESULT_STORAGE        a Prefect block slug, e.g. "s3-bucket/camfleet-results"
                                   (created with prefect-aws or any WritableFileSystem
                                   block); default: a local directory
    CAMFLEET_RESULTS_DIR           that local directory (default <data dir>/prefect-results)

Explicit PREFECT_RESULTS_* variables win over these.
"""

from __future__ import annotations

import os
from pathlib import Path

FALSE = {"0", "false", "no", "off"}


def result_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The PREFECT_RESULTS_* variables for served runs, given the camfleet ones."""
    env = dict(os.environ if env is None else env)
    persist = env.get("CAMFLEET_RESULTS_PERSIST", "true").strip().lower() not in FALSE
    out = {"PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true" if persist else "false"}
    if block := env.get("CAMFLEET_RESULT_STORAGE", "").strip():
        out["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = block
    else:
        out["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(results_dir(env))
    return out


def results_dir(env: dict[str, str]) -> Path:
    if explicit := env.get("CAMFLEET_RESULTS_DIR"):
        return Path(explicit).resolve()
    from camfleet.settings import get_settings

    return get_settings().data_dir.resolve() / "prefect-results"


def apply_result_settings() -> dict[str, str]:
    """Set them in this process's environment (not overriding PREFECT_* already set)."""
    applied = {}
    for key, value in result_environment().items():
        if key not in os.environ:
            os.environ[key] = applied[key] = value
    if path := applied.get("PREFECT_RESULTS_LOCAL_STORAGE_PATH"):
        Path(path).mkdir(parents=True, exist_ok=True)
    return applied
