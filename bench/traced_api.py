"""`camfleet api` with tracemalloc on, for bench_sse_triggers.py --tracemalloc.

Writes a tracemalloc snapshot to DIR/NAME.snap whenever DIR/NAME.req appears
(CAMFLEET_TRACE_DIR; checked every 0.2 s on a thread of its own, so that the API's
event loop is not involved), then runs `camfleet` with this script's arguments.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path


def _serve_snapshots(directory: Path) -> None:
    while True:
        for request in directory.glob("*.req"):
            out = request.with_suffix(".snap")
            tracemalloc.take_snapshot().dump(str(out) + ".tmp")
            os.replace(str(out) + ".tmp", out)
            request.unlink()
        time.sleep(0.2)


if __name__ == "__main__":
    tracemalloc.start(int(os.environ.get("CAMFLEET_TRACE_FRAMES", "8")))
    trace_dir = Path(os.environ["CAMFLEET_TRACE_DIR"])
    threading.Thread(target=_serve_snapshots, args=(trace_dir,), daemon=True).start()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from camfleet.cli import app

    sys.argv = ["camfleet", *sys.argv[1:]]
    app()
