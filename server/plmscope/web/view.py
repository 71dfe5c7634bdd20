"""Write a standalone HTML 3D view of one latent on one protein's structure (py3Dmol).

Command line::

    plmscope view --atlas atlas.duckdb --sae esm2_t6_8M_UR50D.L4.topk4096 --latent 123 \\
        --accession P69905 --out view.html

Python (e.g. in a notebook, where ``_repr_html_`` displays it)::

    from plmscope.web.view import latent_view
    v = latent_view("atlas.duckdb", "esm2_t6_8M_UR50D.L4.topk4096", 123, "P69905")
    v                      # shows in Jupyter
    v.write_html("view.html")

The page loads the vendored 3Dmol.js (``frontend/static/vendor/3Dmol-2.5.5.min.js``), never a CDN;
``js=`` points it elsewhere (a served ``/static/vendor/...`` URL, for instance).  Residues are
coloured by the latent's activation through the B-factor column: each atom's B-factor is replaced by
its residue's activation; inactive residues are light grey, residues without a sequence match mid grey.
"""

from __future__ import annotations

import argparse
import html
import logging
from pathlib import Path

from ..errors import AtlasError, InputError
from ..vocab import COLOUR_STOPS, UNMAPPED_COLOUR, ZERO_COLOUR, css_gradient

log = logging.getLogger(__name__)

VENDORED_JS = Path(__file__).resolve().parents[3] / "frontend" / "static" / "vendor" / "3Dmol-2.5.5.min.js"
UNMAPPED, ZERO_B = -1.0, -2.0  # B-factor codes of residues without a value / with activation 0


def _activations(reader, sae_id: str, latent: int, protein: dict, device: str) -> tuple[list[float], str]:
    vec = reader.latent_vector(sae_id, protein["accession"], latent)
    if vec is not None:
        return vec, "atlas"
    # Not stored: run the atlas's own SAE and pLM on this protein.
    from .inference import load_models

    models = load_models(reader, device)
    m = models[sae_id]
    seq = protein["sequence"][: m.max_residues] if m.max_residues else protein["sequence"]
    rep = m.plm.representations([seq], m.layer)[0]
    z = m.sae.encode(rep.to(m.sae.W_dec.device)).float().cpu()
    return [round(float(x), 4) for x in z[:, latent]], "live"


def latent_view(atlas: str | Path, sae_id: str, latent: int, accession: str, *, js: str | None = None,
                width: int = 720, height: int = 540, device: str = "cpu"):
    """A py3Dmol view of ``latent``'s activation on ``accession``'s best structure in the atlas."""
    import gemmi
    import py3Dmol

    from ..store.reader import AtlasReader

    reader = AtlasReader(atlas)
    try:
        sae = reader.sae(sae_id)
        if sae is None:
            raise AtlasError(f"{atlas} holds no SAE {sae_id!r}; it has {', '.join(s['sae_id'] for s in reader.saes())}")
        if not 0 <= latent < sae["d_sae"]:
            raise InputError(f"SAE {sae_id} has latents 0..{sae['d_sae'] - 1}; there is no latent {latent}")
        protein = reader.protein(accession)
        if protein is None:
            raise InputError(f"no protein {accession!r} in {atlas}")
        structures = reader.structures(accession)
        if not structures:
            raise InputError(f"{accession} has no structure in {atlas}; `plmscope build --structures` adds them")
        s = structures[0]
        values, source = _activations(reader, sae_id, latent, protein, device)
        stats = reader.latent(sae_id, latent)["stats"]
    finally:
        reader.close()

    by_auth = {(a, i): p for p, a, i in zip(s["residues"]["seq_pos"], s["residues"]["auth_seq_id"], s["residues"]["ins_code"])}
    st = gemmi.read_pdb_string(s["content"])
    for model in st:
        for chain in model:
            for res in chain:
                pos = by_auth.get((res.seqid.num, res.seqid.icode.strip()))
                b = values[pos - 1] if pos is not None and pos <= len(values) else UNMAPPED
                b = ZERO_B if b == 0 else b
                for atom in res:
                    atom.b_iso = b
    vmax = float(stats["max_act"]) or 1.0
    view = py3Dmol.view(width=width, height=height, js=js or VENDORED_JS.as_uri())
    view.addModel(st.make_pdb_string(), "pdb")
    view.setStyle({"cartoon": {"colorscheme": {"prop": "b", "gradient": "linear", "min": 0, "max": vmax,
                                               "colors": list(COLOUR_STOPS)}}})
    # inactive residues light grey and unmapped ones mid grey, as on the web pages
    view.setStyle({"b": ZERO_B}, {"cartoon": {"color": ZERO_COLOUR}})
    view.setStyle({"b": UNMAPPED}, {"cartoon": {"color": UNMAPPED_COLOUR}})
    view.zoomTo()
    view.plmscope_title = (  # read by write_view_html
        f"{sae_id} latent {latent} on {accession} ({protein['label']}) · {s['file_name']} chain {s['chain']} · "
        f"activation >0 (yellow) to {vmax:.3g} (purple, corpus maximum), 0 = light grey; values from the {source}"
    )
    return view


def write_view_html(view, out: str | Path) -> Path:
    """The view as a standalone HTML page with a title line and the colour legend."""
    out = Path(out)
    title = html.escape(getattr(view, "plmscope_title", "plmscope view"))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>plmscope view</title></head>"
        "<body style='font-family:system-ui,sans-serif;margin:1rem'>"
        f"<p>{title}</p><div style='height:12px;width:240px;background:{css_gradient()}'></div>"
        f"{view._make_html()}</body></html>"
    )
    out.write_text(page)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atlas", required=True, help="atlas .duckdb file")
    p.add_argument("--sae", required=True, help="SAE id (see the atlas overview page)")
    p.add_argument("--latent", type=int, required=True, help="latent index")
    p.add_argument("--accession", required=True, help="protein accession (must have a structure in the atlas)")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--js", default=None, help="URL of 3Dmol.js (default: the vendored copy, as a file:// URL)")
    p.add_argument("--device", default="cpu", help="device for live inference when the atlas stores no vector")


def run(args: argparse.Namespace) -> int:
    view = latent_view(args.atlas, args.sae, args.latent, args.accession, js=args.js, device=args.device)
    path = write_view_html(view, args.out)
    print(f"wrote {path}")
    return 0
