"""The analyze step "output effects": every live latent's effect on the pLM's output distribution
(``causal.output_effect``), on its ``--output-effect-examples`` strongest atlas examples."""

from __future__ import annotations

import numpy as np

from ..causal.output_effect import OutputEffects, OutputEffectSettings, make_example, output_effects
from ..store import analysis_reads as reads
from ..store import analysis_writes as writes
from ..store.reader import decode_activations, read_sae_weights


def compute(con, inputs, plms: dict, settings, progress) -> tuple[OutputEffects | None, dict]:
    """(effects or None when skipped, the summary's ``output_effects`` entry)."""
    n = settings.output_effect_examples
    if n <= 0:
        with progress.step("output effects: skipped", "output_effects"):
            return None, {"skipped": "--output-effect-examples 0"}
    oe = OutputEffectSettings(examples=n, token_budget=settings.token_budget)
    plm = plms.get(inputs.sae["plm"])
    if plm is None:
        with progress.step("output effects: load pLM", "output_effects"):
            from ..plm import load_plm

            plm = plms[inputs.sae["plm"]] = load_plm(inputs.sae["plm"], device=settings.device)
    from ..sae.io import sae_from_bytes

    cfg, weights = read_sae_weights(con, inputs.sae_id, settings.atlas)
    sae = sae_from_bytes(cfg, weights).to(plm.device).eval()
    examples = []
    for latent, acc, seq, blob in reads.top_example_proteins(con, inputs.sae_id, n):
        if not inputs.live[latent]:
            continue
        acts = np.asarray(decode_activations(blob, float(inputs.lat.max_act[latent])))
        ex = make_example(latent, acc, seq, acts, oe.max_residues)
        if ex is not None:
            examples.append(ex)
    with progress.step("output effects: ablate on top examples", "output_effects", total=len(examples), unit="example") as bar:
        res = output_effects(plm, sae, examples, oe, progress=bar.update)
    return res, {"n_latents": int(len(res.latents)), "examples_per_latent": n, "n_examples": len(examples),
                 "max_residues": oe.max_residues,
                 "definition": "mean over read-out positions of log p_clean(a) - log p_ablated(a), the latent "
                               "ablated (error term kept) on its top examples; > 0: the latent promotes a"}


def write(con, sae_id: str, res: OutputEffects | None) -> None:
    if res is not None and len(res.latents):
        writes.write_output_effects(con, sae_id, res.latents, res.effect, res.n_examples, res.n_positions)
