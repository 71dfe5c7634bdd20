"""Settings of the web app (``plmscope serve``), read from arguments and ``PLMSCOPE_*`` variables.

Every limit the server enforces lives here so that an operator can see and change it in one
place; ``plmscope serve`` overrides the few it exposes as flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_frontend_dir() -> Path:
    # The package lives in REPO/server/plmscope; the templates and static files in REPO/frontend.
    return Path(__file__).resolve().parents[2] / "frontend"


class Settings(BaseSettings):
    """Configuration of one server process."""

    model_config = SettingsConfigDict(env_prefix="PLMSCOPE_", extra="ignore")

    atlas: Path = Field(Path("atlas.duckdb"), description="DuckDB atlas file to serve (opened read-only)")
    host: str = Field("127.0.0.1", description="interface to listen on; 0.0.0.0 exposes the server to the network")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    workers: int = Field(1, ge=1, description="uvicorn worker processes; each loads its own copy of the models")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where live inference runs: auto = CUDA when available, else CPU"
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="pLM precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 on a CPU needs native bf16 (avx512_bf16/amx)"
    )
    max_residues: int = Field(1022, ge=1, description="longest sequence accepted for live inference")
    max_request_bytes: int = Field(
        256 * 1024, ge=1024, description="largest request body accepted (JSON or form), in bytes"
    )
    rate_limit_per_minute: int = Field(
        60, ge=0, description="live inference requests per client IP per minute (0 = no limit)"
    )
    infer_batch_size: int = Field(
        8, ge=1, description="most sequences computing at once, shared between the workers' batches (2 workers: "
                             "batches of 4); 1 = one request at a time"
    )
    infer_max_wait_ms: float = Field(
        10.0, ge=0, description="under load (the previous batch had several requests), how long a lone first request of a batch waits for others; on an idle server a request never waits"
    )
    infer_threads: int = Field(
        0, ge=0, description="torch threads of the live-inference worker; 0 = automatic: 1 when every served model "
                             "runs on a GPU, else OMP_NUM_THREADS, which `plmscope serve` sets to the CPUs it may use "
                             "(CPU affinity, cgroup quota) unless given"
    )
    infer_workers: int = Field(
        0, ge=0, description="batches that may compute at once, each on its own worker thread, the torch threads shared "
                             "out between them; 0 = automatic: 2 on a CPU with 2 or more usable cores (two one-thread "
                             "forwards outrun one two-thread forward of small batches), 1 on a GPU"
    )
    infer_nice: int = Field(
        10, ge=0, le=19,
        description="how much lower the inference threads' CPU priority is than the page-serving threads' (Linux nice "
                    "increment): on shared cores page requests preempt a running forward instead of queueing behind it",
    )
    infer_queue_size: int = Field(
        64, ge=1, description="requests waiting for the model beyond which new ones get 503 + Retry-After"
    )
    db_threads: int = Field(
        1, ge=0, description="DuckDB threads of the served atlas; 0 = DuckDB's default (every core). Page reads are "
                             "point lookups: with one thread each runs wholly on the thread that asked, not also on "
                             "DuckDB workers that inference or other processes may keep waiting on shared cores"
    )
    scan_max_window: int = Field(
        4, ge=1, description="most residues a live mutation scan mutates (19 variants each; scripts/bench_causal.py: 8 residues of a 300-residue protein take 9-15 s on one CPU core); larger scans: `plmscope scan`"
    )
    cache_size: int = Field(256, ge=0, description="inference results kept in the LRU cache (by sequence hash)")
    max_upload_bytes: int = Field(
        5 * 1024 * 1024, ge=1024, description="largest PDB/mmCIF upload accepted on /infer, in bytes"
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed by CORS; empty = CORS off (same-origin only)"
    )
    load_model: bool = Field(
        True, description="load the pLM and SAEs for live inference; off = atlas pages only, /infer says so"
    )
    frontend_dir: Path = Field(
        default_factory=_default_frontend_dir, description="directory holding templates/ and static/"
    )
