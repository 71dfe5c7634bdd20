"""Optional Pfam annotation (``plmscope build --pfam HMMFILE``) with pyhmmer.

``hmmsearch`` of every HMM in the file against the proteins with the families' own gathering
cutoffs (``bit_cutoffs="gathering"``, as Pfam itself assigns domains); each included domain becomes
``Annotation(kind='pfam', type='Pfam domain', label=<accession or name>, start/end = envelope,
1-based inclusive, score = domain bit score)``.  Overlapping hits of related families are kept
(no clan resolution), as in the demo corpus.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..sequences import Annotation, Protein


def _text(x) -> str:
    return x.decode() if isinstance(x, (bytes, bytearray)) else str(x or "")


def read_hmms(path: str | Path) -> list:
    import pyhmmer

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such HMM file")
    try:
        with pyhmmer.plan7.HMMFile(str(path)) as fh:
            hmms = list(fh)
    except (ValueError, EOFError, OSError) as exc:
        raise InputError(f"{path}: not a readable HMMER3 file ({exc})") from None
    if not hmms:
        raise InputError(f"{path}: contains no HMM")
    missing = [_text(h.accession) or _text(h.name) for h in hmms if h.cutoffs.gathering is None]
    if missing:
        raise InputError(f"{path}: HMM(s) without gathering cutoffs (GA line): {', '.join(missing[:5])}")
    return hmms


def annotate(proteins: list[Protein], hmm_path: str | Path, cpus: int = 0) -> tuple[dict[str, list[Annotation]], dict[str, tuple[str, str]]]:
    """Pfam annotations per accession, and family id -> (name, description) of every HMM."""
    import pyhmmer

    hmms = read_hmms(hmm_path)
    alphabet = pyhmmer.easel.Alphabet.amino()
    seqs = [pyhmmer.easel.TextSequence(name=p.accession.encode(), sequence=p.sequence).digitize(alphabet)
            for p in proteins]
    families = {}
    for h in hmms:
        fam = (_text(h.accession) or _text(h.name)).split(".")[0]
        families[fam] = (_text(h.name), _text(h.description))
    out: dict[str, list[Annotation]] = {}
    if not seqs:
        return out, families
    block = pyhmmer.easel.DigitalSequenceBlock(alphabet, seqs)
    for hits in pyhmmer.hmmsearch(hmms, block, bit_cutoffs="gathering", cpus=cpus):
        q = hits.query
        fam = (_text(getattr(q, "accession", None)) or _text(getattr(q, "name", None))).split(".")[0]
        name = _text(getattr(q, "name", ""))
        for hit in hits.included:
            acc = _text(hit.name)
            for dom in hit.domains.included:
                out.setdefault(acc, []).append(Annotation(
                    kind="pfam", type="Pfam domain", label=fam, name=name,
                    start=int(dom.env_from), end=int(dom.env_to), score=round(float(dom.score), 1)))
    for anns in out.values():
        anns.sort(key=lambda a: (a.start, a.end, a.label))
    return out, families
