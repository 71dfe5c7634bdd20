"""Shared plumbing of the routes: one builder per page, three renderings (HTML, JSON, CSV), and
the OpenAPI description of what each rendering and each error looks like."""

from __future__ import annotations

import csv
import io
from typing import Iterable

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel



class CSVResponse(Response):
    media_type = "text/csv"


def pick_format(request: Request, forced: str | None) -> str:
    fmt = forced or request.query_params.get("format") or "html"
    if fmt not in ("html", "json", "csv"):
        raise HTTPException(422, f"format must be html, json or csv, not {fmt!r}")
    return fmt


def _cell(v):
    # Spreadsheet programs execute cells that start with these characters (CSV injection).
    if isinstance(v, str) and v[:1] in ("=", "+", "@", "\t", "\r"):
        return "'" + v
    if isinstance(v, (list, tuple)):
        return ";".join(str(x) for x in v)
    return v


def csv_response(rows: Iterable[dict], filename: str, columns: list[str]) -> Response:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_cell(r.get(c)) for c in columns])
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in filename)
    return Response(
        buf.getvalue(), media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{safe}"'},
    )


def model_json(model: BaseModel, status: int = 200) -> Response:
    """``model`` as JSON, serialised by pydantic-core in one pass.

    The same document as ``JSONResponse(model.model_dump(mode="json"))`` (compact separators,
    UTF-8, NaN/inf as null), without building the intermediate Python objects and encoding them
    again with the json module: a latent page (~60 KB, thousands of activations) cost 0.8 ms that
    way against 0.2 ms here.
    """
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def respond(request: Request, fmt: str, model: BaseModel, template: str, *, csv_rows=None, csv_name: str = "",
            csv_columns: list[str] | None = None, context: dict | None = None, status: int = 200):
    if fmt == "json":
        return model_json(model, status)
    if fmt == "csv":
        if csv_rows is None:
            raise HTTPException(404, "this page has no table to export as CSV; try the .json twin")
        return csv_response(csv_rows, csv_name, csv_columns or [])
    templates = request.app.state.templates
    ctx = {"m": model, "data": model.model_dump(mode="json"), **(context or {})}
    return templates.TemplateResponse(request, template, ctx, status_code=status)


# ---- OpenAPI: what the renderings and the errors look like ----
ERROR_BODY_REF = {"$ref": "#/components/schemas/ErrorBody"}  # registered by app.create_app
_STRING = {"schema": {"type": "string"}}
_RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}

_ERRORS = {
    400: "the request body cannot be parsed (not UTF-8 JSON, or a malformed multipart form)",
    404: "no such SAE, latent, protein or page",
    409: "the link's ?atlas= names another atlas build than the one served here",
    413: "the request body is larger than this server accepts",
    422: "invalid input: `detail` names the parameter and says what is wrong",
    429: "too many live-inference requests from this client; retry after Retry-After seconds",
    500: "server error; `detail` carries a reference to the server log",
    503: "live inference is unavailable (no model loaded) or its queue is full (then with Retry-After)",
}

HTML = {200: {"description": "the page", "content": {"text/html": _STRING}}}
CSV = {200: {"description": "the table as CSV (a file download)", "content": {"text/csv": _STRING}}}
REDIRECT = {303: {"description": "redirect to the page named in Location",
                  "headers": {"Location": {"description": "where the page is", "schema": {"type": "string"},
                                           "required": True}}}}


def errors(*codes: int, page: bool = False) -> dict:
    """OpenAPI ``responses`` for these error statuses: an ``ErrorBody`` as JSON, and for HTML pages
    also the error page (a page answers HTML unless the request accepts only JSON)."""
    content = {"application/json": {"schema": ERROR_BODY_REF}}
    if page:
        content["text/html"] = _STRING
    out = {}
    for code in codes:
        doc = {"description": _ERRORS[code], "content": content}
        if code == 429:
            doc["headers"] = {"Retry-After": {**_RETRY_AFTER, "required": True}}
        elif code == 503:
            doc["headers"] = {"Retry-After": _RETRY_AFTER}
        out[code] = doc
    return out


# every route takes ?atlas= (409) and can fail (500); 422 for its parameters
COMMON_ERRORS = (409, 422, 500)


def page_doc(*codes: int) -> dict:
    return {"response_class": HTMLResponse, "responses": {**HTML, **errors(*COMMON_ERRORS, *codes, page=True)}}


def json_doc(model: type[BaseModel] | None, *codes: int, success_headers: dict | None = None) -> dict:
    """``response_model`` and the error responses of a JSON route; ``success_headers`` documents
    headers of its 200 answer (OpenAPI header objects by name)."""
    responses = errors(*COMMON_ERRORS, *codes)
    if success_headers:
        responses[200] = {"headers": success_headers}
    return {"response_model": model, "responses": responses}


def csv_doc(*codes: int) -> dict:
    return {"response_class": CSVResponse, "responses": {**CSV, **errors(*COMMON_ERRORS, *codes)}}
