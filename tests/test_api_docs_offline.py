"""The device API's /docs works with no internet: Swagger UI's assets come from the
API itself (fastapi-offline), not a CDN. Headless Chromium with every host but
127.0.0.1 unresolvable must render the operation list."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import httpx
import pytest

from camfleet.localsvc import free_port
from tests.helpers import api_process

# Every name resolves to nothing except loopback: a CDN-hosted script would not load.
NO_NETWORK = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


@pytest.fixture
def api(database_url, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        DATABASE_URL=database_url, CAMFLEET_SECRET_KEY="docs-test-secret-0123456789abcdefghij"
    )
    cmd = [sys.executable, "-m", "camfleet.cli", "api", "--port", str(port)]
    with api_process(cmd, port, env, tmp_path / "api.log") as base:
        yield base


def test_docs_and_redoc_load_only_local_assets(api):
    for page in ("/docs", "/redoc"):
        html = httpx.get(api + page, timeout=10).text
        urls = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
        assert urls, html
        for url in urls:
            assert url.startswith("/"), f"{page} loads {url} from outside the API"
            assert httpx.get(api + url, timeout=10).status_code == 200, url


def test_docs_render_the_operation_list_without_network(api, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: apt-get install chromium (.ci/run does)"
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            NO_NETWORK,
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            f"{api}/docs",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "opblock" in dom, dom[-2000:]  # Swagger UI's operation rows
    assert "/devices/pair" in dom
