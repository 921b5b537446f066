"""A step started from the page runs as its own process: `python -m edge_m2kd add-classes WS
STAGING --classes ... --json --progress jsonl`. That process takes the writer lock like any CLI
step, so the server stays responsive while it trains, a crash of the step cannot take the
server down, and a cancel is a plain terminate: the commit is atomic (workspace.py), so a step
killed at any point leaves the workspace as it was.

This module starts that process, reads its progress lines (stderr: one JSON object per epoch,
`warning: ...` lines and at most one `error: ...` line, the CLI's one-line reason), its report
(stdout: the `--json` step entry) and its exit status, and keeps one `JobState` the page polls
or streams.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_m2kd.locking import WRITER_LOCK, WorkspaceBusy, busy_reason

MANIFEST = "workspace.json"  # workspace.MANIFEST; not imported, since workspace.py loads torch

# Exit codes of the CLI: 2 is a refusal with a one-line reason (budget, a known class, a busy
# workspace, no readable image), anything else is a failure.
REFUSED_EXIT = 2
TERMINATE_GRACE_S = 5.0
FINISHED = ("done", "refused", "failed", "cancelled")


@dataclass
class JobState:
    """What the page shows about a step. `time_left` is an estimate: the mean epoch time so far
    times the epochs still to come, the prune fine-tuning of packed/sparse snapshots included
    (it trains on the same images, so its epochs cost about as much)."""

    id: str
    classes: list[str]
    images: int
    status: str = "starting"  # starting | running | cancelling | done | refused | failed | cancelled
    phase: str = "starting"  # starting | preparing | train | finetune | finishing
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    images_per_second: float | None = None
    time_left: float | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    pid: int | None = None
    reason: str | None = None  # the CLI's one-line reason for a refusal or a failure
    warnings: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None  # the step's `add-classes --json` report
    version: int = 0  # bumped on every change, so a stream sends only what is new

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepJobs:
    """At most one step at a time (the workspace has one writer), started by `start`."""

    def __init__(self, workspace: Path, python: str = sys.executable) -> None:
        self.workspace = Path(workspace)
        self.python = python
        self._lock = threading.Lock()
        self._jobs: dict[str, JobState] = {}
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self.current: str | None = None

    # -- start ----------------------------------------------------------------------------------
    def start(self, staging: Path, classes: list[str], images: int, epochs: int | None = None) -> JobState:
        """Start a step on the images staged in `staging/<class>/`. Refused (WorkspaceBusy) while a
        step started here still runs, with the line a second writer gets from the lock."""
        with self._lock:
            running = self._jobs.get(self.current or "")
            if running is not None and running.status not in FINISHED:
                raise WorkspaceBusy(self._busy_line(running))
            job = JobState(id=staging.name, classes=list(classes), images=images)
            command = [self.python, "-m", "edge_m2kd", "add-classes", str(self.workspace), str(staging),
                       "--classes", ",".join(classes), "--json", "--progress", "jsonl"]
            if epochs is not None:
                command += ["--epochs", str(epochs)]
            # Its own session: a Ctrl-C meant for the server does not kill the step half-way
            # through a message, and the server decides (it cancels it on shutdown).
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                    start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            job.pid = proc.pid
            self._jobs[job.id] = job
            self._procs[job.id] = proc
            self.current = job.id
        finetune, steps_before = self._planned_finetune_epochs(), self._steps()
        threading.Thread(target=self._follow, args=(job, proc, staging, finetune, steps_before), daemon=True,
                         name=f"step-{job.id}").start()
        return job

    def refuse_if_busy(self) -> None:
        """WorkspaceBusy while a step started here runs: what `start` would answer, said before a
        request's uploads are read, decoded and staged for nothing. (A writer started elsewhere,
        in a terminal, is refused by the step process itself: probing its lock could make that
        writer fail as it starts, locking.busy_reason.)"""
        with self._lock:
            running = self._jobs.get(self.current or "")
            if running is not None and running.status not in FINISHED:
                raise WorkspaceBusy(self._busy_line(running))

    def _busy_line(self, job: JobState) -> str:
        try:
            holder = json.loads((self.workspace / WRITER_LOCK).read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            holder = None
        if holder == job.pid:
            return busy_reason(self.workspace)  # word for word what the CLI would print
        return (f"{self.workspace} is busy: a step started here (pid {job.pid}, classes {', '.join(job.classes)}) "
                "is starting; run again when it has finished")

    def _manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.workspace / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}

    def _planned_finetune_epochs(self) -> int:
        try:
            snapshots = self._manifest()["config"]["snapshots"]
            return int(snapshots["prune_finetune_epochs"]) if snapshots["policy"] in ("packed", "sparse") else 0
        except (KeyError, TypeError, ValueError):
            return 0

    def _steps(self) -> int:
        return len(self._manifest().get("history") or [])

    # -- follow -----------------------------------------------------------------------------------
    def _update(self, job: JobState, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(job, key, value)
            job.version += 1

    def _follow(self, job: JobState, proc: subprocess.Popen[str], staging: Path, finetune: int,
                steps_before: int) -> None:
        stdout: list[str] = []
        reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read() if proc.stdout else ""), daemon=True)
        reader.start()
        self._update(job, status="running", phase="preparing")
        seen: dict[str, list[float]] = {}  # phase -> the CLI's clock at each epoch line
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip("\n")
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "epoch":
                    self._update(job, **self._progress(event, seen, finetune))
            elif line.startswith("error: "):
                self._update(job, reason=line[len("error: "):])
            elif line.startswith("warning: "):
                self._update(job, warnings=[*job.warnings, line[len("warning: "):]])
        code = proc.wait()
        reader.join()
        with self._lock:
            cancelled = job.status == "cancelling"
        if code == 0:
            try:
                result = json.loads("".join(stdout))
            except ValueError:
                result = None
            self._update(job, status="done", phase="done", time_left=0.0, result=result, ended=time.time())
        elif cancelled and self._steps() > steps_before:
            # Stopped after the manifest switch: the step is committed, whatever the exit status.
            self._update(job, status="done", phase="done", time_left=0.0, ended=time.time(),
                         reason="the cancel came after the step had committed; the new classes are learned")
        elif cancelled:
            self._update(job, status="cancelled", ended=time.time(), time_left=None,
                         reason="cancelled: the step process was stopped before it committed; the workspace is as it was")
        else:
            status = "refused" if code == REFUSED_EXIT and job.reason else "failed"
            reason = job.reason or f"the step process exited with status {code}"
            self._update(job, status=status, reason=reason, ended=time.time(), time_left=None)
        shutil.rmtree(staging, ignore_errors=True)  # the uploads served their step, or its refusal

    @staticmethod
    def _progress(event: dict[str, Any], seen: dict[str, list[float]], finetune: int) -> dict[str, Any]:
        phase, epoch, epochs = str(event["phase"]), int(event["epoch"]), int(event["epochs"])
        clock = seen.setdefault(phase, [])
        clock.append(float(event["seconds"]))
        # The first epoch of a phase has no start time on this clock; from the second on, the
        # mean gap between epoch lines is the epoch time.
        per_epoch = (clock[-1] - clock[0]) / (len(clock) - 1) if len(clock) > 1 else None
        remaining = epochs - epoch + (finetune if phase == "train" else 0)
        last = epoch == epochs and (phase == "finetune" or finetune == 0)
        return {"phase": "finishing" if last else phase, "epoch": epoch, "epochs": epochs,
                "loss": float(event["loss"]), "images_per_second": float(event["images_per_second"]),
                "time_left": None if per_epoch is None else per_epoch * remaining}

    # -- read and cancel --------------------------------------------------------------------------
    def get(self, job_id: str) -> JobState | None:
        return self._jobs.get(job_id)

    def snapshot(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else job.to_dict()


    def cancel(self, job_id: str) -> JobState:
        with self._lock:
            job = self._jobs.get(job_id)
            proc = self._procs.get(job_id)
            if job is None or proc is None:
                raise KeyError(job_id)
            if job.status in FINISHED:
                return job
        self._update(job, status="cancelling")
        _terminate(proc)
        return job

    def shutdown(self) -> None:
        """Stop a step still running when the server stops: it would otherwise go on, unseen."""
        for job_id in list(self._procs):
            job = self._jobs[job_id]
            if job.status not in FINISHED:
                self.cancel(job_id)


def _terminate(proc: subprocess.Popen[str]) -> None:
    # SIGTERM ends the step at once (it sets no handler); what it had half-written is a
    # generation the manifest does not name, which the next writer deletes.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def remove_stale_staging(root: Path, workspace: Path) -> None:
    """At start: uploads a previous server left. Kept while the process the lock file names still
    lives (a step of a server killed without its clean-up may still be reading them)."""
    try:
        pid = int(json.loads((workspace / WRITER_LOCK).read_text())["pid"])
        os.kill(pid, 0)
        return  # that writer may be a step reading from here
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shutil.rmtree(root, ignore_errors=True)


def new_staging(root: Path) -> Path:
    """A fresh folder for one step's uploads, named by an unguessable id that is also the job's."""
    path = root / secrets.token_hex(8)
    path.mkdir(parents=True)
    return path
