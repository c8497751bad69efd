"""Where a process runs the selection: shared by `select` (run/job.py) and `evaluate`."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def selection_device(device: str) -> str:
    """Where this process runs the selection for ``--device``: on its GPU unless the device is
    cpu or it has none. ``--device cuda`` on a CPU head (the featurizer actors on GPU nodes)
    thus selects on the head's CPU instead of failing after featurizing: picks are the same on
    either (compared on an H100, RESULTS.md)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        if device == "cuda":
            log.info("--device cuda: this driver has no GPU, so the selection runs on its CPU")
        return "cpu"
    return "cuda"
