"""Error pages and JSON errors: clear messages for users, tracebacks only in the server log."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..errors import AtlasError, PlmscopeError
from .inference import QueueFull, RateLimited

log = logging.getLogger(__name__)

TITLES = {
    400: "Bad request", 404: "Not found", 405: "Method not allowed", 409: "Link made for another atlas",
    413: "Too large", 422: "Invalid input", 429: "Too many requests", 500: "Server error",
    503: "Temporarily unavailable",
}


def wants_json(request: Request) -> bool:
    path = request.url.path
    if path.endswith((".json", ".csv")) or path.startswith("/api/") or path.startswith("/health"):
        return True
    if request.query_params.get("format") in ("json", "csv"):
        return True
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def error_response(request: Request, status: int, detail: str, headers: dict | None = None, extra: dict | None = None):
    title = TITLES.get(status, "Error")
    if wants_json(request):
        return JSONResponse({"status": status, "error": title, "detail": detail}, status_code=status, headers=headers)
    templates = request.app.state.templates
    ctx = {"status": status, "title": title, "detail": detail, **(extra or {})}
    return templates.TemplateResponse(request, "error.html", ctx, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form"))
        msg = err.get("msg")
        if err.get("type") == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # our validators write for people; pydantic prefixes "Value error, "
        parts.append(f"{loc}: {msg}" if loc else str(msg))
    return "; ".join(parts) or "invalid request"


def _allowed_methods(request: Request) -> list[str]:
    # Starlette's Allow names the methods of the first route on the path only; /infer has two
    methods: set[str] = set()
    for route in request.app.router.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"there is no page at {request.url.path}"
        elif exc.status_code == 405:
            allowed = _allowed_methods(request)
            detail = f"{request.url.path} answers {', '.join(allowed)}, not {request.method}"
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return error_response(request, exc.status_code, detail, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(request, 422, _validation_message(exc))

    @app.exception_handler(RateLimited)
    async def rate_limited(request: Request, exc: RateLimited):
        return error_response(request, 429, str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return error_response(request, 503, str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(AtlasError)
    async def atlas_error(request: Request, exc: AtlasError):
        log.error("atlas error on %s: %s", request.url.path, exc)
        return error_response(request, 500, "the atlas could not be read; the server log says why")

    @app.exception_handler(PlmscopeError)
    async def user_error(request: Request, exc: PlmscopeError):
        return error_response(request, 422, str(exc))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        ref = uuid.uuid4().hex[:8]
        log.error("unhandled error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, f"something went wrong on the server (reference {ref}); it has been logged")
