"""`camfleet up --demo` as a newcomer sees it: flow runs of every pipeline, completed,
listed in the Prefect UI rendered by headless Chromium (Debian's chromium package)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from camfleet.localsvc import free_port

# One flow per pipeline the demo drives: ESP32 MQTT chunks (seed 002), the edge
# signer (seed 000), Lifelog ingest (seed 004), Visant triggers + evaluation (seed 003).
PIPELINE_FLOWS = {
    "mqtt-ingest-record",
    "edge-uploads-received",
    "lifelog-ingest-processing",
    "trigger-scheduler",
    "evaluate-captures",
}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
    "--window-size=1400,1000",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    raise AssertionError("chromium is not installed: apt-get install chromium (.ci/run does)")


def _runs_in(api_url: str, states: list[str]) -> set[str]:
    """Names of the flows with at least one run in one of `states`."""
    flows = httpx.post(f"{api_url}/flows/filter", json={}, timeout=10).json()
    names = {f["id"]: f["name"] for f in flows}
    runs = httpx.post(
        f"{api_url}/flow_runs/filter",
        json={"flow_runs": {"state": {"type": {"any_": states}}}, "limit": 200},
        timeout=10,
    ).json()
    return {names.get(r["flow_id"]) for r in runs}


def _completed_flows(api_url: str) -> set[str]:
    return _runs_in(api_url, ["COMPLETED"])


# A counter per service that the demo keeps moving (docs/metrics.md).
MOVING = {
    "api": "camfleet_api_requests_total",
    "assembler": "camfleet_assembler_messages_total",
    "signer": "camfleet_signer_requests_total",
}


def _counter(url: str, name: str) -> float:
    """The sum of a counter's series at one scrape of `url`."""
    text = httpx.get(url, timeout=10).text
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _assert_metrics_move(up_log: Path) -> None:
    """Each service's /metrics, at the URL the banner names, has its counter moving."""
    banner = up_log.read_text()
    urls = dict(re.findall(r"\b(api|assembler|signer) (http://\S+/metrics)", banner))
    assert set(urls) == set(MOVING), banner[-3000:]
    first = {svc: _counter(urls[svc], name) for svc, name in MOVING.items()}
    deadline = time.monotonic() + 180
    moved: set[str] = set()
    while time.monotonic() < deadline and moved != set(MOVING):
        time.sleep(2)
        moved = {svc for svc, name in MOVING.items() if _counter(urls[svc], name) > first[svc]}
    assert moved == set(MOVING), (first, moved)


def _assert_demo_fleet_owned(data_dir: Path) -> None:
    """Every simulated device (all kinds) belongs to the demo user, so its console shows it."""
    import psycopg2

    from camfleet import demo

    dsn = json.loads((data_dir / "stack.json").read_text())["env"]["DATABASE_URL"]
    wanted = set(demo.demo_device_ids())
    deadline = time.monotonic() + 120
    while True:
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("select device_id, kind, user_id from devices")
            rows = cur.fetchall()
        owned = {d for d, _kind, user in rows if user == demo.DEMO_USER}
        if wanted <= owned or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert wanted <= owned, rows
    assert all(user == demo.DEMO_USER for _d, _kind, user in rows), rows


def _assert_services_ready(data_dir: Path) -> None:
    """The readiness URLs `camfleet up` hands to fleet-health (its service alerts, by
    default) name every service it started, and each answers ready."""
    env = json.loads((data_dir / "stack.json").read_text())["env"]
    urls = json.loads(env["CAMFLEET_SERVICE_URLS"])
    assert set(urls) == set(MOVING), urls
    deadline = time.monotonic() + 120
    status: dict = {}
    while time.monotonic() < deadline:
        for name, url in urls.items():
            try:
                status[name] = httpx.get(url, timeout=10).status_code
            except httpx.HTTPError as exc:
                status[name] = type(exc).__name__
        if set(status.values()) == {200}:
            return
        time.sleep(2)
    raise AssertionError(status)


@dataclass
class Demo:
    """A running `camfleet up --demo` and how to reach it."""

    work: Path
    env: dict
    api: str  # the device API (and console) base URL
    ui: str  # the Prefect UI base URL
    proc: subprocess.Popen

    @property
    def log(self) -> Path:
        return self.work / "up.log"


@pytest.fixture(scope="module")
def demo():
    """One demo stack for this module's tests: it takes minutes to come up."""
    work = Path(tempfile.mkdtemp(prefix="camfleet-ui-"))
    work.chmod(0o755)  # the postgres user must reach the cluster inside
    api_port, prefect_port = free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MQTT_", "CAMFLEET_")) and k != "DATABASE_URL"
    }
    env["CAMFLEET_DATA_DIR"] = str(work / "data")
    # Not the machine's broker port, nor the user's Prefect profiles.
    env["CAMFLEET_MQTT_PORT"] = str(free_port())
    env["PREFECT_HOME"] = str(work / "prefect-home")
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "camfleet.cli",
            "up",
            "--demo",
            "--api-port",
            str(api_port),
            "--prefect-port",
            str(prefect_port),
        ],
        env=env,
        stdout=open(work / "up.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        yield Demo(
            work, env, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prefect_port}", up
        )
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=120)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(600)
def test_demo_flow_runs_of_every_pipeline_show_completed_in_the_ui(demo):
    work, ui = demo.work, demo.ui
    seen: set[str] = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not PIPELINE_FLOWS <= seen:
        time.sleep(5)
        try:
            seen = _completed_flows(f"{ui}/api")
        except httpx.HTTPError:
            continue
    assert PIPELINE_FLOWS <= seen, (seen, demo.log.read_text()[-3000:])
    assert not _runs_in(f"{ui}/api", ["FAILED", "CRASHED"])
    _assert_metrics_move(demo.log)
    _assert_demo_fleet_owned(work / "data")
    _assert_services_ready(work / "data")

    dom = subprocess.run(
        [
            _chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={work / 'chromium'}",
            "--dump-dom",
            f"{ui}/runs",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for name in PIPELINE_FLOWS:
        assert name in dom, f"{name} not listed on the runs page"
    assert "Completed" in dom  # state badges; the list renders lazily, so not all

    shot = work / "dashboard.png"
    subprocess.run(
        [
            _chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={work / 'chromium'}",
            f"--screenshot={shot}",
            f"{ui}/dashboard",
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.read_bytes().startswith(b"\x89PNG")


# Every demo device listed on the fleet page: the ids whose row's thumbnail has loaded.
THUMBED_ROWS = (
    "[...document.querySelectorAll('#fleet-rows tr[data-device]')].filter(r => {"
    " const i = r.querySelector('img.thumb'); return i && i.complete && i.naturalWidth > 0;"
    " }).map(r => r.dataset.device)"
)


@pytest.mark.timeout(600)
def test_demo_console_in_chromium_pictures_runs_and_a_stranger_refused(demo):
    """Issue 16's browser check, during `camfleet up --demo`, in headless Chromium: the
    demo user signs in; the fleet page has a loaded thumbnail for every demo device
    (ESP32s, edge camera, Visant camera, Lifelog wearables); an ESP32's page opened from
    it links a capture to its full image and to its Prefect flow run, which the Prefect
    UI shows; another user of the same stack reaches neither the page nor the image."""
    from camfleet.demo import demo_device_ids
    from tests.cdp import Browser
    from tests.test_console_browser import sign_in

    state = _demo_state(demo)
    camera = state["visant"][0]
    wanted = set(demo_device_ids()) | {camera}
    stranger = subprocess.run(
        [sys.executable, "-m", "camfleet.cli", "users", "create-key", "demo-stranger"],
        env=demo.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert stranger.returncode == 0, stranger.stderr
    browser = Browser()
    try:
        sign_in(browser, demo.api, state["user_key"])
        # The page refreshes its rows itself: wait for the demo's first pictures.
        js_wanted = json.dumps(sorted(wanted))
        try:
            browser.wait_for(
                f"(() => {{ const have = {THUMBED_ROWS}; const rows = document.querySelectorAll"
                "('#fleet-rows tr[data-device]').length;"
                f" return {js_wanted}.every(d => have.includes(d)) && have.length === rows"
                " && have.length; })()",
                timeout=300,
            )
        except AssertionError as exc:
            rows = browser.eval("document.querySelector('#fleet-rows').innerText")
            raise AssertionError(f"rows without a thumbnail or missing:\n{rows}") from exc
        wearables = browser.eval(
            "[...document.querySelectorAll('#fleet-rows tr')].filter("
            "r => r.children[2]?.textContent === 'lifelog').length"
        )
        assert wearables == 2, "the demo's two Lifelog wearables have a thumbnail each"
        if shots := os.environ.get("CAMFLEET_SCREENSHOTS"):
            browser.screenshot(Path(shots) / "console-demo-fleet.png")

        # An ESP32's page, opened from its row: a capture, its full image, its flow run
        # (the MQTT record flow stores the run on each capture it records).
        esp32 = demo_device_ids()[0]
        browser.eval(f"document.querySelector('a[href=\"/console/devices/{esp32}\"]').click(); 1")
        browser.wait_for(f"location.pathname === '/console/devices/{esp32}'")
        figure = "document.querySelector('#captures figure:has(a.flow-run):has(img)')"
        deadline = time.monotonic() + 180
        while not browser.eval(f"!!{figure}"):  # recorded a little after it is stored
            assert time.monotonic() < deadline, browser.eval("document.body.innerText")[:3000]
            time.sleep(5)
            browser.goto(f"{demo.api}/console/devices/{esp32}")
        browser.eval(f"{figure}.scrollIntoView(); 1")  # thumbnails load lazily
        browser.wait_for(f"{figure}.querySelector('img').naturalWidth > 0", timeout=60)
        if shots:
            browser.screenshot(Path(shots) / "console-demo-device.png")
        image_url = browser.eval(f"{figure}.querySelector('a[href$=\"/image\"]').href")
        run_url = browser.eval(f"{figure}.querySelector('a.flow-run').href")
        assert run_url.startswith(f"{demo.ui}/runs/flow-run/"), run_url
        browser.goto(image_url)
        assert browser.eval("document.contentType") == "image/jpeg"
        assert browser.wait_for("document.images.length && document.images[0].naturalWidth")

        run_id = run_url.rsplit("/", 1)[1]
        run = httpx.get(f"{demo.ui}/api/flow_runs/{run_id}", timeout=30)
        assert run.status_code == 200, run.text
        browser.goto(run_url)  # the Prefect UI renders the run by its name
        browser.wait_for(f"document.body.innerText.includes({run.json()['name']!r})", timeout=120)

        # Another user, in the same browser after signing out: neither page nor image.
        browser.goto(f"{demo.api}/console/")
        browser.eval("document.querySelector('header form').submit(); 1")
        browser.wait_for("location.pathname === '/console/login'")
        sign_in(browser, demo.api, stranger.stdout.strip())
        assert esp32 not in browser.eval("document.body.innerText")
        status = browser.eval(
            f"Promise.all([fetch('/console/devices/{esp32}'), fetch({image_url!r})])"
            ".then(rs => rs.map(r => r.status))"
        )
        assert status == [404, 404]
    finally:
        browser.close()


def _demo_state(demo: Demo) -> dict:
    """The demo's own state (its user key, its paired Visant camera), once written."""
    path = demo.work / "data" / "demo" / "state.json"
    deadline = time.monotonic() + 300
    while True:
        try:
            state = json.loads(path.read_text())
            if "visant" in state:
                return state
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, demo.log.read_text()[-3000:]
        time.sleep(2)


def _visant_agent(demo: Demo, device_id: str):
    """The demo's Visant agent process (a grandchild of `camfleet up`)."""
    import psutil

    for proc in psutil.Process(demo.proc.pid).children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "agent" in cmd and device_id in cmd:
            return proc
    raise AssertionError("the demo's Visant agent is not running")


def _diagnosis(demo: Demo, device_id: str) -> str:
    """What a failed wait needs: the camera's row and incidents, fleet-health's runs."""
    import psycopg2

    dsn = json.loads((demo.work / "data" / "stack.json").read_text())["env"]["DATABASE_URL"]
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "select kind, config, last_seen_at, now() from devices where device_id = %s",
            (device_id,),
        )
        device = cur.fetchall()
        cur.execute("select * from device_alerts order by alert_id")
        incidents = cur.fetchall()
    runs = httpx.post(
        f"{demo.ui}/api/flow_runs/filter",
        json={"flow_runs": {"name": {}}, "limit": 200, "sort": "EXPECTED_START_TIME_DESC"},
        timeout=10,
    ).json()
    flows = {f["id"]: f["name"] for f in httpx.post(f"{demo.ui}/api/flows/filter", json={}).json()}
    health = [
        (r["state_type"], r["start_time"])
        for r in runs
        if flows.get(r["flow_id"]) == "fleet-health"
    ]
    return f"device {device}\nincidents {incidents}\nfleet-health runs {health[:10]}"


def _alert(device_id: str, state: str, alert_id: str = "") -> str:
    """A JavaScript expression: the alert id of the console's alert in that state."""
    by_id = f"[data-alert='{alert_id}']" if alert_id else ""
    sel = f"#alerts li[data-device='{device_id}'][data-state='{state}']{by_id}"
    return f'(document.querySelector("{sel}") || {{}}).dataset?.alert'


@pytest.mark.slow  # the demo, then a camera silent for 2x its schedule and back: minutes
@pytest.mark.timeout(1200)
def test_demo_camera_gone_silent_alerts_in_console_and_webhook_then_back(demo):
    """During `camfleet up --demo`, the Visant camera's agent stops: the console (real
    Chromium, the fleet page refreshing itself) shows it silent and a webhook receives
    one "silent" notification; the agent starts again: the same alert turns "back" and
    one "back" notification arrives. The Prefect deployment `fleet-health` runs on its
    own schedule; nothing here calls the flow."""
    from tests.cdp import Browser
    from tests.test_alerts import Receiver
    from tests.test_console_browser import sign_in

    state = _demo_state(demo)
    camera, token = state["visant"]
    receiver = Receiver()
    browser = Browser()
    restarted = None
    try:
        env = demo.env | {"PREFECT_API_URL": f"{demo.ui}/api"}
        hook = subprocess.run(
            [sys.executable, "-m", "camfleet.cli", "alerts", "webhook", receiver.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert hook.returncode == 0, hook.stdout + hook.stderr

        sign_in(browser, demo.api, state["user_key"])
        row = f"document.querySelector(\"tr[data-device='{camera}']\")"
        # In contact and no open incident: what follows is this test's own incident.
        browser.wait_for(f"{row}?.dataset.health === 'ok'", timeout=300)
        browser.wait_for(f"!{_alert(camera, 'silent')}", timeout=300)
        kind = browser.eval(f"{row}.children[2].textContent")
        assert kind == "visant"  # paired as what it is

        while not receiver.posts.empty():  # a flap of a loaded start-up is not ours
            receiver.posts.get_nowait()
        agent = _visant_agent(demo, camera)
        agent.terminate()
        agent.wait(timeout=30)
        stopped = time.monotonic()

        # 2 x its 15 s schedule + the 60 s fleet-health interval + the page's refresh,
        # with room for a loaded machine (no timing assertion: the figure is printed).
        try:
            alert_id = browser.wait_for(_alert(camera, "silent"), timeout=420)
        except AssertionError as exc:
            raise AssertionError(_diagnosis(demo, camera)) from exc
        silent_s = time.monotonic() - stopped
        posts = _posts_until(receiver, camera, "[camfleet.device.silent]")
        notified_s = time.monotonic() - stopped
        if shots := os.environ.get("CAMFLEET_SCREENSHOTS"):
            browser.screenshot(Path(shots) / "console-alert.png")

        scene = demo.work / "data" / "demo" / "scene.jpg"
        restarted = subprocess.Popen(
            [
                *(sys.executable, "-m", "camfleet.cli", "agent", "--api-url", demo.api),
                *("--device-id", camera, "--camera-source", str(scene)),
                *("--reconnect-delay", "2"),
            ],
            env=demo.env | {"CAMFLEET_DEVICE_TOKEN": token},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            browser.wait_for(_alert(camera, "back", alert_id), timeout=420)
        except AssertionError as exc:
            raise AssertionError(_diagnosis(demo, camera)) from exc
        posts += _posts_until(receiver, camera, "[camfleet.device.back]")
        print(
            f"\nsilent in the console {silent_s:.0f} s and notified {notified_s:.0f} s after "
            "the agent stopped (bound: 2 x 15 s + 60 s + 15 s page refresh)"
        )
        while not receiver.posts.empty():  # nothing else arrived meanwhile
            posts.append(receiver.posts.get_nowait())
        mine = [p["body"].split("[")[-1] for p in posts if camera in p.get("subject", "")]
        assert mine == ["camfleet.device.silent]", "camfleet.device.back]"], posts
    finally:
        if restarted is not None:
            restarted.terminate()
            restarted.wait(timeout=30)
        browser.close()
        receiver.close()


def _posts_until(receiver, device_id: str, marker: str) -> list[dict]:
    """Every notification received until the one for `device_id` carrying `marker`."""
    import queue

    posts = []
    deadline = time.monotonic() + 300
    while True:
        try:
            post = receiver.posts.get(timeout=max(1.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {marker} for {device_id}; got {posts}") from None
        posts.append(post)
        if device_id in post.get("subject", "") and marker in post.get("body", ""):
            return posts
