"""Shared plumbing of the routes: one builder per page, three renderings (HTML, JSON, CSV)."""

from __future__ import annotations

import csv
import io
from typing import Iterable

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from ...store.reader import AtlasReader


def reader_of(request: Request) -> AtlasReader:
    return request.app.state.reader


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


def respond(request: Request, fmt: str, model: BaseModel, template: str, *, csv_rows=None, csv_name: str = "",
            csv_columns: list[str] | None = None, context: dict | None = None, status: int = 200):
    if fmt == "json":
        return JSONResponse(model.model_dump(mode="json"), status_code=status)
    if fmt == "csv":
        if csv_rows is None:
            raise HTTPException(404, "this page has no table to export as CSV; try the .json twin")
        return csv_response(csv_rows, csv_name, csv_columns or [])
    templates = request.app.state.templates
    ctx = {"m": model, "data": model.model_dump(mode="json"), **(context or {})}
    return templates.TemplateResponse(request, template, ctx, status_code=status)
