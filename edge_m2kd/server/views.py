"""What the page reads, as a reader of the workspace: the CLI's own reports (commands.py: the same
functions `history --json`, `memory --json` and `snapshots --json` print), thumbnails from the
exemplars, and the device predictor. A reader takes no writer lock and reads the last committed
generation, so all of this keeps answering while a step runs in its own process.

Each result is kept until the workspace changes: the key is the generation the manifest names
(and, for what depends on them, the exports' modification times), so a commit or an export is
picked up by the next request, and a page polling the overview does not rebuild snapshots.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edge_m2kd import commands
from edge_m2kd.errors import UserError
from edge_m2kd.files import EXPORTS
from edge_m2kd.workspace import Workspace

THUMBNAIL_PX = 64


class WorkspaceViews:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one computation of a view at a time
        self._predict_lock = threading.Lock()  # one prediction at a time, never behind a report
        self._cache: dict[str, tuple[Any, Any]] = {}
        self._predictor: Any = None
        self._predictor_key: Any = None
        self._passed_over: list[str] = []

    # -- keys ------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return Workspace.open(self.path).manifest

    def _exports_stamp(self) -> tuple[tuple[str, int], ...]:
        folder = self.path / EXPORTS
        files = sorted(folder.iterdir()) if folder.is_dir() else []
        return tuple((p.name, p.stat().st_mtime_ns) for p in files if p.is_file())

    def _cached(self, name: str, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and hit[0] == key:
                return hit[1]
            value = compute()
            self._cache[name] = (key, value)
            return value

    # -- the CLI's reports --------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        m = self.manifest()
        cfg = m["config"]
        return {
            "workspace": str(self.path),
            "steps": len(m["history"]),
            "generation": m.get("generation"),
            "classes": [{"id": c["id"], "name": c["name"], "step": c["step"]} for c in m["classes"]],
            "config": {"method": cfg.get("method"), "backbone": cfg["model"]["backbone"],
                       "input_size": cfg["model"]["input_size"], "pretrained": cfg["model"].get("pretrained"),
                       "snapshots": cfg["snapshots"]["policy"], "exemplars": cfg["memory"]["total"],
                       "epochs": cfg["train"]["epochs"]},
            "memory_budget": m.get("memory_budget"),
            "memory_budget_bytes": m.get("memory_budget_bytes"),
        }

    def history(self) -> dict[str, Any]:
        return self._cached("history", self.manifest().get("generation"), lambda: commands.history_report(self.path))

    def history_png(self) -> bytes:
        def draw() -> bytes:
            buf = io.BytesIO()
            commands.plot_history(commands.history_report(self.path), buf)  # type: ignore[arg-type]
            return buf.getvalue()

        return self._cached("history.png", self.manifest().get("generation"), draw)

    def memory(self) -> dict[str, Any]:
        key = (self.manifest().get("generation"), self._exports_stamp())
        return self._cached("memory", key, lambda: commands.memory_report(self.path))

    def snapshots(self, verify: bool) -> dict[str, Any]:
        return self._cached(f"snapshots-{verify}", self.manifest().get("generation"),
                            lambda: commands.snapshot_summary(commands.snapshot_report(self.path, verify)))

    def thumbnail(self, class_id: int) -> bytes:
        def draw() -> dict[int, bytes]:
            out = {}
            for c, img in Workspace.open(self.path).first_exemplars().items():
                # Nearest-neighbour: a 16 or 32 px exemplar stays crisp rather than blurred.
                pic = Image.fromarray(np.ascontiguousarray(img)).resize((THUMBNAIL_PX, THUMBNAIL_PX),
                                                                      Image.Resampling.NEAREST)
                buf = io.BytesIO()
                pic.save(buf, "PNG")
                out[c] = buf.getvalue()
            return out

        pngs = self._cached("thumbnails", self.manifest().get("generation"), draw)
        if class_id not in pngs:
            raise KeyError(class_id)
        return pngs[class_id]

    # -- predictions ---------------------------------------------------------------------------------
    def input_size(self) -> int:
        return int(self.manifest()["config"]["model"]["input_size"])

    def predict(self, names: list[str], pixels: np.ndarray, top_k: int) -> dict[str, Any]:
        """The `predict --json` report for uploaded images, from the fastest predictor that is
        current (device/predictor.py), plus which generation answered and the inference time."""
        from device.predictor import format_predictions, open_preferred_predictor

        if top_k < 1:
            raise UserError(f"top_k must be at least 1, got {top_k}")
        with self._predict_lock:
            manifest = self.manifest()
            if not manifest["history"]:
                raise UserError(f"{self.path} has learned no classes yet; teach it a class first")
            key = (manifest.get("generation"), self._exports_stamp())
            if key != self._predictor_key:
                if self._predictor is not None:
                    self._predictor.close()
                    self._predictor = None
                self._predictor, self._passed_over = open_preferred_predictor(self.path, device="auto")
                self._predictor_key = key
            p = self._predictor
            start = time.perf_counter()
            logits = p.predict(pixels)
            seconds = time.perf_counter() - start
            report = format_predictions(names, logits, p.class_names, top_k, p.backend)
        report.update(device=p.device, inference_ms=1000 * seconds, generation=key[0],
                      steps=len(manifest["history"]), passed_over=self._passed_over)
        return report

    def warm(self) -> None:
        """Compute what the first page load asks for (and open the predictor) before anyone asks:
        the first memory report imports torch's compiler stack and the first plot matplotlib,
        seconds on a board. Errors are left for the requests themselves to report."""
        try:
            self.overview()
            self.history()
            self.memory()
            self.snapshots(False)
            if self.manifest()["history"]:
                self.history_png()
                self.thumbnail(0)
                size = self.input_size()
                self.predict(["warm-up"], np.zeros((1, size, size, 3), np.uint8), 1)
        except Exception:  # noqa: BLE001 - warming is an optimisation; the request path reports errors
            pass

    def close(self) -> None:
        with self._predict_lock:
            if self._predictor is not None:
                self._predictor.close()
                self._predictor = None
