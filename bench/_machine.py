"""The ``machine`` block every benchmark prints: how busy the machine was around the run.

The machine is shared and noisy, so a result is only comparable with one taken at a
similar load average; the block records it at both ends of the run.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any


class MachineRecord:
    """Started with the run; ``fields()`` at its end gives the block."""

    def __init__(self) -> None:
        self.loadavg_start = os.getloadavg()
        self.started = time.monotonic()

    def fields(self, **extra: Any) -> dict[str, Any]:
        """``cpus``, ``python``, ``loadavg_start``/``loadavg_end`` (1/5/15 min), ``wall_s``, then ``extra``."""
        return {
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in self.loadavg_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.monotonic() - self.started, 1),
            **extra,
        }
