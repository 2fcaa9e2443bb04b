"""The pgjournal dashboard: server-rendered pages over one schema, live by SSE.

``pgjournal dashboard`` serves it; a Starlette or FastAPI service can mount it::

    from pgjournal.dashboard import create_app
    service.mount("/pgjournal", create_app(app, token=os.environ["DASH_TOKEN"]))

It needs the ``dashboard`` extra (``pip install 'pgjournal[dashboard]'``, or
the path of your clone in place of ``pgjournal``):
nothing here imports Starlette or Jinja2 before ``create_app`` is called.
See docs/dashboard.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._install import extra_hint
from ..errors import ConfigurationError

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from ..app import App

#: The packages of the ``dashboard`` extra, by import name.
REQUIRED = ("starlette", "jinja2", "sse_starlette", "uvicorn", "python_multipart")
#: The pip command for this installation (a clone's path when installed from one).
INSTALL_HINT = extra_hint("dashboard")


def missing_packages() -> list[str]:
    """The packages of the ``dashboard`` extra that cannot be imported here."""
    import importlib.util

    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def require_extra() -> None:
    """Raise ``ConfigurationError`` naming the extra when a package of it is missing."""
    missing = missing_packages()
    if missing:
        raise ConfigurationError(
            f"the dashboard needs the 'dashboard' extra ({', '.join(missing)} not "
            f"installed): {INSTALL_HINT}")


def create_app(app: App, *, token: str | None = None, read_only: bool = False,
               reader_dsn: str | None = None, poll_interval: float = 1.0,
               allowed_origins: tuple[str, ...] | list[str] = (),
               login_to_read: bool = False, close_app: bool = False) -> Starlette:
    """The dashboard of ``app``'s schema as an ASGI (Starlette) application.

    ``token``: the secret that unlocks the actions (retry, cancel, signal,
    bulk, queue settings); without one the dashboard is read-only, as with
    ``read_only=True``. ``reader_dsn``: read through another role (e.g. one
    granted only SELECT); the actions always use ``app``'s connection.
    ``poll_interval``: seconds between the live checks while a page is open.
    ``allowed_origins``: origins (``https://ops.example.com``) whose forms may
    POST besides the host the request names (for a proxy that rewrites Host).
    ``login_to_read``: the pages too need a login (run inputs and outputs may
    be sensitive); needs ``token``. ``close_app``: close ``app`` when the
    dashboard's lifespan ends.
    """
    require_extra()
    from ._web import build

    return build(app, token=token, read_only=read_only, reader_dsn=reader_dsn,
                 poll_interval=poll_interval, allowed_origins=allowed_origins,
                 login_to_read=login_to_read, close_app=close_app)


__all__ = ["INSTALL_HINT", "create_app", "missing_packages", "require_extra"]
