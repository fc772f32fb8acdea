"""One direction of dependencies for the device-side library (issue 17).

camfleet/uploader and camfleet/edge are the adapters and protocol code a device runs;
tasks/ and flows/ wrap them in Prefect, services/ use them. Nothing in these packages
may import Prefect, tasks/, flows/ or services/ when it is imported, so a device that
has no Prefect server (or a slow one) loads none of it. Each check runs in a fresh
interpreter: the test process itself has Prefect loaded already.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEVICE_PACKAGES = ("camfleet/uploader", "camfleet/edge")
# Top-level packages the device library must not load: the Prefect layer and above.
UPPER_LAYERS = ("prefect", "tasks", "flows", "services", "deployments", "blocks")


def device_modules() -> list[str]:
    names = []
    for package in DEVICE_PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names + ["camfleet.targets"]


def loaded_upper_layers(code: str) -> list[str]:
    """Run `code` in a fresh interpreter; the upper-layer modules it left loaded."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in {UPPER_LAYERS!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_camfleet_uploader_loads_no_prefect():
    # The issue's own check, verbatim.
    assert loaded_upper_layers("import camfleet.uploader") == []


def test_every_device_module_imports_without_the_prefect_layer():
    imports = "\n".join(f"import {name}" for name in device_modules())
    imports += "\nfrom camfleet.uploader import DataUploader, UploaderConfig"
    assert loaded_upper_layers(imports) == []


def test_building_an_uploader_from_a_seed_config_loads_no_prefect(tmp_path):
    """The device's whole start-up path: config file -> DataUploader, no block named."""
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "uploader": {
                    "pending_dir": "pending",
                    "sftp": {"host": "127.0.0.1", "username": "u", "ssh_key_path": "k"},
                    "database": {"host": "127.0.0.1", "password": "pw"},
                }
            }
        )
    )
    code = (
        "from camfleet.uploader import DataUploader, UploaderConfig\n"
        f"up = DataUploader(UploaderConfig.from_file({str(config)!r}))\n"
        "assert up.config.database.dsn().startswith('postgresql://')\n"
    )
    assert loaded_upper_layers(code) == []


@pytest.mark.parametrize("package", DEVICE_PACKAGES)
def test_no_module_level_import_of_an_upper_layer(package):
    """Static: a function may import a saved block lazily (only when one is named);
    the module itself never imports anything above it."""
    offenders = []
    for path in sorted((ROOT / package).glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:  # module level only
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in UPPER_LAYERS]
    assert offenders == []


def test_the_prefect_wrappers_point_down_at_the_adapters():
    """tasks/ re-exports the adapters (flows keep their imports) rather than owning them."""
    import camfleet.uploader.session as session
    import camfleet.uploader.sftp as sftp
    import tasks.database
    import tasks.sftp

    assert tasks.sftp.SftpConnection is sftp.SftpConnection
    assert tasks.database.EventSession is session.EventSession
    # The blocks are the same models as the config sections, so either one is accepted.
    from blocks.postgres import PostgresDatabase
    from blocks.sftp import SftpServer
    from camfleet.targets import PostgresSettings, SftpSettings

    assert issubclass(SftpServer, SftpSettings) and issubclass(PostgresDatabase, PostgresSettings)
