"""prefect.yaml deploys with `prefect deploy --all`; two process workers share the runs.

A PostgreSQL-backed Prefect server (what several machines would share), one work pool,
two workers on this machine, and ad-hoc runs started with `prefect deployment run`.
The deploy runs in a fresh clone (a copy of the repository's files somewhere else)
with no PWD in its environment: each deployment records that clone as the directory
its runs start in, and the workers run the flows from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from camfleet.localsvc import PrefectServerInstance

ROOT = Path(__file__).resolve().parent.parent
RUNS = 4


@pytest.fixture
def prefect_on_postgres(postgres):
    dsn = postgres.create_database("prefect_workers")
    with PrefectServerInstance(database_url=dsn) as server:
        yield server
    postgres.drop_database("prefect_workers")


def _prefect(args, env, timeout=180, cwd=ROOT):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.timeout(600)
def test_deploy_all_and_two_workers_share_runs(prefect_on_postgres, database_url, tmp_path):
    from tests.test_up import _fresh_clone

    clone = _fresh_clone(tmp_path / "elsewhere")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "PWD"}
    env.update(
        PREFECT_API_URL=prefect_on_postgres.api_url,
        PREFECT_HOME=str(tmp_path / "home"),
        DATABASE_URL=database_url,
        CAMFLEET_DATA_DIR=str(tmp_path / "data"),
    )
    _prefect(["work-pool", "create", "camfleet-process", "--type", "process"], env)
    deployed = _prefect(["deploy", "--all"], env, timeout=300, cwd=clone)
    assert "fleet-report/fleet-report" in deployed
    # Every deployment starts its runs in the clone it was deployed from.
    pulls = _pull_steps(env)
    assert len(pulls) >= 10, pulls
    for name, steps in pulls.items():
        assert steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(clone.resolve())}}
        ], name

    workers = [
        subprocess.Popen(
            [
                str(Path(sys.executable).parent / "prefect"),
                "worker",
                "start",
                "--pool",
                "camfleet-process",
                "--name",
                f"worker-{i}",
                "--limit",
                "2",
            ],
            env=env,
            cwd=tmp_path,
            stdout=open(tmp_path / f"worker-{i}.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for i in range(2)
    ]
    try:
        for i in range(RUNS):
            _prefect(
                [
                    "deployment",
                    "run",
                    "fleet-report/fleet-report",
                    "--param",
                    "days=1",
                    "--param",
                    f"out_dir={tmp_path / f'report-{i}'}",
                ],
                env,
            )
        states = _wait_for_runs(env, RUNS)
        assert states == ["COMPLETED"] * RUNS, states  # scheduled future runs not counted
        logs = [(tmp_path / f"worker-{i}.log").read_text() for i in range(2)]
        for i in range(RUNS):
            assert (tmp_path / f"report-{i}" / "captures.parquet").exists()
        # both workers polled the shared pool; runs went to whichever was free
        # both workers polled the one pool; together they ran every run exactly once
        assert all("submitted to infrastructure" in log for log in logs), logs
    finally:
        for worker in workers:
            os.killpg(worker.pid, 15)
            worker.wait(timeout=30)


def _pull_steps(env) -> dict[str, list]:
    import anyio
    from prefect.client.orchestration import PrefectClient

    async def read():
        async with PrefectClient(env["PREFECT_API_URL"]) as client:
            return {d.name: d.pull_steps for d in await client.read_deployments()}

    return anyio.run(read)


def _wait_for_runs(env, count, timeout=400):
    import anyio
    from prefect.client.orchestration import PrefectClient

    async def states():
        async with PrefectClient(env["PREFECT_API_URL"]) as client:
            # only the runs this test started: other deployments have their own schedules
            runs = await client.read_flow_runs()
            return sorted(
                r.state.type.value
                for r in runs
                if r.state and r.state.is_final() and "out_dir" in r.parameters
            )

    deadline = time.monotonic() + timeout
    while True:
        current = anyio.run(states)
        if len(current) >= count or time.monotonic() > deadline:
            return current
        time.sleep(2)
