"""The Docker work-pool variant registers with `prefect deploy --all` (no Docker needed).

`python -m deployments.docker` derives prefect-docker.yaml from prefect.yaml. The fast
test checks the derivation; the slow one creates a `docker` work pool on a private
Prefect server and deploys the derived file with Prefect's own CLI, then reads every
deployment back: on the Docker pool, the image from CAMFLEET_IMAGE, the blocks' env,
the pull step into the image's checkout, the same schedules as prefect.yaml.
No container is started (no Docker on the test machine): running them is untested.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import yaml

from deployments import docker, serve

ROOT = Path(__file__).resolve().parent.parent


def test_every_central_deployment_moves_to_the_docker_pool_and_nothing_else_changes():
    process = {d["name"]: d for d in serve.served_definitions()}
    config = docker.docker_config()
    derived = {d["name"]: d for d in config["deployments"]}
    assert set(derived) == set(process)  # device-side ones stay on the cameras
    pool = yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["docker_pool"]
    for name, d in derived.items():
        assert d["work_pool"] == pool
        assert {k: v for k, v in d.items() if k != "work_pool"} == {
            k: v for k, v in process[name].items() if k != "work_pool"
        }
    assert config["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/camfleet"}}
    ]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prefect_deploy_all_registers_the_docker_variant(tmp_path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from camfleet.localsvc import PrefectServerInstance

    derived = tmp_path / "prefect-docker.yaml"
    derived.write_text(
        subprocess.run(
            [sys.executable, "-m", "deployments.docker"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    with PrefectServerInstance(home=tmp_path / "server") as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_API_URL=server.api_url,
            PREFECT_HOME=str(tmp_path / "client"),
            CAMFLEET_IMAGE="registry.example/camfleet:test",
        )
        prefect = [str(Path(sys.executable).parent / "prefect"), "--no-prompt"]
        for args in (
            ["work-pool", "create", "camfleet-docker", "--type", "docker"],
            ["deploy", "--all", "--prefect-file", str(derived)],
        ):
            done = subprocess.run(
                prefect + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

        async def read():
            async with get_client() as client:
                return await client.read_deployments()

        with temporary_settings({PREFECT_API_URL: server.api_url}):
            deployments = {d.name: d for d in anyio.run(read)}

    process = {d["name"]: d for d in serve.served_definitions()}
    assert set(deployments) == set(process)
    for name, d in deployments.items():
        assert d.work_pool_name == "camfleet-docker", name
        assert d.job_variables["image"] == "registry.example/camfleet:test", name
        assert d.job_variables["env"] == {
            "CAMFLEET_DATABASE_BLOCK": "default",
            "STORAGE_URL": "block://camfleet-s3-bucket/default",
        }
        assert d.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/camfleet"}}
        ]
        assert len(d.schedules) == len(process[name].get("schedules") or []), name
