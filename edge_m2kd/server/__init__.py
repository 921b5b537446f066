"""`edge-m2kd serve`: the device's web page (app.py), its security (security.py), uploads
(uploads.py), the step process it starts (jobs.py) and what it reads (views.py). The learner never
imports this package."""

from edge_m2kd.server.security import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def create_app(settings: ServerSettings):  # noqa: ANN201 - FastAPI is imported only when serving
    from edge_m2kd.server.app import create_app as create

    return create(settings)
