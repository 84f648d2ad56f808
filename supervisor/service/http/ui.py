"""The status page, ``/ui``, and what it draws, ``/v1/glance``.

The page is three files shipped in the package (``page/``: HTML, CSS and a
little JavaScript; no build step, nothing fetched from elsewhere) that
poll ``/v1/glance`` once a second. ``/v1/glance`` is the same picture
``gpuvisor top`` draws (``supervisor.service.glance``), plus whether this
caller is an operator: the page shows the switch, restart and unload
buttons to operators only, and the admin routes check again anyway.

The door's admission guards these routes like every other: a token where
the API needs one. A browser cannot send a bearer header when a person
opens a link, so ``/ui?token=TOKEN`` sets it as a cookie once (see
``admission.py``) and the page is then reached without it.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from supervisor.api import Supervisor
from supervisor.service.glance import Glance
from supervisor.service.http.admin import is_operator
from supervisor.service.http.errors import ApiError
from supervisor.service.operators import Operators

# The page's files, by the name a request uses, with their media type.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page runs its own script and style, and nothing from anywhere else.
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _file(name: str) -> bytes:
    return resources.files("supervisor.service.http").joinpath("page", name).read_bytes()


def add_routes(app: FastAPI, sup: Supervisor, glance: Glance, operators: Operators) -> None:

    @app.get("/ui")
    async def page() -> Response:
        return Response(_file("index.html"), media_type=FILES["index.html"], headers=_HEADERS)

    @app.get("/ui/{name}")
    async def asset(name: str) -> Response:
        if name not in FILES:
            raise ApiError(404, f"the status page has no file {name[:100]!r}", "not_found")
        return Response(_file(name), media_type=FILES[name], headers=_HEADERS)

    @app.get("/v1/glance")
    async def picture(request: Request) -> Response:
        shown = glance.picture({**sup.status(), "modes": sorted(sup.config.modes)})
        shown["operator"] = is_operator(request, operators)
        return JSONResponse(shown, headers={"cache-control": "no-store"})
