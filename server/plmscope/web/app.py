"""The FastAPI application: ``create_app(settings)``.

Nothing is opened or loaded at import time: the lifespan opens the atlas (read-only) and, when
``settings.load_model`` is on, loads every SAE embedded in the atlas and its pLM.  A model that
fails to load does not take the pages down: /health reports it and /infer says why it is off.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from ..settings import Settings
from ..store.reader import AtlasReader
from . import errors as web_errors
from .api_models import ErrorBody
from .deps import atlas_param
from .inference import InferenceService, load_models
from .middleware import AtlasIdMiddleware, BodyLimitMiddleware
from .templating import make_templates

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reader = await asyncio.to_thread(AtlasReader, settings.atlas, settings.db_threads)
        app.state.reader = reader
        app.state.infer = None
        app.state.model_error = None if settings.load_model else "live inference is switched off on this server (--no-model)"
        app.state.device = None
        if settings.load_model:
            try:
                models = await asyncio.to_thread(load_models, reader, settings.device, settings.dtype)
                service = InferenceService(models, settings)
                await service.start()
                app.state.infer = service
                app.state.device = str(next(iter(models.values())).plm.device) if models else None
                log.info("live inference ready on %s for %s", app.state.device, ", ".join(models) or "no SAE")
            except Exception as exc:  # pages must keep working without a model
                log.exception("could not load the models for live inference")
                app.state.model_error = f"the models could not be loaded: {exc}"
        try:
            yield
        finally:
            if app.state.infer is not None:
                await app.state.infer.stop()
            await asyncio.to_thread(reader.close)

    app = FastAPI(
        title="plmscope",
        summary="Sparse-autoencoder latents of protein language models: atlas browser and live inference",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI would load its assets from a CDN; /openapi.json is enough
        redoc_url=None,
        dependencies=[Depends(atlas_param)],
    )
    app.state.settings = settings
    app.state.templates = make_templates(settings.frontend_dir / "templates")

    if settings.cors_origins:  # off unless an operator lists origins
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"])
    app.add_middleware(AtlasIdMiddleware)
    app.add_middleware(BodyLimitMiddleware, settings=settings)

    web_errors.install(app)
    app.mount("/static", StaticFiles(directory=settings.frontend_dir / "static"), name="static")

    from .routes import analysis, api, health, infer, pages, perturb
    from .routes.common import COMMON_ERRORS, errors

    app.include_router(health.router)
    app.include_router(api.make_router(settings))
    app.include_router(infer.make_router(settings))
    app.include_router(perturb.make_router(settings))
    app.include_router(analysis.router, responses=errors(*COMMON_ERRORS))
    app.include_router(pages.router)
    _register_error_body(app)
    return app


def _register_error_body(app: FastAPI) -> None:
    """Error responses refer to ``ErrorBody`` by name (``routes.common.errors``): put it in the schema's components."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {})["ErrorBody"] = ErrorBody.model_json_schema()
        return app.openapi_schema

    app.openapi = openapi
