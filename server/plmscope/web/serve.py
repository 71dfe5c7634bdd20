"""Serve an atlas in the browser: atlas pages, JSON twins, live pLM + SAE inference.

Example: ``plmscope serve --atlas atlas.duckdb --port 8000`` then open http://127.0.0.1:8000/.
Every setting can also be given as an environment variable ``PLMSCOPE_<NAME>`` (see settings.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from ..errors import AtlasError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atlas", default=None,
                   help="atlas .duckdb file (opened read-only); default: $PLMSCOPE_ATLAS (as in the Docker images)")
    p.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    p.add_argument("--workers", type=int, default=None, help="uvicorn worker processes (each loads the models)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where live inference runs")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                   help="pLM precision for live inference (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-model", action="store_true", help="do not load models: atlas pages only, /infer is off")


def settings_from_args(args: argparse.Namespace):
    from ..settings import Settings

    overrides = {}
    if args.atlas is not None:
        overrides["atlas"] = args.atlas
    elif not os.environ.get("PLMSCOPE_ATLAS"):
        raise AtlasError("no atlas given: pass --atlas FILE or set PLMSCOPE_ATLAS")
    for name in ("host", "port", "workers", "device", "dtype"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "no_model", False):
        overrides["load_model"] = False
    return Settings(**overrides)


def _factory():
    # uvicorn's worker processes import this; the parent passes the settings through the environment.
    from ..settings import Settings
    from .app import create_app

    return create_app(Settings())


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..store.reader import AtlasReader

    settings = settings_from_args(args)
    AtlasReader(settings.atlas).close()  # fail here, with a clear message, not inside a worker
    if not settings.frontend_dir.joinpath("templates").is_dir():
        raise AtlasError(f"front-end files not found under {settings.frontend_dir} (set PLMSCOPE_FRONTEND_DIR)")
    log.info("serving %s on http://%s:%d/", settings.atlas, settings.host, settings.port)
    if settings.workers > 1:
        for key, value in settings.model_dump(mode="json").items():
            os.environ[f"PLMSCOPE_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        uvicorn.run("plmscope.web.serve:_factory", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level="info")
    else:
        from .app import create_app

        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0
