"""The UI's Retry button on failed runs of served deployments, with results persisted.

(The served test takes minutes on a busy box, so it is `slow`; the first test proves
the same for a manual trigger in seconds.)

The Prefect UI retries a run by proposing the state the test proposes here
(`Scheduled`, named AwaitingRetry, "Retry from the UI", not forced). The served runner
then runs the same flow run again. With result persistence on (the serve default),
a cached task result must not stand in for work: a retried manual trigger makes a new
trigger, and a retried fleet report writes its files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_api_commands_helpers import add_device, fetch
from tests.test_serve import Serve, _client_call, _wait_state


def _retry_from_ui(run_id) -> None:
    from prefect.states import Scheduled

    async def retry(client):
        state = Scheduled(name="AwaitingRetry", message="Retry from the UI")
        result = await client.set_flow_run_state(run_id, state, force=False)
        assert result.status.value == "ACCEPT", result

    _client_call(retry)


def _task_run_names(run_id) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read(client):
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        return [t.name for t in runs]

    return _client_call(read)


def test_ui_retry_of_a_failed_manual_trigger_makes_a_new_trigger(
    prefect_api_url, database_url, monkeypatch, tmp_path
):
    """Fast: the same retry, with the run executed in this process (persistence on)."""
    from prefect.flow_engine import run_flow
    from prefect.settings import (
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    from camfleet.settings import get_settings
    from flows.triggers import manual_trigger

    add_device(database_url, "QUIET")
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    deployment_id = manual_trigger.to_deployment(name="manual-trigger").apply()

    async def create(client):
        return await client.create_flow_run_from_deployment(
            deployment_id, parameters={"device_id": "QUIET", "timeout_seconds": 0.2}
        )

    async def read(client):
        return await client.read_flow_run(run.id)

    settings = {
        PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results",
    }
    try:
        with temporary_settings(settings):
            run = _client_call(create)
            for _attempt in range(2):
                run = _client_call(read)
                state = run_flow(
                    manual_trigger, flow_run=run, parameters=run.parameters, return_type="state"
                )
                assert state.is_failed()
                if _attempt == 0:
                    _retry_from_ui(run.id)
    finally:
        get_settings.cache_clear()
    rows = fetch(database_url, "SELECT trigger_id, flow_run_id FROM scheduled_triggers")
    assert len({r[0] for r in rows}) == 2 and {r[1] for r in rows} == {str(run.id)}, rows


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ui_retry_of_failed_runs_redoes_their_work(prefect_api_url, database_url, tmp_path):
    from prefect.deployments import run_deployment

    add_device(database_url, "QUIET")  # never executes a trigger
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=prefect_api_url,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        DATABASE_URL=database_url,
        STORAGE_URL=(tmp_path / "objects").as_uri(),
        CAMFLEET_DATA_DIR=str(tmp_path / "data"),
    )
    server = Serve(env, tmp_path / "serve.log", "manual-trigger,fleet-report")
    blocked = tmp_path / "report"
    blocked.write_text("a file where the report directory should be")
    try:
        server.start()
        trigger_run = run_deployment(
            "manual-trigger/manual-trigger",
            parameters={"device_id": "QUIET", "timeout_seconds": 1},
            timeout=0,
        )
        report_run = run_deployment(
            "fleet-report/fleet-report",
            parameters={"days": 1, "out_dir": str(blocked)},
            timeout=0,
        )
        _wait_state(trigger_run.id, {"FAILED"})
        _wait_state(report_run.id, {"FAILED"})  # after its own automatic retry
        assert not any(Path(tmp_path).glob("report/*"))
        # results were persisted where serve put them
        assert any((tmp_path / "data" / "prefect-results").iterdir())

        _retry_from_ui(trigger_run.id)
        blocked.unlink()  # the user fixed the cause, then pressed Retry
        _retry_from_ui(report_run.id)

        _wait_state(report_run.id, {"COMPLETED"})
        assert (blocked / "captures.parquet").exists()  # written, not a cached result
        _wait_state(trigger_run.id, {"FAILED"})  # the device still does not answer...
        rows = fetch(
            database_url,
            "SELECT trigger_id, flow_run_id, status FROM scheduled_triggers ORDER BY created_at",
        )
        # ...but the retry made a second trigger rather than reusing the first one
        assert len({r[0] for r in rows}) == 2, rows
        assert {r[1] for r in rows} == {str(trigger_run.id)}
        assert {r[2] for r in rows} == {"failed"}
        names = _task_run_names(trigger_run.id)
        assert sum(n.startswith("create-manual-trigger") for n in names) == 2, names
    finally:
        server.stop()
