"""The layers point one way (issue 17; picture in CONTRIBUTING.md):

    services/, flows/, deployments/  ->  tasks/  ->  camfleet/

`camfleet/` (protocol cores, adapters, storage, the CLI's helpers) imports nothing of
tasks/, flows/, services/, deployments/, blocks/ or Prefect at module level. A function
may still import one lazily, where a saved block or a Prefect client is named on
purpose (e.g. camfleet/resolve.py loading a block): that costs only the caller who asks.

Static AST scan of every module's top-level statements (including module-level
``try``/``if`` blocks, excluding ``if TYPE_CHECKING:``), so it sees imports that a
runtime check would only see for the modules it happens to import. The runtime check
for the device library (``import camfleet.uploader`` loads no prefect module) is in
tests/test_uploader_layering.py; the runtime check below covers all of camfleet/.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UPPER_LAYERS = frozenset({"tasks", "flows", "services", "deployments", "blocks", "prefect"})

# Files allowed a module-level upper-layer import, each with the reason. Empty today:
# the CLI (camfleet/cli.py, camfleet/commands/) imports flows and blocks inside its
# command functions, so `camfleet --help` stays fast and the rule holds everywhere.
EXCEPTIONS: dict[str, str] = {}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module):
    """Import nodes that run when the module is imported (not those inside functions
    or classes' methods)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                pending += handler.body
        elif isinstance(node, ast.With):
            pending += node.body
        elif isinstance(node, ast.ClassDef):
            pending += node.body  # a class body runs at import time too


def _absolute_names(nodes, packages: frozenset[str]) -> list[str]:
    """Modules of `packages` that these import nodes name (relative imports stay inside
    their own package and are never one of them)."""
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [name for name in names if name.split(".")[0] in packages]
    return found


def upper_layer_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return _absolute_names(_module_level_imports(tree), UPPER_LAYERS)


def test_camfleet_imports_no_upper_layer_at_module_level():
    offenders = []
    for path in sorted((ROOT / "camfleet").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in EXCEPTIONS:
            continue
        offenders += [f"{rel}: {name}" for name in upper_layer_imports(path)]
    assert offenders == [], "camfleet/ must not import these at module level"


def test_importing_all_of_camfleet_loads_no_upper_layer():
    """Runtime twin of the scan, in a fresh interpreter (this one has Prefect loaded):
    also catches an upper layer pulled in through a third-party package."""
    modules = []
    for path in sorted((ROOT / "camfleet").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    loaded = "{n.split('.')[0] for n in sys.modules}"
    probe = "\n".join(f"import {m}" for m in modules) + (
        f"\nimport json, sys\nprint(json.dumps(sorted({loaded} & {set(UPPER_LAYERS)!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_scan_sees_the_imports_it_must(tmp_path):
    """The scanner itself: module-level forms are caught, lazy ones are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from __future__ import annotations\n"
        "import os, prefect.client\n"
        "from typing import TYPE_CHECKING\n"
        "from flows.triggers import x\n"
        "try:\n    import tasks.sftp\nexcept ImportError:\n    from services import api\n"
        "if TYPE_CHECKING:\n    import blocks.s3\n"
        "class C:\n    import deployments.serve\n"
        "def f():\n    import prefect\n"
        "from .prefect import y\n"
    )
    assert sorted(upper_layer_imports(sample)) == [
        "deployments.serve",
        "flows.triggers",
        "prefect.client",
        "services",
        "tasks.sftp",
    ]


# S3 is reached through camfleet/storage/ only (S3Store over boto3, fast_s3 for the hot
# paths): one client setup, one place for credentials and timeouts. camfleet/localsvc/
# runs the test S3 server. Unlike the layer rule this counts lazy imports too.
S3_LIBRARIES = frozenset({"boto3", "botocore"})
S3_HOMES = ("camfleet/storage/", "camfleet/localsvc/")
S3_EXCEPTIONS: dict[str, str] = {}
APPLICATION_DIRS = ("camfleet", "services", "flows", "tasks", "deployments", "blocks")


def s3_library_imports(path: Path) -> list[str]:
    return _absolute_names(ast.walk(ast.parse(path.read_text(), str(path))), S3_LIBRARIES)


def _application_files():
    for top in APPLICATION_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path


def test_only_the_storage_package_talks_to_s3_libraries():
    offenders = [
        f"{rel}: {name}"
        for rel, path in _application_files()
        if not rel.startswith(S3_HOMES) and rel not in S3_EXCEPTIONS
        for name in s3_library_imports(path)
    ]
    assert offenders == [], "use camfleet.storage (S3Store, fast_s3) instead"


def test_the_s3_scan_sees_lazy_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\ndef f():\n    import boto3\n"
        "    from botocore.exceptions import ClientError\nfrom .boto3 import x\n"
    )
    assert s3_library_imports(sample) == ["boto3", "botocore.exceptions"]


@pytest.mark.parametrize(
    ("exceptions", "scan"),
    [(EXCEPTIONS, upper_layer_imports), (S3_EXCEPTIONS, s3_library_imports)],
    ids=["layers", "s3"],
)
def test_exceptions_are_still_needed(exceptions, scan):
    """An exception whose file no longer breaks the rule is removed, not kept."""
    stale = [rel for rel in exceptions if not scan(ROOT / rel)]
    assert stale == []
