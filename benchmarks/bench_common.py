"""What the benchmarks share: peak RSS and page-cache probes, and interleaved rounds.

Linux only (`/proc`). `reset_peak` and `drop_caches` need write access to
`/proc/self/clear_refs` and (as root) `/proc/sys/vm/drop_caches`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import shutil
import statistics
import time
from collections.abc import Callable


def status(field: str) -> int:
    """A byte count from /proc/self/status (`VmRSS`, `VmHWM`, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    """Resets the process's peak RSS (`VmHWM`) to its RSS now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def settle() -> None:
    """Frees garbage and hands freed heap memory back (glibc's `malloc_trim`).

    Without it, the RSS before a measurement can hold memory an earlier one
    freed but the allocator kept, which the measured code then reuses unseen.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def drop_caches() -> bool:
    """`os.sync()`, then drops the page cache; False where that is not allowed (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def fsync(path: str) -> None:
    """Makes the file's data durable (opened again, as a saver's caller would)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def filesystem(path: str) -> str:
    """The type of the file system holding `path` (`ext4`, `tmpfs`, ...), from /proc/mounts."""
    path, best, kind = os.path.realpath(path), "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mount = fields[1].replace("\\040", " ")
            inside = path == mount or path.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, fields[2]
    return kind


class Window:
    """One measured call: its time and the peak RSS above the RSS before it.

    `with Window(state_bytes) as w:` then `values` holds `seconds`,
    `peak_extra` ((peak RSS - RSS before) / state bytes, over the whole
    window), `rss_after_extra` ((RSS at the end - RSS before) / state bytes)
    and `rss_after_trim_extra` (the same after `settle()`). `w.mark(phase)`
    inside ends a phase: `{phase}_s` (time since the start) and
    `{phase}_peak_extra` (the peak since the previous mark).
    """

    def __init__(self, state_bytes: int) -> None:
        self.state = state_bytes
        self.values: dict = {}

    def __enter__(self) -> Window:
        self.before = status("VmRSS")
        self.peak = 0
        reset_peak()
        self.started = time.perf_counter()
        return self

    def mark(self, phase: str) -> None:
        self.values[f"{phase}_s"] = time.perf_counter() - self.started
        self.values[f"{phase}_peak_extra"] = self._peak() / self.state
        reset_peak()

    def _peak(self) -> int:
        peak = status("VmHWM") - self.before
        self.peak = max(self.peak, peak)
        return peak

    def __exit__(self, *exc) -> None:
        self.values["seconds"] = time.perf_counter() - self.started
        self._peak()
        self.values["peak_extra"] = self.peak / self.state
        self.values["rss_after_extra"] = (status("VmRSS") - self.before) / self.state
        settle()  # (untimed) what stays once the allocator has handed freed memory back
        self.values["rss_after_trim_extra"] = (status("VmRSS") - self.before) / self.state


def spread(values: list[float]) -> dict:
    """Median and range of one quantity over the rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclasses.dataclass
class Method:
    """One way of doing the thing compared; its files go to its own folder (named `name`)."""

    name: str
    run: Callable  # (call, window) -> dict | None: what is measured
    prepare: Callable | None = None  # (call) -> dict | None: the untimed set-up before it
    written: Callable | None = None  # (call) -> the file whose size is recorded as `bytes`
    clean: bool = True  # empty the method's folder before each call
    cold: bool = False  # drop the page cache before each call
    optional: bool = False  # an error makes it "not measured" instead of stopping the run


def measure(m: Method, call: int, root: str, state_bytes: int) -> dict:
    """One call of `m`: the set-up, `os.sync()`, `settle()`, maybe `drop_caches()`, the window."""
    folder = os.path.join(root, m.name)
    if m.clean:
        for name in os.listdir(folder):
            full = os.path.join(folder, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    values = dict((m.prepare(call) if m.prepare else None) or {})
    os.sync()
    settle()
    if m.cold:
        values["cache_dropped"] = drop_caches()
    with Window(state_bytes) as w:
        values.update(m.run(call, w) or {})
    values.update(w.values)
    path = m.written(call) if m.written else None
    if path is not None and os.path.exists(path):
        values["bytes"] = os.path.getsize(path)
    return values


def interleave(methods: list[Method], rounds: int, root: str, state_bytes: int):
    """Round 0 (first calls) in the given order, then `rounds` rounds, rotated by one each.

    Returns (every method's calls, round 0's first; the optional methods that
    failed, with their error; each round's order).
    """
    calls: dict[str, list] = {}
    failed: dict[str, str] = {}
    orders = []
    for m in methods:
        os.makedirs(os.path.join(root, m.name), exist_ok=True)
        calls[m.name] = []
    for k in range(rounds + 1):
        order = methods[k % len(methods):] + methods[:k % len(methods)]
        orders.append([m.name for m in order])
        for m in order:
            if m.name in failed:
                continue
            try:
                calls[m.name].append(measure(m, k, root, state_bytes))
            except Exception as e:  # noqa: BLE001 - not installed, or not on this backend
                if not m.optional:
                    raise
                failed[m.name] = f"not measured: {type(e).__name__}: {e}"
    return calls, failed, orders


def summary(calls: list[dict]) -> dict:
    """The first call, the later ones, and each numeric value's `spread` over the later ones."""
    keys = [k for k, v in calls[-1].items() if not isinstance(v, bool)]
    return {"first": calls[0], "rounds": calls[1:],
            "summary": {k: spread([c[k] for c in calls[1:]]) for k in keys}}


def per_round(calls: dict, a: tuple, b: tuple) -> dict | None:
    """(method, value) over (method, value) in each round (first calls left out), and `spread`."""
    if len(calls.get(a[0], ())) < 2 or len(calls[a[0]]) != len(calls.get(b[0], ())):
        return None  # not measured, or failed in some round
    values = [x[a[1]] / y[b[1]] for x, y in zip(calls[a[0]][1:], calls[b[0]][1:], strict=True)]
    return {"rounds": values, **spread(values)}
