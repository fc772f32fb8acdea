"""What every benchmark prints beside a figure: load average, CPU by process, range.

The machine is shared, so a figure alone says little. Each measurement runs inside a
``CpuMeter`` that snapshots the CPU seconds of the processes taking part (by name:
"broker", "subscriber", "publishers", ...) and of the whole machine, then says which
one limited the measurement:

* a group whose busiest process used >= 85 % of one core is CPU-bound there (a Python
  process cannot use more than one core for its Python code: the GIL);
* else, if the machine's CPUs were >= 90 % busy (ours plus other users'), the box is
  the limit and the figure is a floor;
* else nothing was CPU-bound: latency (round trips, fsync, sleeps) sets the pace.

``repeat`` runs a measurement n times in one run, ``span`` prints the range.

    from benchstat import CpuMeter, repeat, span
    with CpuMeter({"broker": broker_pid, "subscriber": [pid]}) as m:
        ...
    print(f"{rate:.0f} msg/s  {m.line()}")
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable

import psutil

CPU_BOUND = 85.0  # % of one core: a single Python process at its ceiling
BOX_BUSY = 90.0  # % of all cores


def load_average() -> str:
    """'1.23 0.98 0.70' (1, 5 and 15 minutes)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _procs(spec) -> list[psutil.Process]:
    if spec is None or isinstance(spec, int | psutil.Process):
        spec = [spec]
    out = []
    for p in spec:
        if p is None:  # a service that has no process of its own (yet)
            continue
        try:
            out.append(p if isinstance(p, psutil.Process) else psutil.Process(p))
        except psutil.NoSuchProcess:
            pass
    return out


def _cpu(proc: psutil.Process, tree: bool) -> tuple[float, list[tuple[int, float]]]:
    """(total CPU seconds, [(pid, seconds) of each live process]) of proc [and tree].

    With tree, short-lived descendants count too: reaped ones are in their parent's
    children times (PostgreSQL forks a backend per connection), for every parent in the
    tree (a service's flow-run or simulator subprocesses, reaped by the service, not
    by the root: without their parents' children times a group's total drops when one
    ends). A live process's children times hold only reaped ones: nothing counts twice.
    """
    try:
        t = proc.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0, []
    own = t.user + t.system
    # Finished (reaped) children count in both modes: a short-lived client subprocess,
    # or a PostgreSQL backend per connection.
    total, each = own + t.children_user + t.children_system, [(proc.pid, own)]
    if tree:
        try:
            kids = proc.children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        for k in kids:
            try:
                kt = k.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += kt.user + kt.system + kt.children_user + kt.children_system
            each.append((k.pid, kt.user + kt.system))
    return total, each


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    # guest time is already inside user/nice on Linux; waiting (idle, iowait) is not busy
    not_busy = ("idle", "iowait", "guest", "guest_nice")
    return sum(t) - sum(getattr(t, f, 0.0) for f in not_busy)


class CpuMeter:
    """CPU of named process groups and of the machine over a ``with`` block.

    groups: name -> pid | Process | list of them. A group counts its processes' live
    descendants unless its name is in ``own_only`` (e.g. the benchmark process itself,
    which parents the services); finished children count in both cases. Groups named
    in ``background`` are load running beside the measurement (e.g. a whole `camfleet
    up`): printed like the others, counted as other users' CPU, never named as the limit.
    """

    def __init__(
        self,
        groups: dict[str, object],
        own_only: Iterable[str] = (),
        background: Iterable[str] = (),
    ):
        self.groups = {name: _procs(spec) for name, spec in groups.items()}
        self.own_only = set(own_only)
        self.background = set(background)

    def _snap(self) -> dict[str, tuple[float, dict[int, float]]]:
        out = {}
        for name, procs in self.groups.items():
            total, each = 0.0, {}
            for p in procs:
                t, e = _cpu(p, tree=name not in self.own_only)
                total += t
                each.update(e)
            out[name] = (total, each)
        return out

    # The machine's busy time and the wall clock are read together, after each process
    # snapshot: a snapshot of 100+ processes on a busy box takes a second, and busy time
    # over a longer span than the wall's read as more than all the cores.
    def __enter__(self) -> CpuMeter:
        self.load0 = os.getloadavg()
        self.s0 = self._snap()
        self.busy0 = _busy_seconds()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.s1 = self._snap()
        self.busy = _busy_seconds() - self.busy0
        self.wall = max(1e-9, time.monotonic() - self.t0)
        self.load1 = os.getloadavg()

    # -- results (after the block) -----------------------------------------------------
    def pct(self) -> dict[str, float]:
        """Group -> CPU used during the block, % of one core."""
        return {
            name: 100 * max(0.0, self.s1[name][0] - self.s0[name][0]) / self.wall
            for name in self.groups
        }

    def busiest(self, name: str) -> float:
        """% of one core of the group's busiest single process."""
        before, after = self.s0[name][1], self.s1[name][1]
        return max(
            (100 * (v - before.get(pid, 0.0)) / self.wall for pid, v in after.items()),
            default=0.0,
        )

    def box_pct(self) -> float:
        """The whole machine's busy CPU, % of one core (max: 100 x cores)."""
        return 100 * self.busy / self.wall

    def limit(self) -> str:
        pct = {n: v for n, v in self.pct().items() if n not in self.background}
        bound = [(self.busiest(n), n) for n in pct if self.busiest(n) >= CPU_BOUND]
        if bound:
            top, name = max(bound)
            return f"{name} (a process at {top:.0f}% of one core)"
        cores = os.cpu_count() or 1
        box = self.box_pct()
        if box >= BOX_BUSY * cores:
            others = max(0.0, box - sum(pct.values()))
            return f"the machine's CPUs ({box:.0f}% of {100 * cores}%, other users {others:.0f}%)"
        return "no process CPU-bound (round trips / waits set the pace)"

    def line(self) -> str:
        pct = self.pct()
        parts = []
        for name, v in pct.items():
            n = len(self.s1[name][1])
            parts.append(f"{name} {v:.0f}" + (f" ({n} procs)" if n > 1 else ""))
        others = max(0.0, self.box_pct() - sum(pct.values()))
        return (
            f"load {self.load1[0]:.2f} | CPU % of one core: {', '.join(parts)}, "
            f"rest of box {others:.0f} | limit: {self.limit()}"
        )


def repeat(n: int, fn: Callable[[int], object]) -> list:
    """fn(i) for i in range(n), in this run (the box's load drifts between runs)."""
    return [fn(i) for i in range(n)]


def span(values: Iterable[float], fmt: str = "{:,.0f}") -> str:
    """'7,263-7,872 (median 7,500)'."""
    v = sorted(values)
    if not v:
        return "n/a"
    lo, hi, mid = (fmt.format(x) for x in (v[0], v[-1], statistics.median(v)))
    return f"{lo}-{hi} (median {mid})" if len(v) > 1 else lo
