"""The operator status page: `GET /status` (HTML), `GET /status/data` (the JSON it polls), `POST /status/login`.

It shows money, so everything but the static script and stylesheet needs the operator token (`[status] token`,
env DCML_NODE__STATUS__TOKEN): as `Authorization: Bearer <token>` (the CLI) or as the HttpOnly, SameSite=Strict
cookie the login form sets (a browser). The cookie holds an HMAC of the token, never the token. Compared in
constant time. No external assets, no inline script or style: the CSP allows only this origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from dcml.client.wire.errors import ErrorType, error_object
from dcml.node.status import StatusCollector

COOKIE = "dcml_status"
ASSETS = Path(__file__).parent / "status_assets"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY", "Cache-Control": "no-store"}

_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dcml node status: sign in</title>
<link rel="stylesheet" href="/status/app.css"></head>
<body><main class="login"><h1>dcml node status</h1>
<form method="post" action="/status/login"><label for="token">Operator token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<button id="sign-in" type="submit">Sign in</button></form>{message}</main></body></html>
"""


def _cookie_value(token: str) -> str:
    return hmac.new(token.encode(), b"dcml status page session", hashlib.sha256).hexdigest()


def _secured(response: Response) -> Response:
    response.headers.update(_HEADERS)
    return response


def status_router(collector: StatusCollector, token: str | None) -> APIRouter:
    router = APIRouter()
    expected_cookie = _cookie_value(token) if token else None

    def allowed(request: Request) -> bool:
        if token is None:
            return False
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(cookie.encode(), expected_cookie.encode())  # type: ignore[union-attr]

    def disabled() -> Response:
        return _secured(JSONResponse(error_object("the status page is off: set [status] token "
                                                  "(DCML_NODE__STATUS__TOKEN)", ErrorType.INVALID_REQUEST,
                                                  "status_disabled"), status_code=404))

    def login_page(message: str = "", status: int = 401) -> Response:
        text = f'<p class="error" id="login-error">{message}</p>' if message else ""
        return _secured(HTMLResponse(_LOGIN.format(message=text), status_code=status))

    @router.get("/status", include_in_schema=False)
    async def page(request: Request) -> Response:
        if token is None:
            return disabled()
        if not allowed(request):
            return login_page()
        return _secured(HTMLResponse((ASSETS / "status.html").read_text()))

    @router.post("/status/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if token is None:
            return disabled()
        body = await request.body()
        given = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
        if not hmac.compare_digest(given.encode(), token.encode()):
            await asyncio.sleep(0.5)  # slows guessing; the token is long anyway
            return login_page("Wrong token.")
        response = RedirectResponse("/status", status_code=303)
        response.set_cookie(COOKIE, expected_cookie or "", httponly=True, samesite="strict", path="/status",
                            secure=request.url.scheme == "https")
        return _secured(response)

    @router.get("/status/data", include_in_schema=False)
    async def data(request: Request) -> Response:
        if token is None:
            return disabled()
        if not allowed(request):
            return _secured(JSONResponse(error_object("operator token required", ErrorType.UNAUTHORIZED,
                                                      "status_unauthorized"), status_code=401,
                                         headers={"WWW-Authenticate": "Bearer"}))
        return _secured(JSONResponse(await asyncio.to_thread(collector.snapshot)))

    @router.get("/status/app.js", include_in_schema=False)
    async def script() -> Response:
        return _secured(Response((ASSETS / "status.js").read_bytes(), media_type="text/javascript"))

    @router.get("/status/app.css", include_in_schema=False)
    async def style() -> Response:
        return _secured(Response((ASSETS / "status.css").read_bytes(), media_type="text/css"))

    return router
