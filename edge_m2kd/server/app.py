"""`edge-m2kd serve`: the device's own web page. `create_app(settings)` builds the FastAPI app; the
CLI runs it with uvicorn. Routes are thin, like the CLI's commands: parse, call the library
(commands.py through views.py, uploads.py, jobs.py, exporters/), return JSON. A UserError is the
CLI's one-line reason, answered as `{"detail": line}` with 400 (409 for a busy workspace, 413
for an upload over a limit)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from edge_m2kd.errors import UserError
from edge_m2kd.files import default_engine_path
from edge_m2kd.locking import WorkspaceBusy
from edge_m2kd.server import uploads
from edge_m2kd.server.jobs import FINISHED, StepJobs, new_staging, remove_stale_staging
from edge_m2kd.server.security import Guard, ServerSettings
from edge_m2kd.server.views import WorkspaceViews
from edge_m2kd.workspace import Workspace

STAGING = "staging"  # WS/staging/<job id>/<class>/: uploads waiting for (or read by) their step
MAX_EPOCHS = 500
STREAM_KEEPALIVE_S = 15.0
STREAM_POLL_S = 0.2
WARM_JOIN_S = 120.0
STATIC = resources.files("edge_m2kd.server") / "static"


def create_app(settings: ServerSettings) -> FastAPI:
    ws_path = Path(settings.workspace)
    Workspace.open(ws_path)  # refuse a directory that is no workspace before serving anything
    views = WorkspaceViews(ws_path)
    jobs = StepJobs(ws_path)
    staging_root = ws_path / STAGING
    remove_stale_staging(staging_root, ws_path)
    slots = uploads.DecodeSlots(settings.limits.decode_slots)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warm = threading.Thread(target=views.warm, daemon=True, name="warm-views")
        warm.start()
        yield
        jobs.shutdown()
        # A server stopped seconds after it started would otherwise exit with the warm-up still
        # inside torch, which aborts the process (`terminate called without an active exception`).
        await run_in_threadpool(warm.join, WARM_JOIN_S)
        views.close()

    app = FastAPI(title="edge-m2kd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.views, app.state.jobs = settings, views, jobs
    app.add_middleware(Guard, settings=settings)

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError) -> JSONResponse:
        status = (413 if isinstance(e, uploads.TooLarge) else 409 if isinstance(e, WorkspaceBusy)
                  else 404 if isinstance(e, _NotFound) else 400)
        return JSONResponse({"detail": str(e)}, status_code=status)

    # -- the page -------------------------------------------------------------------------------------
    page = (STATIC / "index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        # The same for every caller, on every bind: it holds no token (the user brings it in the
        # URL's #fragment, security.py).
        return HTMLResponse(page)

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # -- overview: what the CLI's reports say -------------------------------------------------------------
    @app.get("/api/workspace")
    def workspace() -> dict[str, Any]:
        out = views.overview()
        out["job"] = jobs.snapshot(jobs.current) if jobs.current else None
        return out

    @app.get("/api/history")
    def history() -> dict[str, Any]:
        return views.history()

    @app.get("/api/history.png")
    def history_png() -> Response:
        return Response(views.history_png(), media_type="image/png")

    @app.get("/api/memory")
    def memory() -> dict[str, Any]:
        return views.memory()

    @app.get("/api/snapshots")
    def snapshots(verify: bool = False) -> dict[str, Any]:
        return views.snapshots(verify)

    @app.get("/api/classes/{class_id}/thumbnail.png")
    def thumbnail(class_id: int) -> Response:
        try:
            return Response(views.thumbnail(class_id), media_type="image/png")
        except KeyError:
            return JSONResponse({"detail": f"class {class_id} has no exemplar image"}, status_code=404)

    # -- teach: a step in its own process -------------------------------------------------------------------
    @app.post("/api/steps", status_code=202)
    async def start_step(request: Request) -> dict[str, Any]:
        """Multipart: `class` once per new class (in order) and `images-<i>` files for the i-th;
        optional `epochs`. Everything is checked and staged before the step starts; a busy
        workspace is refused before any of it (before the body is even read)."""
        limits = settings.limits
        await run_in_threadpool(jobs.refuse_if_busy)
        form = await _form(request, limits.max_files, limits.max_classes + 8)
        try:
            known = [c["name"] for c in views.manifest()["classes"]]
            names = uploads.check_names([str(v) for v in form.getlist("class")], limits, known)
            per_class = {name: [f for f in form.getlist(f"images-{i}") if isinstance(f, UploadFile)]
                         for i, name in enumerate(names)}
            epochs = _epochs(form.get("epochs"))
            staging = new_staging(staging_root)
            try:
                count = await uploads.stage(staging, per_class, views.input_size(), limits, slots)
                job = await run_in_threadpool(jobs.start, staging, names, count, epochs)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        finally:
            await form.close()
        return job.to_dict()

    @app.get("/api/jobs/current")
    def current_job() -> dict[str, Any] | None:
        return jobs.snapshot(jobs.current) if jobs.current else None

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        return _job_or_404(jobs, job_id)

    @app.get("/api/jobs/{job_id}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        """Server-sent events: the job's state each time it changes, until it ends."""
        _job_or_404(jobs, job_id)

        async def stream() -> AsyncIterator[str]:
            # Polls the job's version: cheap, and no thread is held per open stream.
            version, quiet = -1, 0.0
            while True:
                state = jobs.snapshot(job_id)
                if state is None:
                    return
                if state["version"] != version:
                    version, quiet = state["version"], 0.0
                    yield f"event: job\ndata: {json.dumps(state)}\n\n"
                    if state["status"] in FINISHED:
                        return
                elif quiet >= STREAM_KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keep-alive\n\n"  # a comment line: proxies and browsers keep the stream open
                await asyncio.sleep(STREAM_POLL_S)
                quiet += STREAM_POLL_S

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        _job_or_404(jobs, job_id)
        jobs.cancel(job_id)
        return _job_or_404(jobs, job_id)

    # -- try it -------------------------------------------------------------------------------------------------
    @app.post("/api/predict")
    async def predict(request: Request) -> dict[str, Any]:
        limits = settings.limits
        form = await _form(request, limits.max_predict_files, 4)
        try:
            files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
            top_k = _int(form.get("top_k"), "top_k", 1, 100, default=3)
            names, pixels = await uploads.read_images(files, views.input_size(), limits, slots)
        finally:
            await form.close()
        return await run_in_threadpool(views.predict, names, pixels, top_k)

    # -- export -------------------------------------------------------------------------------------------------
    @app.post("/api/export")
    def export(body: dict[str, Any] | None = None) -> dict[str, Any]:
        """`export --json`: ONNX with its parity gate, and a TensorRT engine when asked for (on a
        board with TensorRT). A writer, so refused while a step runs, with the lock's line. Its body
        is capped at a few KiB by the guard (413), before this parses it."""
        from exporters import export_workspace

        body = body or {}
        tensorrt = bool(body.get("tensorrt"))
        precision = str(body.get("precision") or ("fp16" if tensorrt else "fp32"))
        return export_workspace(ws_path, None, default_engine_path(ws_path) if tensorrt else None, precision)

    return app


async def _form(request: Request, max_files: int, max_fields: int) -> FormData:
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except HTTPException as e:  # Starlette's own refusal of a malformed or too-long form
        cls = uploads.TooLarge if "Too many" in str(e.detail) else UserError
        raise cls(f"{str(e.detail).rstrip('.')}; upload fewer files at a time") from None


def _job_or_404(jobs: StepJobs, job_id: str) -> dict[str, Any]:
    state = jobs.snapshot(job_id)
    if state is None:
        raise _NotFound(f"no step job {job_id!r} on this server")
    return state


class _NotFound(UserError):
    """An id that names no job: 404."""


def _int(value: Any, name: str, low: int, high: int, default: int | None) -> int | None:
    if value is None or value == "":
        return default
    try:
        number = int(str(value))
    except ValueError:
        raise UserError(f"{name} must be a whole number, got {str(value)[:20]!r}") from None
    if not low <= number <= high:
        raise UserError(f"{name} must be between {low} and {high}, got {number}")
    return number


def _epochs(value: Any) -> int | None:
    return _int(value, "epochs", 1, MAX_EPOCHS, default=None)
