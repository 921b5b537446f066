"""Seconds per phase of a step, at the cost of two clock reads per phase entered.

Phases nest; time goes to the innermost phase only, so the phases of one step add up to its
wall time (what no phase claims is ``other``). Under CUDA the clock reads are asynchronous with
the GPU unless ``sync`` is on, which a profile run sets and a normal step does not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, sync_cuda: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._since = time.perf_counter()
        self._sync = sync_cuda and torch.cuda.is_available()

    def _switch(self) -> None:
        if self._sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
        self._since = now

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._switch()
        self._stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def total(self, wall_seconds: float) -> dict[str, float]:
        """The phases, plus ``other``: what of `wall_seconds` no phase claimed."""
        return {**self.seconds, "other": max(0.0, wall_seconds - sum(self.seconds.values()))}
