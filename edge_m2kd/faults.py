"""Named points where a test can kill the process, to prove crash safety.

`EDGE_M2KD_KILL_AT=<point>` makes the process SIGKILL itself when it reaches that point
(no cleanup, no flush: the same as a power cut as far as the workspace is concerned).
Unset, a checkpoint costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

ENV = "EDGE_M2KD_KILL_AT"


def checkpoint(point: str) -> None:
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
