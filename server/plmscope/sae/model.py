"""Sparse autoencoders on per-residue pLM representations.

Two architectures behind one interface (``SparseAutoencoder``):

* ``topk``: z = ReLU(TopK_k(W_enc^T (x - b_dec) + b_enc)) with the AuxK auxiliary loss for dead
  latents (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", section 2.4 / A.2): the
  ``aux_k`` dead latents with the largest pre-activations reconstruct the main reconstruction's
  residual; a latent is dead when it has not fired for ``dead_tokens`` tokens; coefficient 1/32.
* ``relu`` (SAELens "standard"): z = ReLU(W_enc^T (x - b_dec) + b_enc) with an L1 penalty on the
  latent activations weighted by decoder row norms (as InterPLM / Anthropic's April 2024 update).
  Decoder rows are kept unit-norm here too, so the weighting is 1 during training; it is kept in
  the formula so the penalty stays honest for any decoder that is not normalised.

Decoder rows are unit-norm **per latent**: row ``i`` of ``W_dec`` (d_sae, d_in) is latent ``i``'s
direction (``normalize_decoder_`` after each step, ``remove_parallel_grad_`` before it).

Input normalisation: x_n = (x - mean) / scale with a per-dimension mean and one scalar scale chosen
so that E||x_n||^2 = d_in (per-dimension variance 1 on average).  Training happens in x_n space; the
saved weights have the normalisation folded in (``raw_weights``) so that encode/decode of raw pLM
vectors is a plain SAELens forward with ``normalize_activations: "none"``:

    W_enc_raw = W_enc / scale     b_enc_raw = b_enc
    W_dec_raw = W_dec * scale     b_dec_raw = mean + scale * b_dec

(pre-activations are identical, so TopK selects the same latents; decoder rows then have norm
``scale`` in raw space.)  A model built from a saved cfg therefore carries the identity
normalisation; ``cfg['plmscope']['normalization']`` keeps mean/scale for reference and unfolding.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..errors import SAEError

# our architecture name -> SAELens 6 architecture name (``cfg.json['architecture']``)
SAELENS_ARCH = {"topk": "topk", "relu": "standard"}
OUR_ARCH = {v: k for k, v in SAELENS_ARCH.items()}

# Training defaults (stored in cfg['plmscope']['training'] so a checkpoint/resume sees the same).
DEFAULT_AUX_COEFF = 1.0 / 32.0  # Gao et al. 2024, A.2
DEFAULT_DEAD_TOKENS = 1_000_000  # paper: 10M tokens; our corpora are far smaller
DEFAULT_L1_COEFF = 5.0  # Anthropic April 2024 update, with E||x_n||^2 = d_in as here


def default_aux_k(d_in: int) -> int:
    # Gao et al. 2024 use 512 for GPT-sized d_model; d_in // 2 as EleutherAI's sparsify: on small
    # d_in a large k_aux overshoots the residual and pushes dead latents further down.
    return max(d_in // 2, 1)


def make_cfg(
    *,
    plm: str,
    layer: int,
    d_in: int,
    d_sae: int,
    architecture: str = "topk",
    k: int | None = 32,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A cfg.json dict in the SAELens 6 layout (TopKSAEConfig / StandardSAEConfig) + ``plmscope``."""
    if architecture not in SAELENS_ARCH:
        raise SAEError(f"unknown SAE architecture {architecture!r}; use 'topk' or 'relu'")
    if d_in < 1 or d_sae < 1:
        raise SAEError(f"SAE sizes must be positive (d_in={d_in}, d_sae={d_sae})")
    if architecture == "topk" and (k is None or not 1 <= k <= d_sae):
        raise SAEError(f"TopK needs 1 <= k <= d_sae; got k={k}, d_sae={d_sae}")
    hook_name = f"repr_layers.{layer}"  # fair-esm's repr_layers numbering (see plm/base.py)
    cfg: dict[str, Any] = {
        # SAELens 6 SAEConfig fields (sae_lens/saes/sae.py, sae_lens 6.54)
        "architecture": SAELENS_ARCH[architecture],
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # normalisation is folded into the weights
        "reshape_activations": "none",
        "metadata": {
            # SAELens reads this to pick its >= 6.0 config handling (handle_config_defaulting);
            # it is the cfg layout version we follow, not a claim that SAELens trained the SAE.
            "sae_lens_version": "6.0.0",
            "sae_lens_training_version": None,
            "model_name": plm,
            "hook_name": hook_name,
            "hook_head_index": None,
            "prepend_bos": False,
            "context_size": None,
        },
        # pre-6 SAELens readers and CONTRACTS.md look for these at top level too
        "model_name": plm,
        "hook_name": hook_name,
        "plmscope": {
            "plm": plm,
            "layer": int(layer),
            "normalization": {"mean": None, "scale": 1.0, "folded_into_weights": True},
            "corpus": {},
            "training": dict(training or {}),
            "metrics": {},
        },
    }
    if architecture == "topk":
        cfg["k"] = int(k)  # TopKSAEConfig.k
        cfg["rescale_acts_by_decoder_norm"] = False  # TopKSAEConfig; we select on raw pre-acts
    return cfg


class SparseAutoencoder(nn.Module):
    """TopK(+AuxK) or ReLU+L1 SAE; ``encode``/``decode``/``forward`` take raw pLM vectors."""

    def __init__(self, cfg: dict[str, Any], *, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = copy.deepcopy(cfg)
        arch = cfg.get("architecture")
        if arch not in OUR_ARCH:
            raise SAEError(f"unsupported SAE architecture {arch!r}; plmscope reads 'topk' and 'standard'")
        self.architecture = OUR_ARCH[arch]
        self.d_in = int(cfg["d_in"])
        self.d_sae = int(cfg["d_sae"])
        self.k = int(cfg["k"]) if self.architecture == "topk" else None
        train = cfg.get("plmscope", {}).get("training", {})
        self.aux_k = min(int(train.get("aux_k") or default_aux_k(self.d_in)), self.d_sae)
        def setting(key: str, default: Any) -> Any:  # a stored null means "not used / default"
            value = train.get(key)
            return default if value is None else value

        self.aux_coeff = float(setting("aux_coeff", DEFAULT_AUX_COEFF))
        self.dead_tokens = int(setting("dead_tokens", DEFAULT_DEAD_TOKENS))
        self.l1_coeff = float(setting("l1_coeff", DEFAULT_L1_COEFF))

        # Init (Gao et al. 2024 A.1): random unit decoder rows, encoder = decoder transpose.
        w = torch.randn(self.d_sae, self.d_in, generator=generator)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))
        # Identity normalisation until set_normalization (training) — a model from a saved cfg
        # has the normalisation folded into its weights already.
        self.register_buffer("norm_mean", torch.zeros(self.d_in))
        self.register_buffer("norm_scale", torch.ones(()))
        # tokens since each latent last fired (dead-latent tracking for AuxK and the dead fraction)
        self.register_buffer("tokens_since_fired", torch.zeros(self.d_sae, dtype=torch.long))

    # ---- contract properties -------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, generator: torch.Generator | None = None) -> "SparseAutoencoder":
        try:
            return cls(cfg, generator=generator)
        except (KeyError, TypeError, ValueError) as exc:
            raise SAEError(f"SAE cfg is incomplete or malformed: {exc!r}") from None

    @property
    def plm(self) -> str:
        return self.cfg["plmscope"]["plm"]

    @property
    def layer(self) -> int:
        return int(self.cfg["plmscope"]["layer"])

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # ---- normalisation -------------------------------------------------------------------
    @torch.no_grad()
    def set_normalization(self, mean: torch.Tensor, scale: float) -> None:
        self.norm_mean.copy_(mean.to(self.norm_mean))
        self.norm_scale.fill_(float(scale))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.norm_mean) / self.norm_scale

    def _normalized_input(self, x: torch.Tensor) -> torch.Tensor:
        """``normalize(x)`` in the encoder's dtype, skipping the two passes when the normalisation
        is the identity (every SAE loaded from disk: it is folded into the weights).  Bitwise the
        same: ``(x - 0) / 1 == x`` exactly in IEEE arithmetic."""
        x = x.to(self.W_enc.dtype)
        if float(self.norm_scale) == 1.0 and not bool(self.norm_mean.any()):
            return x
        return self.normalize(x)

    # ---- forward in normalised space -------------------------------------------------------
    def _pre(self, xn: torch.Tensor) -> torch.Tensor:
        pre = (xn - self.b_dec) @ self.W_enc
        if torch.is_grad_enabled() and pre.requires_grad:
            return pre + self.b_enc
        return pre.add_(self.b_enc)  # inference: same sum, no second (n, d_sae) buffer

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "relu":
            return torch.relu(pre)
        # SAELens TopK: top-k by value, ReLU on the kept values, zeros elsewhere.
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations (n, d_sae) >= 0 for raw pLM vectors (n, d_in)."""
        return self._activate(self._pre(self._normalized_input(x)))

    @torch.no_grad()
    def encode_topk(self, x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK SAE only: the k kept pre-activations and their latents, (n, k) each, unsorted,
        *before* the ReLU — exactly what ``encode`` scatters into its dense (n, d_sae) output
        (same operations, so the same values), without building or scanning that dense matrix.

        ``out``: a contiguous (>= n, d_sae) buffer in the encoder's dtype for the pre-activations,
        reused across calls by a streaming caller so that each block does not allocate (and
        free) an (n, d_sae) matrix of its own."""
        if self.architecture != "topk":
            raise SAEError("encode_topk needs a TopK SAE")
        xn = self._normalized_input(x)
        if out is None:
            pre = self._pre(xn)
        else:
            pre = torch.mm(xn - self.b_dec, self.W_enc, out=out[: xn.shape[0]]).add_(self.b_enc)
        return pre.topk(self.k, dim=-1, sorted=False)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction (n, d_in)."""
        return (z @ self.W_dec + self.b_dec) * self.norm_scale + self.norm_mean

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    # ---- training ------------------------------------------------------------------------
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    @torch.no_grad()
    def update_firing(self, z: torch.Tensor) -> None:
        fired = (z > 0).any(dim=0)
        self.tokens_since_fired += z.shape[0]
        self.tokens_since_fired[fired] = 0

    def training_loss(self, xn: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss on a batch of *normalised* vectors; also updates dead-latent tracking.

        ``mse`` is the squared error summed over dimensions, averaged over tokens (the objective);
        with E||x_n||^2 = d_in, ``mse / d_in`` is roughly the fraction of variance unexplained.
        """
        pre = self._pre(xn)
        z = self._activate(pre)
        x_hat = z @ self.W_dec + self.b_dec
        err = x_hat - xn
        mse = err.pow(2).sum(-1).mean()
        out = {"mse": mse, "z": z, "x_hat": x_hat}
        loss = mse
        dead = self.dead_mask()
        if self.architecture == "topk":
            aux = pre.new_zeros(())
            n_dead = int(dead.sum())
            if n_dead and self.aux_coeff > 0:
                # AuxK: the top-aux_k *dead* latents reconstruct the (detached) residual; the loss is
                # normalised by the residual's energy, as in openai/sparse_autoencoder.
                k_aux = min(self.aux_k, n_dead)
                vals, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
                z_aux = torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
                resid = (xn - x_hat).detach()
                aux = (z_aux @ self.W_dec - resid).pow(2).sum() / resid.pow(2).sum().clamp_min(1e-12)
                aux = torch.nan_to_num(aux)
                loss = loss + self.aux_coeff * aux
            out["aux"] = aux
        else:
            l1 = (z * self.W_dec.norm(dim=1)).sum(-1).mean()
            out["l1"] = l1
            loss = loss + self.l1_coeff * l1
        out["loss"] = loss
        self.update_firing(z.detach())
        return out

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each decoder row (keeps rows on the unit sphere)."""
        if self.W_dec.grad is not None:
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(dim=1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row (one latent's direction, dim=1) to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # ---- raw-space (folded) weights --------------------------------------------------------
    @torch.no_grad()
    def raw_weights(self) -> dict[str, torch.Tensor]:
        """SAELens state dict in raw pLM space (normalisation folded in), float32 CPU, contiguous."""
        return fold_normalization(
            {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec},
            self.norm_mean,
            float(self.norm_scale),
        )

    def normalization_cfg(self) -> dict[str, Any]:
        return {
            "mean": [float(v) for v in self.norm_mean.cpu()],
            "scale": float(self.norm_scale),
            "folded_into_weights": True,
        }

    @torch.no_grad()
    def load_raw_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load folded weights; the model then uses the identity normalisation."""
        expected = {
            "W_enc": (self.d_in, self.d_sae),
            "b_enc": (self.d_sae,),
            "W_dec": (self.d_sae, self.d_in),
            "b_dec": (self.d_in,),
        }
        for name, shape in expected.items():
            if name not in weights:
                raise SAEError(f"SAE weights lack {name!r} (found {sorted(weights)})")
            if tuple(weights[name].shape) != shape:
                raise SAEError(f"SAE weight {name} has shape {tuple(weights[name].shape)}, cfg says {shape}")
            getattr(self, name).copy_(weights[name].to(torch.float32))
        self.norm_mean.zero_()
        self.norm_scale.fill_(1.0)


def fold_normalization(weights: dict[str, torch.Tensor], mean: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """Normalised-space weights -> raw-space weights (see the module docstring)."""
    if not (math.isfinite(scale) and scale > 0):
        raise SAEError(f"normalisation scale must be a positive number, got {scale}")
    mean = mean.detach().to(torch.float32).cpu()
    return {
        "W_enc": (weights["W_enc"].detach().float().cpu() / scale).contiguous(),
        "b_enc": weights["b_enc"].detach().float().cpu().clone().contiguous(),
        "W_dec": (weights["W_dec"].detach().float().cpu() * scale).contiguous(),
        "b_dec": (mean + scale * weights["b_dec"].detach().float().cpu()).contiguous(),
    }


def unfold_normalization(raw: dict[str, torch.Tensor], mean: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """Inverse of ``fold_normalization``: raw-space weights -> normalised-space weights."""
    mean = mean.to(torch.float32)
    return {
        "W_enc": raw["W_enc"] * scale,
        "b_enc": raw["b_enc"].clone(),
        "W_dec": raw["W_dec"] / scale,
        "b_dec": (raw["b_dec"] - mean) / scale,
    }
