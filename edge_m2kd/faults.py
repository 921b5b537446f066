"""Named points where a test can kill the process, to prove crash safety.

`EDGE_M2KD_KILL_AT=<point>` makes the process SIGKILL itself when it reaches that point
(no cleanup, no flush: the same as a power cut as far as the workspace is concerned);
under torchrun, `EDGE_M2KD_KILL_RANK=<rank>` limits that to one rank.
Unset, a checkpoint costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

ENV = "EDGE_M2KD_KILL_AT"


def checkpoint(point: str) -> None:
    rank = os.environ.get("EDGE_M2KD_KILL_RANK")
    if os.environ.get(ENV) == point and (rank is None or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
