"""CPU and memory meters read from Linux /proc, for benchmarks that time and size work in this process tree.

Why: the pipeline benchmarks run on shared machines, and a figure taken while another job used the CPUs
is slower for reasons that have nothing to do with the code measured. `Foreign` gives each measurement
the share of the machine's CPUs that processes outside this benchmark used meanwhile (from /proc/stat
and /proc/<pid>/stat), so busy measurements are retried (above MAX_FOREIGN) and flagged in the reports.
Memory: ru_maxrss (`peak_rss_mb`) only grows, so a stage's own peak needs the VmHWM reset of
/proc/self/clear_refs (`reset_driver_hwm`, `driver_memory`); Ray's actor processes are not ours to ask,
so `ActorPeak` polls their VmHWM from /proc/<pid>/status.

Linux only: every reader here opens /proc. Nothing imports torch, Ray or MLflow.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from harness import median

from orchestrator.train.memory import peak_rss_mb

MAX_FOREIGN = 0.15  # a measurement during which other processes used more of the CPUs than this is retried


# ------------------------------------------------------------------------------------ CPU


def _busy_jiffies() -> int:
    """CPU time used on the whole machine (all processes), in clock ticks."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _own_cpu() -> dict[tuple[int, int], int]:
    """CPU ticks (utime + stime + reaped children) of this process and its descendants (Ray's processes
    included), by (pid, start time)."""
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            rest = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(rest[1])
        cpu[int(entry)] = (int(rest[19]), sum(int(x) for x in rest[11:15]))  # starttime; utime stime cutime cstime
    me, own = os.getpid(), {}
    for pid, (started, ticks) in cpu.items():
        p = pid
        while p > 1 and p != me:
            p = parent.get(p, 0)
        if p == me:
            own[(pid, started)] = ticks
    return own


class Foreign:
    """Share of the machine's CPUs used by processes outside this benchmark during a measurement.

    Another job on the machine slows every figure; this makes that visible per measurement.
    """

    POLL_S = 0.5

    def __init__(self, *, poll: bool = False) -> None:
        # Ray's worker processes are reaped without their CPU time reaching a parent's counters, so a Ray Train
        # worker that ends before the measurement does counts as foreign load. `poll` reads our processes' time
        # every POLL_S from a thread (to within POLL_S of each one's exit; what is lost errs towards more foreign
        # load): for measurements where this process only waits, never around work done in this process.
        self.poll = poll

    def __enter__(self) -> "Foreign":
        self.wall, self.busy, self.own = time.perf_counter(), _busy_jiffies(), _own_cpu()
        self.seen = dict(self.own)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True) if self.poll else None
        if self._poller:
            self._poller.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self.seen.update(_own_cpu())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._poller:
            self._poller.join()
        self.seen.update(_own_cpu())
        wall = time.perf_counter() - self.wall
        own = sum(ticks - self.own.get(key, 0) for key, ticks in self.seen.items())
        foreign = (_busy_jiffies() - self.busy) - own
        capacity = wall * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        self.share = round(min(1.0, max(0.0, foreign / capacity)), 3) if capacity > 0 else 0.0


def clean_median(values: list[float], foreign: list[float]) -> tuple[float, int]:
    """Median over the measurements taken with little foreign load (all of them if fewer than 2 are)."""
    clean = [v for v, f in zip(values, foreign) if f <= MAX_FOREIGN]
    chosen = clean if len(clean) >= 2 else values
    return median(chosen), len(chosen)


# ------------------------------------------------------------------------------------ memory


def _vm_kb(pid: int | str, field: str) -> int | None:
    """A `VmHWM:`/`VmRSS:` line of /proc/<pid>/status, in KiB (None if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


_DRIVER_PEAK_MB = [0.0]  # the driver's peak before the last VmHWM reset


def reset_driver_hwm() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0: write 5 to clear_refs), so a stage's own peak can be read.

    On Linux the reset also lowers ru_maxrss, which peak_rss_mb reads, so the peak so far is kept here first."""
    _DRIVER_PEAK_MB[0] = max(_DRIVER_PEAK_MB[0], peak_rss_mb())
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def driver_memory(stage_hwm: bool) -> dict:
    """Driver peak RSS after a stage: the peak since the process started (peak_rss_mb now, or as read before
    a VmHWM reset if that was larger; what the orchestrator's peak_rss_mb would say without the resets)
    and, where VmHWM was reset before the stage, the peak during the stage alone."""
    out = {"driver_peak_rss_mb": round(max(_DRIVER_PEAK_MB[0], peak_rss_mb()), 1)}
    hwm = _vm_kb("self", "VmHWM") if stage_hwm else None
    if hwm is not None:
        out["driver_stage_peak_rss_mb"] = round(hwm / 1024, 1)
    return out


class ActorPeak:
    """Polls /proc (every `interval` s, in a thread) for this process's descendants whose command line names
    `marker` (Ray sets a worker's title to its actor class) and keeps each one's largest VmHWM seen."""

    def __init__(self, marker: str, interval: float = 0.2) -> None:
        self.marker, self.interval = marker, interval
        self.peaks: dict[int, int] = {}  # pid -> VmHWM KiB
        self.titles: dict[int, str] = {}

    def _scan(self, skip: frozenset = frozenset()) -> set[int]:
        parent, matches = {}, []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            if self.marker in cmdline:
                matches.append((int(entry), cmdline.strip()))
        me, seen = os.getpid(), set()
        for pid, title in matches:
            p = pid
            while p > 1 and p != me:
                p = parent.get(p, 0)
            if p != me:
                continue  # another job's process
            seen.add(pid)
            if pid in self.skip or pid in skip:
                continue  # alive before the measurement began (an earlier pool's actor on its way out)
            hwm = _vm_kb(pid, "VmHWM")
            if hwm is not None:
                self.peaks[pid] = max(hwm, self.peaks.get(pid, 0))
                self.titles[pid] = title[:80]
        return seen

    @staticmethod
    def _all() -> set[int]:
        return {int(e) for e in os.listdir("/proc") if e.isdigit()}

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._scan()

    def __enter__(self) -> "ActorPeak":
        self.skip: frozenset = frozenset()
        self.skip = frozenset(self._scan(skip=frozenset(self._all())))
        self.peaks.clear()
        self.titles.clear()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict:
        mb = sorted(round(v / 1024, 1) for v in self.peaks.values())
        return {"actor_processes": len(mb), "actor_peak_rss_mb": mb, "actor_titles": sorted(set(self.titles.values())),
                "actor_pids": sorted(self.peaks), "skipped_pids": sorted(self.skip)}
