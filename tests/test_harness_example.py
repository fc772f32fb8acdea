"""docs/prefect.md's `prefect_test_harness` example, run exactly as a user would.

The code block is copied out of the document and run by pytest in a subprocess with a
fresh Prefect home and no PREFECT_API_URL, so the harness starts its own server: if
the document or the flow it calls drifts, this test fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _example() -> str:
    text = (ROOT / "docs" / "prefect.md").read_text()
    section = text.split("## Testing your own flows with `prefect_test_harness`", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_documented_harness_example_passes(database_url, tmp_path):
    test_file = tmp_path / "test_my_fleet_report.py"
    test_file.write_text(_example())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        DATABASE_URL=database_url,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PYTHONPATH=str(ROOT),
        CAMFLEET_DATA_DIR=str(tmp_path / "data"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout
