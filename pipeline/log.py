"""Console progress: items done, rate, estimated time left, and end-of-stage summaries."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Callable


def echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def human_rate(per_second: float, unit: str) -> str:
    """``12.3 examples/s``, or per minute / per hour when slower (a full-strength evaluation: ~1 point/min)."""
    if per_second >= 1 or per_second == 0:
        return f"{per_second:.1f} {unit}/s"
    if per_second * 60 >= 1:
        return f"{per_second * 60:.1f} {unit}/min"
    return f"{per_second * 3600:.1f} {unit}/h"


class Progress:
    """Prints ``[stage] done/total unit (pct) | rate | ETA`` at most every ``every`` seconds, and at the end.
    Stages whose units take minutes pass ``every=0`` so that no finished unit goes unreported. ``done``: items a
    resumed run found finished; they count in done/total, not in the rate (this run did not do them)."""

    def __init__(self, stage: str, total: int, unit: str = "examples", every: float = 5.0, log=echo, done: int = 0):
        self.stage, self.total, self.unit, self.every, self.log = stage, total, unit, every, log
        self.done = self.resumed = done
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            elapsed = now - self.t0
            rate = (self.done - self.resumed) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            pct = 100.0 * self.done / self.total if self.total else 100.0
            eta_s = human_seconds(eta) if eta != float("inf") else "?"
            self.log(f"[{self.stage}] {self.done}/{self.total} {self.unit} ({pct:.0f}%) | {human_rate(rate, self.unit)} | "
                     f"ETA {eta_s}")


class Follow:
    """While a Ray task or Ray Train worker runs (its own output stays in Ray's logs), the driver prints each line
    it writes to ``path`` once: complete lines only, ``fmt`` turning a line into the console text. Used as a
    context manager around the blocking call; the last poll happens on exit."""

    def __init__(self, path: Path, log=echo, fmt: Callable[[str], str] = lambda line: line, every: float = 1.0):
        self.path, self.log, self.fmt, self.every = Path(path), log, fmt, every
        self.seen = set(self._lines())  # lines already there (a resumed run) were printed before
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _lines(self) -> list[str]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return text.splitlines()[:text.count("\n")]

    def poll(self) -> None:
        for line in self._lines():
            if line and line not in self.seen:
                self.seen.add(line)
                self.log(self.fmt(line))

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.poll()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.poll()
