"""ASGI middleware: request body limits and atlas-id checks on permalinks."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response


class BodyLimitMiddleware:
    """Refuse bodies above the limit before they are read into memory (413).

    Multipart posts (the structure upload on /infer) may reach ``max_upload_bytes`` plus room for
    the form fields; everything else ``max_request_bytes``.  Bodies without Content-Length are
    counted as they stream in.
    """

    def __init__(self, app: ASGIApp, settings):
        self.app = app
        self.settings = settings

    def _limit(self, scope: Scope) -> int:
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        if ctype.startswith("multipart/form-data"):
            return self.settings.max_upload_bytes + self.settings.max_request_bytes
        return self.settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self._limit(scope)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._reject(scope, receive, send, limit)
        seen = 0
        exceeded = False

        async def counting_receive():
            # Past the limit the app gets an empty final chunk (it fails to parse) and its answer is
            # replaced by our 413: raising here would be turned into a 400 by the body parser.
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message):
            if not exceeded:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)
        if exceeded:
            await self._reject(scope, receive, send, limit)

    async def _reject(self, scope, receive, send, limit: int) -> None:
        request = Request(scope, receive)
        response = error_response(request, 413, f"the request body is larger than this server accepts ({limit:,} bytes)")
        await response(scope, receive, send)


class AtlasIdMiddleware:
    """A link carrying ``?atlas=ID`` of another atlas build gets 409, not other data."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/static/"):
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        wanted = request.query_params.get("atlas")
        reader = getattr(request.app.state, "reader", None)
        if wanted and reader is not None and wanted != reader.atlas_id:
            detail = (
                f"this link was made for atlas build {wanted}, but this server holds atlas build "
                f"{reader.atlas_id}. Latent numbers and stored results differ between builds, so the link "
                f"is not followed; open the page without the atlas id to see this build's data"
            )
            plain = str(request.url.remove_query_params("atlas"))
            response = error_response(request, 409, detail, extra={"plain_url": plain, "json": json.dumps(wanted)})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)
