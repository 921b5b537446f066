"""`edge-m2kd serve`: the device's web page (app.py), its security (security.py), uploads
(uploads.py), the step process it starts (jobs.py) and what it reads (views.py). The learner never
imports this package."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_m2kd.server.security import ServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["ServerSettings", "create_app"]


def create_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI app for ``settings.workspace`` (FastAPI and the routes load only when called)."""
    from edge_m2kd.server.app import create_app as create

    return create(settings)
