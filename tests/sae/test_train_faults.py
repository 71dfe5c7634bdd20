"""`plmscope train-sae` killed (SIGKILL) while writing a checkpoint and while saving the SAE, then
resumed: it ends bit-identical to an uninterrupted run, with nothing temporary left behind."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from plmscope.cli import main

from tests._kill import mode, plain_mode, run_killed

from .conftest import TINY_TRAIN

# steps 10, a checkpoint every 3: checkpoints at 3, 6, 9 and the final one (4 publishes), then the
# SAE: weights (5th publish), sparsity (6th), cfg.json (7th)
POINTS = ["train:checkpoint-written:1", "publish:renamed:4", "publish:before-rename:5", "publish:renamed:6"]


@pytest.fixture(scope="module")
def straight(demo_fasta, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_faults") / "straight"
    assert main(_argv(demo_fasta, out)) == 0
    return out


def _argv(fasta, out):
    return ["train-sae", *TINY_TRAIN, "--fasta", str(fasta), "--buffer-size", "512", "--checkpoint-every", "3",
            "--steps", "10", "--out", str(out)]


@pytest.mark.parametrize("point", POINTS)
def test_train_sae_killed_then_resumed(straight, demo_fasta, tmp_path, point):
    out = tmp_path / "sae"
    run_killed(_argv(demo_fasta, out), point)
    resume = (out / "checkpoint" / "state.pt").is_file()  # killed before the first checkpoint: start again
    assert main([*_argv(demo_fasta, out), *(["--resume"] if resume else [])]) == 0
    a = load_file(str(straight / "sae_weights.safetensors"))
    b = load_file(str(out / "sae_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = sorted(p.name for p in out.rglob("*"))
    assert not [n for n in names if ".tmp-" in n], names
    assert mode(out / "sae_weights.safetensors") == plain_mode() and mode(out / "cfg.json") == plain_mode()
