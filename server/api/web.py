"""The chat page: static files from server/web/, served at `/` and `/web/<file>`.

The page is a client of the server's own /v1 API, so these routes need no API key (like /health): the
page asks for the key and sends it on its /v1 calls. Only the files listed here are served, so no path a
client sends is ever joined onto the file system. `--no-web-ui` leaves the routes out: `/` is then the
usual 404 in OpenAI's error shape.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.api.errors import NotFound

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# name -> media type; anything else under /web/ is a 404.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",  # the page; it imports the three below
    "markdown.js": "text/javascript; charset=utf-8",
    "store.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

# Defence in depth behind the page's own escaping: no inline script, no foreign origin, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with the server: always revalidate (FileResponse sends ETag/Last-Modified).
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    return FileResponse(WEB_DIR / name, media_type=FILES[name], headers=HEADERS)


@router.get("/")
async def index() -> FileResponse:
    return _file("index.html")


@router.get("/web/{name}")
async def static_file(name: str) -> FileResponse:
    if name not in FILES:
        raise NotFound(f"no file /web/{name}")
    return _file(name)
