"""Fault injection for reliability tests and drills: crash a process at a named point.

`FISHERSFT_FAULT="<point>:<count>[:<signal>]"` sends the current process SIGKILL (or the
named signal, e.g. SIGINT: a Ctrl-C at a known point) the `count`-th time `<point>` is
reached (points: `featurize` — after a featurizer batch, `select` — after a greedy pick is
checkpointed). With `FISHERSFT_FAULT_MARKER=<path>` the fault fires once
across all processes (a restarted actor does not crash again). Unset: no effect.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter = Counter()
FAULT_VARIABLES = ("FISHERSFT_FAULT", "FISHERSFT_FAULT_MARKER")


def armed_faults() -> dict[str, str]:
    """The fault variables set here, to hand to Ray workers (they do not inherit the
    driver's environment)."""
    return {name: os.environ[name] for name in FAULT_VARIABLES if name in os.environ}


def maybe_crash(point: str) -> None:
    """Count one arrival at ``point`` and signal this process if the armed fault says so."""
    name, count, signal_name = (os.environ.get("FISHERSFT_FAULT", "").split(":") + ["", ""])[:3]
    if name != point:
        return
    _reached[point] += 1
    if _reached[point] != int(count or 1):
        return
    marker = os.environ.get("FISHERSFT_FAULT_MARKER")
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    os.kill(os.getpid(), getattr(signal, signal_name or "SIGKILL"))
