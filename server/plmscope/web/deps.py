"""What the routes take from the app, declared once as ``Annotated`` dependencies.

A route names what it needs in its signature (``reader: Reader``, ``sae: SAE``, ``engine: Engine``)
and FastAPI builds it.  None of them runs a DuckDB query (the SAE rows are read when the atlas is
opened), so all are ``async def``: they stay on the event loop instead of taking a trip through
the thread pool, which under inference load cost a page more than the lookup itself.  Handlers
that read the atlas are plain ``def`` (FastAPI runs them in its thread pool), so no DuckDB query
ever runs on the event loop.
"""

from __future__ import annotations

from typing import Annotated, Optional

from fastapi import Depends, HTTPException, Path, Query, Request

from ..settings import Settings
from ..store.reader import AtlasReader
from .inference import InferenceService


def reader_of(request: Request) -> AtlasReader:
    return request.app.state.reader


async def _reader(request: Request) -> AtlasReader:
    return reader_of(request)


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _engine(request: Request) -> Optional[InferenceService]:
    return request.app.state.infer


def unavailable_message(request: Request) -> str:
    reason = getattr(request.app.state, "model_error", None) or "the models are not loaded"
    return f"live inference is not available on this server: {reason}"


async def _live_engine(request: Request) -> InferenceService:
    service = request.app.state.infer
    if service is None:
        raise HTTPException(503, unavailable_message(request))
    return service


def sae_or_404(reader: AtlasReader, sae_id: Optional[str]) -> dict:
    """The atlas's SAE ``sae_id`` (its first when None); no query (``AtlasReader.saes`` is read at open)."""
    saes = reader.saes()
    if not saes:
        raise HTTPException(404, "this atlas holds no SAE")
    if not sae_id:
        return saes[0]
    for s in saes:
        if s["sae_id"] == sae_id:
            return s
    raise HTTPException(404, f"this atlas has no SAE {sae_id!r}; it has {', '.join(s['sae_id'] for s in saes)}")


def latent_or_404(sae: dict, latent: int) -> int:
    if not 0 <= latent < sae["d_sae"]:
        raise HTTPException(404, f"SAE {sae['sae_id']} has latents 0..{sae['d_sae'] - 1}; there is no latent {latent}")
    return latent


async def _sae_in_query(
    reader: Annotated[AtlasReader, Depends(_reader)],
    sae: Annotated[Optional[str], Query(description="SAE id (default: the atlas's first)")] = None,
) -> dict:
    return sae_or_404(reader, sae)


async def _sae_in_path(reader: Annotated[AtlasReader, Depends(_reader)],
                 sae_id: Annotated[str, Path(description="SAE id")]) -> dict:
    return sae_or_404(reader, sae_id)


async def atlas_param(
    atlas: Annotated[Optional[str], Query(
        description="atlas build the link was made for (every page's links carry it); another build's id gets 409",
    )] = None,
) -> None:
    """Declares ``?atlas=`` on every route for the schema; ``AtlasIdMiddleware`` enforces it before routing."""


Reader = Annotated[AtlasReader, Depends(_reader)]
AppSettings = Annotated[Settings, Depends(_settings)]
Engine = Annotated[Optional[InferenceService], Depends(_engine)]
LiveEngine = Annotated[InferenceService, Depends(_live_engine)]
SAE = Annotated[dict, Depends(_sae_in_query)]
SAEInPath = Annotated[dict, Depends(_sae_in_path)]
