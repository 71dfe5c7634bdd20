"""Jinja2 environment of the pages: autoescaping on, a few number filters, URL helpers.

Every link a page builds goes through ``url_for_state`` so that it carries the atlas id: a link
copied today still names the atlas build it was made for.
"""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import urlencode

from fastapi.templating import Jinja2Templates
from starlette.requests import Request

from ..vocab import colour_scale


def fmt_num(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if not isinstance(x, float) or not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) < 10 ** -(digits):
        return f"{x:.1e}"
    return f"{x:.{digits}g}"


def fmt_pct(x, digits: int = 1) -> str:
    if x is None:
        return "–"
    return f"{100 * float(x):.{digits}f}%"


def make_url(request: Request, path: str, **params) -> str:
    """``path`` with ``params`` (None values dropped) and the served atlas id."""
    reader = getattr(request.app.state, "reader", None)
    query = {k: v for k, v in params.items() if v is not None and v != ""}
    if reader is not None and reader.atlas_id:
        query["atlas"] = reader.atlas_id
    return path + ("?" + urlencode(query, doseq=True) if query else "")


def with_query(request: Request, **changes) -> str:
    """The current URL with some query parameters replaced (None removes one)."""
    query = dict(request.query_params)
    for k, v in changes.items():
        if v is None:
            query.pop(k, None)
        else:
            query[k] = str(v)
    return make_url(request, request.url.path, **query)


def twin_url(request: Request, ext: str = ".json") -> str:
    """The JSON twin (or CSV export) of the current page, same query."""
    path = request.url.path
    path = "/" + ext if path == "/" else path + ext
    query = request.url.query
    return path + ("?" + query if query else "")


def make_templates(directory: Path) -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(directory))
    env = templates.env
    env.autoescape = True  # every value from the corpus or the user is escaped
    env.filters["num"] = fmt_num
    env.filters["model"] = model_label
    env.filters["pct"] = fmt_pct
    env.globals["make_url"] = make_url
    env.globals["with_query"] = with_query
    env.globals["twin_url"] = twin_url
    env.globals["colour_scale"] = colour_scale()  # base.html hands it to plmscope.js as JSON
    return templates


def model_label(spec: str) -> str:
    """A pLM spec for display: local checkpoint paths shrink to their file stem (the full path
    stays in the element's title and in the JSON twin)."""
    if "/" in spec or spec.endswith(".pt"):
        return spec.rsplit("/", 1)[-1].removesuffix(".pt")
    return spec
