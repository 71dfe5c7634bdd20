"""The single ``plmscope`` command line entry point.

Each sub-command lives next to the stage it drives and exposes ``add_arguments(parser)`` and
``run(args)`` (the shape of fair-esm's ``scripts/extract.py``); this module only wires them up.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import threads
from .errors import PlmscopeError

# name -> (module, one-line help).  Modules are imported lazily so that ``plmscope --help``
# does not import torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "train-sae": ("plmscope.sae.train", "train a sparse autoencoder on one pLM layer"),
    "eval-sae": ("plmscope.sae.evaluate", "measure an SAE's reconstruction and language-model loss"),
    "build": ("plmscope.atlas.build", "precompute an atlas (DuckDB) from a corpus and SAEs"),
    "merge": ("plmscope.atlas.merge", "merge shard states of an atlas build into one atlas"),
    "analyze": ("plmscope.analysis.run", "family specificity, patterns, concepts, probes, descriptions"),
    "scan": ("plmscope.causal.scan_command", "in-silico saturation mutagenesis of SAE latents (CSV/Parquet)"),
    "serve": ("plmscope.web.serve", "serve an atlas in the browser with live inference"),
    "view": ("plmscope.web.view", "write a standalone HTML 3D view of a latent on a structure"),
    "demo": ("plmscope.demo", "build the offline UniRep demo atlas and serve it"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (so ``--help`` stays fast and one
    sub-command's missing optional dependency cannot break the others)."""
    parser = argparse.ArgumentParser(
        prog="plmscope",
        description="plmscope: a microscope for protein language models (SAEs on ESM-2 and UniRep, atlas, browser)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _command_in(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    # Before any command imports torch: OpenMP reads its thread count and wait policy once (threads.py).
    threads.prepare_environment()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args._run(args)
    except PlmscopeError as exc:
        print(f"plmscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"plmscope {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
