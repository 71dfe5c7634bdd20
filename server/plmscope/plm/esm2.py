"""ESM-2 through fair-esm's own classes and loaders.

fair-esm 2.0.0 calls ``torch.load`` with torch's default ``weights_only=True`` (torch >= 2.6) and
fails on every ESM-2 checkpoint, because ``cfg["model"]`` is an ``argparse.Namespace``.  We read
the files ourselves with ``weights_only=True`` and an explicit allow-list (``SAFE_GLOBALS``) and
hand the dicts to ``esm.pretrained.load_model_and_alphabet_core``, so the model is still built
by fair-esm.  Nothing else in the process gets ``weights_only`` relaxed.

The forward pass is fair-esm's ``ESM2.forward`` written out layer by layer so that it can stop
after the requested layer and splice a replacement in (``lm_loss``); ``tests/plm/test_esm2.py``
checks it against ``model(tokens, repr_layers=[L])`` for every layer.
"""

from __future__ import annotations

import argparse
import logging
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ModelError
from .base import (LayerState, LossResult, ProteinLM, Splice, resolve_device, resolve_dtype, splice_residue_rows,
                   token_batches)

log = logging.getLogger(__name__)

# Where fair-esm downloads from (esm/pretrained.py); a module setting so tests can point it at
# an unroutable address and fail fast.
URL_BASE = "https://dl.fbaipublicfiles.com/fair-esm"

ESM2_NAMES = (
    "esm2_t6_8M_UR50D",
    "esm2_t12_35M_UR50D",
    "esm2_t30_150M_UR50D",
    "esm2_t33_650M_UR50D",
    "esm2_t36_3B_UR50D",
    "esm2_t48_15B_UR50D",
)

# The only Python objects (besides tensors and containers) an ESM-2 checkpoint holds.
SAFE_GLOBALS = [argparse.Namespace]

# Official architectures, for save_random_esm2(arch=...): (layers, embed_dim, heads).
ARCHS = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}

MAX_RESIDUES = 1022  # 1024 positions minus BOS/EOS, as fair-esm's extract.py truncates
# On a CPU a forward runs in pieces of at most this many padded tokens, whatever the caller's token
# budget: a batch's activations then stay in cache.  ESM-2 8M layer 3 of 6, 40 demo proteins, one
# thread: 2.2x fair-esm's fastest way at 4,096 tokens against 1.5x at 8,192 and 1.0x at 16,384
# (fp32; bf16: 4.7x / 3.0x / 1.8x; scripts/bench_representations.py --token-budget).
CPU_BATCH_TOKENS = 4096


# --------------------------------------------------------------------------- checkpoint files


def hub_checkpoint_paths(name: str) -> tuple[Path, Path]:
    """Where fair-esm (torch.hub) keeps ``name``'s model and contact-regression files."""
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return ckpt_dir / f"{name}.pt", ckpt_dir / f"{name}-contact-regression.pt"


def regression_path(model_path: Path) -> Path:
    """fair-esm's rule: ``x.pt`` -> ``x-contact-regression.pt`` in the same directory."""
    return Path(str(model_path.with_suffix("")) + "-contact-regression.pt")


def load_checkpoint_file(path: Path) -> dict:
    """``torch.load(weights_only=True)`` with ``SAFE_GLOBALS`` allowed; ModelError naming ``path``."""
    import pickle

    if not path.is_file():
        raise ModelError(f"checkpoint file {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"{path} is not a fair-esm checkpoint plmscope can read safely: it holds Python objects "
            f"outside the allow-list ({first}). Re-save it with tensors and an argparse.Namespace cfg only."
        ) from None
    except Exception as e:  # torch reports corrupt zips/pickles as RuntimeError, EOFError, ValueError...
        raise ModelError(
            f"{path} is corrupt or not a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ModelError(f"{path} is not a fair-esm checkpoint: expected a dict with a 'model' state dict")
    return data


def _download(name: str, url: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Same URL and cache file as fair-esm's torch.hub.load_state_dict_from_url; the file is
        # written to a temporary name and moved into place, so a failed download leaves nothing.
        torch.hub.download_url_to_file(url, str(dst), progress=True)
    except Exception as e:  # URLError, HTTPError, socket errors, disk full...
        raise ModelError(
            f"cannot download ESM-2 model {name!r} from {url} ({type(e).__name__}: {e}). "
            f"This machine may have no internet access. Either put {dst.name} and "
            f"{name}-contact-regression.pt into torch hub's cache {dst.parent}, or pass the path of a "
            f"local fair-esm checkpoint instead of the name (e.g. --model /path/{name}.pt, with "
            f"{name}-contact-regression.pt next to it)."
        ) from None


def load_esm2_modules(spec: str) -> tuple[torch.nn.Module, "object", str]:
    """(fair-esm ESM2 model, alphabet, canonical name) for a name or a checkpoint path."""
    from esm.pretrained import load_model_and_alphabet_core

    path = Path(spec).expanduser()
    if spec in ESM2_NAMES:
        model_path, reg_path = hub_checkpoint_paths(spec)
        if not model_path.is_file():
            _download(spec, f"{URL_BASE}/models/{spec}.pt", model_path)
        if not reg_path.is_file():
            _download(spec, f"{URL_BASE}/regression/{spec}-contact-regression.pt", reg_path)
        name = spec
    elif spec.endswith(".pt") or path.exists() or "/" in spec:
        model_path, reg_path = path, regression_path(path)
        if not model_path.is_file():
            what = "is a directory, not a checkpoint file" if model_path.is_dir() else "does not exist"
            raise ModelError(f"ESM-2 checkpoint {model_path} {what}")
        if not reg_path.is_file():
            raise ModelError(
                f"ESM-2 checkpoint {model_path} needs its contact-regression file {reg_path} next to it "
                f"(fair-esm's official format); it is missing"
            )
        name = str(model_path)
    else:
        raise ModelError(
            f"unknown ESM-2 model {spec!r}: use one of {', '.join(ESM2_NAMES)}, or a path to a fair-esm "
            f"checkpoint file (.pt) with its -contact-regression.pt next to it"
        )

    model_data = load_checkpoint_file(model_path)
    regression_data = load_checkpoint_file(reg_path)
    cfg = model_data.get("cfg")
    if not (isinstance(cfg, dict) and isinstance(cfg.get("model"), argparse.Namespace)):
        raise ModelError(
            f"{model_path} is not an ESM-2 checkpoint in fair-esm's format (no cfg['model'] Namespace); "
            f"ESM-1/ESM-1b/MSA checkpoints are not supported"
        )
    # fair-esm picks the ESM-2 builder by name prefix; a renamed local file is still ESM-2.
    core_name = model_path.stem if model_path.stem.startswith("esm2") else "esm2"
    try:
        model, alphabet = load_model_and_alphabet_core(core_name, model_data, regression_data)
    except (RuntimeError, AttributeError, KeyError) as e:
        raise ModelError(f"{model_path} does not match the ESM-2 architecture in its cfg: {str(e)[:300]}") from None
    return model, alphabet, name


def save_random_esm2(
    path: str | Path,
    arch: str | None = "esm2_t6_8M_UR50D",
    *,
    num_layers: int | None = None,
    embed_dim: int | None = None,
    attention_heads: int | None = None,
    seed: int = 0,
    token_dropout: bool = True,
) -> Path:
    """Save an ESM-2 with random weights in fair-esm's official format (+ ``-contact-regression.pt``).

    Same layout as the released files: ``{"cfg": {"model": Namespace(...)}, "model": state}`` with
    keys under ``encoder.sentence_encoder.`` / ``encoder.lm_head.``, and the contact regression in
    its own file.  Explicit ``num_layers/embed_dim/attention_heads`` override ``arch``.
    """
    from esm.data import Alphabet
    from esm.model.esm2 import ESM2 as FairESM2

    layers, dim, heads = ARCHS[arch] if arch else (None, None, None)
    layers, dim, heads = num_layers or layers, embed_dim or dim, attention_heads or heads
    if not (layers and dim and heads):
        raise ModelError("save_random_esm2 needs arch= or num_layers, embed_dim and attention_heads")
    torch.manual_seed(seed)
    model = FairESM2(layers, dim, heads, Alphabet.from_architecture("ESM-1b"), token_dropout)
    # Default inits leave LayerNorm/bias at 1/0; perturb them so tests see every parameter act.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "layer_norm" in n:
                p.add_(0.05 * torch.randn_like(p))

    state = model.state_dict()
    model_state, regression_state = {}, {}
    for key, value in state.items():
        if key.startswith("contact_head."):
            regression_state[key] = value.clone()
        elif key.startswith("lm_head."):
            model_state["encoder." + key] = value.clone()
        else:
            model_state["encoder.sentence_encoder." + key] = value.clone()
    cfg = argparse.Namespace(
        _name="esm2",
        encoder_layers=layers,
        encoder_embed_dim=dim,
        encoder_ffn_embed_dim=4 * dim,
        encoder_attention_heads=heads,
        token_dropout=token_dropout,
        max_positions=1024,
        dropout=0.0,
        attention_dropout=0.0,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": {"model": cfg}, "model": model_state}, path)
    torch.save({"model": regression_state}, regression_path(path))
    return path


# --------------------------------------------------------------------------- the backend


def rotary_tables(attn, T: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """fair-esm's rotary cos/sin for ``T`` tokens as (T, 1, head_dim) rows of (B, T, H, hd) tensors:
    ``(cos * scaling, signed_sin * scaling, cos, signed_sin)``, the first pair for q, the second for k.

    Computed as fair-esm's ``RotaryEmbedding._update_cos_sin_tables`` does, but returned, not kept:
    that method caches the tables of the last length on the module, so two threads running
    sequences of different lengths could read each other's half-written tables.  One forward
    computes them once for all its layers (every layer's ``inv_freq`` is the same).
    ``rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2]`` (one copy instead of chunk + neg +
    cat), and q's ``scaling`` (head_dim ** -0.5) is folded into q's pair: the same products up to
    float32 rounding (exact where it is a power of two: 8M, 650M, 3B), one kernel fewer per layer."""
    inv_freq = attn.rot_emb.inv_freq
    t = torch.arange(T, device=device).type_as(inv_freq)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1).to(device)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    half = cos.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos * attn.scaling, signed * attn.scaling, cos, signed


def fuse_projections(model, dtype: torch.dtype | None = None) -> None:
    """Store each layer's q, k and v projections as row blocks of one (3E, E) weight and (3E,)
    bias, so that a layer runs one matrix product (and one autocast cast of its input) instead of
    three.  The modules' own weights become views of those blocks: fair-esm's forward, hooks,
    ``state_dict`` and in-place edits see and change the same numbers.

    ``dtype`` also stores every Linear of the layers and the LM head's ``dense`` in that dtype (an
    ESM-2 loaded for bf16/fp16 autocast): autocast would otherwise cast each weight again at every
    forward, a quarter of the kernels a one-sequence forward launches on a GPU.  Only for a model
    this object owns (``ESM2.load``): run outside autocast, such a model would mix dtypes."""
    for layer in model.layers:
        attn = layer.self_attn
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        w = torch.cat([p.weight.detach() for p in projs])
        b = torch.cat([p.bias.detach() for p in projs])
        if dtype is not None:
            w, b = w.to(dtype), b.to(dtype)
            for lin in (attn.out_proj, layer.fc1, layer.fc2):
                lin.to(dtype)
        E = attn.embed_dim
        for i, p in enumerate(projs):
            p.weight = torch.nn.Parameter(w[i * E:(i + 1) * E], requires_grad=p.weight.requires_grad)
            p.bias = torch.nn.Parameter(b[i * E:(i + 1) * E], requires_grad=p.bias.requires_grad)
        attn._plmscope_qkv = (w, b)
    if dtype is not None:
        model.lm_head.dense.to(dtype)


def _qkv(attn, h: torch.Tensor) -> torch.Tensor:
    """(…, 3E): q, k and v of ``h`` from the fused weight, or from the three modules when their
    weights are no longer its views (the model was moved or a weight replaced since fusing)."""
    fused = getattr(attn, "_plmscope_qkv", None)
    if fused is not None:
        w, b = fused
        E = attn.embed_dim
        if (attn.q_proj.weight.data_ptr() == w.data_ptr()
                and attn.v_proj.weight.data_ptr() == w[2 * E:].data_ptr()
                and attn.k_proj.bias.data_ptr() == b[E:].data_ptr()):
            return F.linear(h, w, b)
    return torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1)


def _transformer_layer(layer, x: torch.Tensor, keep: torch.Tensor | None, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """fair-esm's ``TransformerLayer.forward`` (ESM-2: no bias_kv, rotary) on (B, T, E), with fused attention.

    fair-esm's rotary path never takes torch's fused kernel: it materialises and averages the
    (batch, heads, T, T) weights, which dominates CPU time on padded batches and GPU memory.
    ``scaled_dot_product_attention`` computes the same softmax(q k^T) v from the same modules'
    weights, with the rotary embedding applied to q and k before it (``rotary_tables``, applied
    in float32 on contiguous (B, T, H, hd) rows: fair-esm's own (B*H, T, hd) view of a (T, B, E)
    tensor made the rotary products strided and cost as much as the attention itself on CPU).
    ``test_esm2`` holds it to fair-esm's own forward within 1e-5 and checks the flash kernel runs.
    """
    attn = layer.self_attn
    B, T, E = x.shape
    H, hd = attn.num_heads, attn.head_dim
    residual = x
    q, k, v = _qkv(attn, layer.self_attn_layer_norm(x)).view(B, T, 3, H, hd).unbind(2)
    cos_q, sin_q, cos_k, sin_k = tables
    half = hd // 2
    q, k = q.float(), k.float()
    q = torch.addcmul(q * cos_q, q.roll(half, dims=-1), sin_q)
    k = torch.addcmul(k * cos_k, k.roll(half, dims=-1), sin_k)
    # On CUDA the kernel runs in the autocast dtype; torch's CPU flash kernel is faster in float32
    # than in bf16 at ESM-2's head sizes (8M, head dim 16: 71 vs 115 ms per layer of a 27 x 300 batch).
    dt = torch.float32 if x.device.type == "cpu" else v.dtype
    o = F.scaled_dot_product_attention(
        q.to(dt).transpose(1, 2), k.to(dt).transpose(1, 2), v.to(dt).transpose(1, 2), attn_mask=keep, scale=1.0
    )
    x = residual + attn.out_proj(o.transpose(1, 2).reshape(B, T, E))
    residual = x
    # torch's fused erf GELU: fair-esm's esm.modules.gelu written out (x * 0.5 * (1 + erf(x / sqrt 2)))
    # costs four passes over the (B, T, 4E) activations.
    h = layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
    return residual + h


def mask_positions(seqs: Sequence[str], seed: int = 0, mask_prob: float = 0.15) -> list[torch.Tensor]:
    """0-based residue positions ``lm_loss`` masks: ``round(mask_prob * n)`` (at least 1) per sequence.

    Drawn per sequence in input order from one ``torch.Generator(seed)``, so they do not depend on
    batching or device.
    """
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for s in seqs:
        n_mask = max(1, round(mask_prob * len(s))) if s else 0
        masks.append(torch.randperm(len(s), generator=gen)[:n_mask].sort().values)
    return masks


class ESM2(ProteinLM):
    family = "esm2"
    max_residues = MAX_RESIDUES

    def __init__(self, model: torch.nn.Module, alphabet, name: str, device: torch.device, dtype=None,
                 owns_model: bool = False):
        """``owns_model``: no one else runs ``model`` (``load``), so its layer weights may be
        stored in the autocast dtype (``fuse_projections``)."""
        self.model = model.eval().to(device)
        self.alphabet = alphabet
        self.batch_converter = alphabet.get_batch_converter()
        self.name = name
        self.device = device
        self.num_layers = model.num_layers
        # base.resolve_dtype: CPU stays float32 unless bf16 is asked for and the CPU has it natively.
        self.autocast_dtype = resolve_dtype(dtype, device, name)
        fuse_projections(self.model, self.autocast_dtype if owns_model else None)

    @classmethod
    def load(cls, spec: str, device: str | torch.device | None = "auto", dtype=None) -> "ESM2":
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        model, alphabet, name = load_esm2_modules(str(spec))
        return cls(model, alphabet, name, dev, dtype, owns_model=True)

    def d_model(self, layer: int) -> int:
        self.check_layer(layer)
        return self.model.embed_dim

    # fair-esm's ESM2.forward, split so that it can stop early and be spliced into.
    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _tokens(self, seqs: Sequence[str]) -> torch.Tensor:
        bad = [(i, m.group()) for i, s in enumerate(seqs) if (m := re.search(r"[^A-Z]", s))]
        if bad:
            i, ch = bad[0]
            raise ModelError(f"{self.name}: sequence {i + 1} contains {ch!r}, which ESM-2 cannot encode")
        _, _, tokens = self.batch_converter([("", s) for s in seqs])
        return tokens.to(self.device)

    def _embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        padding_mask = tokens.eq(m.padding_idx)
        x = m.embed_scale * m.embed_tokens(tokens)
        if m.token_dropout:
            x.masked_fill_((tokens == m.mask_idx).unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8
            src_lengths = (~padding_mask).sum(-1)
            mask_ratio_observed = (tokens == m.mask_idx).sum(-1).to(x.dtype) / src_lengths
            x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[:, None, None]
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        return x, padding_mask

    def _layers(self, x: torch.Tensor, padding_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run layers ``start+1..stop`` on (B, T, E); at ``stop == num_layers`` apply the final norm."""
        m = self.model
        # SDPA wants True = may attend, broadcast over heads and queries.
        keep = ~padding_mask[:, None, None, :] if padding_mask.any() else None
        tables = rotary_tables(m.layers[0].self_attn, x.shape[1], x.device) if start < stop else ()
        for layer in m.layers[start:stop]:
            x = _transformer_layer(layer, x, keep, tables)
        if stop == self.num_layers and start < stop:
            x = m.emb_layer_norm_after(x)
        return x

    def _forward_layers(self, seqs: Sequence[str], layers: Sequence[int]) -> list[list[torch.Tensor]]:
        if not seqs:
            return [[] for _ in layers]
        if self.device.type == "cpu" and len(seqs) > 1 and len(seqs) * (max(map(len, seqs)) + 2) > CPU_BATCH_TOKENS:
            out: list[list] = [[None] * len(seqs) for _ in layers]
            for piece in token_batches([(str(i), s) for i, s in enumerate(seqs)], CPU_BATCH_TOKENS):
                reps = self._forward_piece([s for _, s in piece], layers)
                for j in range(len(layers)):
                    for (i, _), rep in zip(piece, reps[j]):
                        out[j][int(i)] = rep
            return out
        return self._forward_piece(seqs, layers)

    def _forward_piece(self, seqs: Sequence[str], layers: Sequence[int]) -> list[list[torch.Tensor]]:
        tokens = self._tokens(seqs)
        out = []
        with self._autocast():
            x, padding_mask = self._embed(tokens)
            done = 0
            for layer in layers:  # ascending: each stretch of layers runs once
                x = self._layers(x, padding_mask, done, layer)
                done = layer
                # Row 0 is BOS: residue i sits at token i.
                xf = x.float()
                out.append([xf[b, 1 : len(s) + 1].cpu().clone() for b, s in enumerate(seqs)])
        return out

    @torch.no_grad()
    def lm_loss(
        self,
        seqs: Sequence[str],
        layer: int,
        splice: Splice | None = None,
        *,
        seed: int = 0,
        mask_prob: float = 0.15,
        token_budget: int = 4096,
    ) -> LossResult:
        """Masked-LM loss over the residues ``mask_positions`` picks, each replaced by <mask>.

        Every chosen position is masked (no 80/10/10 replacement: that is a
        training-time augmentation).  ``splice`` gets the layer-``layer`` residue rows of a whole
        batch at once (float32, on the model's device) and must return the same shape.
        """
        self.check_layer(layer)
        seqs = [self.truncate(s, f"sequence {i + 1}") for i, s in enumerate(seqs)]
        masks = mask_positions(seqs, seed, mask_prob)
        total, count = 0.0, 0
        per_seq, per_count = [0.0] * len(seqs), [0] * len(seqs)
        items = [(str(i), s) for i, s in enumerate(seqs) if s]
        for batch in token_batches(items, token_budget):
            idx = [int(i) for i, _ in batch]
            tokens = self._tokens([seqs[i] for i in idx])
            targets = torch.full_like(tokens, -100)
            for b, i in enumerate(idx):
                pos = masks[i].to(self.device) + 1  # +1: BOS
                targets[b, pos] = tokens[b, pos]
                tokens[b, pos] = self.alphabet.mask_idx
            with self._autocast():
                x, padding_mask = self._embed(tokens)
                x = self._layers(x, padding_mask, 0, layer)
                if splice is not None:
                    x = splice_residue_rows(x, [len(seqs[i]) for i in idx], splice)
                x = self._layers(x, padding_mask, layer, self.num_layers)
                logits = self.model.lm_head(x)
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
            total += ce.sum().item()
            count += int((targets != -100).sum())
            for b, i in enumerate(idx):
                per_seq[i], per_count[i] = ce[b].sum().item(), len(masks[i])
        return LossResult(total, count, per_seq, per_count)

    @torch.no_grad()
    def layer_states(self, seqs: Sequence[str], layer: int, *,
                     masked: Sequence[Sequence[int]] | None = None) -> list[LayerState]:
        """See ``ProteinLM.layer_states``: the same layer path as ``lm_loss``, one batch, no masking
        unless ``masked`` names residues; each state keeps BOS, the residues and EOS."""
        self.check_layer(layer)
        self.check_length(seqs)
        if not seqs:
            return []
        tokens = self._tokens(seqs)
        lengths = [len(s) for s in seqs]
        for b, pos in enumerate(masked or []):
            if len(pos):
                idx = torch.as_tensor(list(pos), dtype=torch.long)
                if int(idx.min()) < 0 or int(idx.max()) >= lengths[b]:
                    raise ModelError(f"{self.name}: masked residues of sequence {b + 1} must lie in 0..{lengths[b] - 1}")
                tokens[b, idx.to(self.device) + 1] = self.alphabet.mask_idx
        with self._autocast():
            x, padding_mask = self._embed(tokens)
            x = self._layers(x, padding_mask, 0, layer)
        return [LayerState(layer, n, x[b, : n + 2]) for b, n in enumerate(lengths)]

    def _continue(self, x: torch.Tensor, lengths: list[int], layer: int) -> list[torch.Tensor]:
        # The padding mask the tokens had: everything after a sequence's EOS.
        ends = torch.tensor([n + 2 for n in lengths], device=x.device)
        padding_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= ends[:, None]
        x = self._layers(x, padding_mask, layer, self.num_layers)
        lp = torch.log_softmax(self.model.lm_head(x).float(), dim=-1)
        return [lp[b, 1 : n + 1].cpu() for b, n in enumerate(lengths)]

    def scored_residues(self, seqs: Sequence[str], *, seed: int = 0, mask_prob: float = 0.15) -> list[str]:
        """The masked residues of ``lm_loss`` with the same ``seed`` and ``mask_prob``."""
        seqs = [self.truncate(s, f"sequence {i + 1}") for i, s in enumerate(seqs)]
        return ["".join(s[p] for p in m.tolist()) for s, m in zip(seqs, mask_positions(seqs, seed, mask_prob))]

    def target_class(self, residue: str) -> int:
        if not re.fullmatch(r"[A-Z]", residue):
            raise ModelError(f"{self.name}: {residue!r} is not a residue ESM-2 can encode")
        return int(self.alphabet.get_idx(residue))  # a letter outside the alphabet (J) is <unk>, as in _tokens
