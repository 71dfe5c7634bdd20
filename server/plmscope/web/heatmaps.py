"""The one place a per-residue heatmap is put together, for stored vectors and live results alike.

The latent page's examples, the protein page and live inference all hand a sequence and its
activations to ``assemble_heatmap``; the pages draw what it returns (``_macros.html heatmap_row``)
and the JSON twins return it, so the colour scale and the marked maximum cannot drift apart.
"""

from __future__ import annotations

from typing import Optional

from .api_models import Heatmap


def assemble_heatmap(
    sequence: str,
    activations: list[float],
    *,
    sae_id: str,
    latent: int,
    source: str,
    scale: Optional[float] = None,
    max_pos: Optional[int] = None,
    message: Optional[str] = None,
    inactive: Optional[str] = None,
    context_free: int = 0,
) -> Heatmap:
    """``activations[i]`` belongs to residue ``i + 1``; a pLM that saw only the first N residues gives N values.

    ``scale``: the activation drawn darkest (the latent's corpus maximum on the latent page); by
    default the row's own maximum.  ``max_pos``: the strongest residue when the caller knows it from
    full-precision values (the atlas's examples); else the first maximum of ``activations``.
    ``inactive`` replaces ``message`` when no residue is active.  ``context_free``: the SAE's pLM's
    context-free positions (``saes.context_free``); their values (live results have them) are kept but
    count for neither the maximum nor the activity, as in the atlas's statistics.
    """
    if len(activations) > len(sequence):
        raise ValueError(f"{len(activations)} activations for a sequence of {len(sequence)} residues")
    counted = activations[context_free:]
    max_act = max(counted) if counted else 0.0
    active = max_act > 0
    if max_pos is None and active:
        max_pos = counted.index(max_act) + 1 + context_free
    if not (scale and scale > 0):
        scale = max_act if active else 1.0
    return Heatmap(
        sae_id=sae_id, latent=latent, source=source, residues=sequence[: len(activations)], activations=activations,
        max_act=max_act, max_pos=max_pos if active else None, scale=scale, context_free=context_free,
        message=message if active or inactive is None else inactive,
    )


def no_heatmap(sae_id: str, latent: int, message: str) -> Heatmap:
    """A heatmap that could not be computed, and why."""
    return Heatmap(sae_id=sae_id, latent=latent, source="none", message=message)
