"""Validated inputs of live inference: a sequence (bare or FASTA) and a list of latents.

Each type is checked by the parser the server runs anyway (clear messages: which residue, which
position) and by a regular expression that the OpenAPI schema publishes as its ``pattern``: a
string the pattern accepts is one the server runs, and one it rejects gets 422, so the schema and
the server agree.  The residue limit is in the pattern, taken from the settings.
"""

from __future__ import annotations

import re
from typing import Annotated, Optional

from pydantic import AfterValidator, Field

from ..errors import InputError
from ..settings import Settings
from .inference import parse_sequence_input

MAX_LATENTS = 32  # heatmaps one request may ask for

_WS = r"[ \t\r\n]"
_RESIDUE = r"[A-IK-Za-ik-z]"  # the 20 standard amino acids and X B Z U O, either case
# str.splitlines (the FASTA parser) also breaks lines at these; a header must not contain them
_HEADER = r">[^\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]*\r?\n"


def sequence_pattern(max_residues: int, *, blank_ok: bool = False) -> str:
    """1..max_residues residues with whitespace anywhere and an optional final '*'; or one FASTA
    header line, those residues, and further records (ignored by the server)."""
    residues = rf"(?:{_WS}*{_RESIDUE}){{1,{max_residues}}}{_WS}*(?:\*{_WS}*)?"
    body = rf"{_WS}*(?:{_HEADER}{residues}(?:{_WS}*\n>[\s\S]*)?|{residues})"
    return rf"^(?:{_WS}*|{body})$" if blank_ok else rf"^{body}$"


def sequence_max_chars(settings: Settings) -> int:
    # A sequence the schema allows must fit in a request body under max_request_bytes: 12 bytes is
    # the longest JSON spelling of one character (an escaped surrogate pair), so 16 bytes a
    # character leaves a quarter of the body for the other fields.
    return settings.max_request_bytes // 16


def _sequence_checker(max_residues: int, pattern: str, blank_ok: bool):
    regex = re.compile(pattern)

    def check(text: str) -> str:
        if blank_ok and not text.strip():
            return text
        try:
            _, seq, _ = parse_sequence_input(text)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        if len(seq) > max_residues:
            raise ValueError(f"the sequence has {len(seq)} residues; this server accepts at most {max_residues} "
                             f"(cut it into pieces, or run `plmscope build` offline)")
        if regex.fullmatch(text) is None:
            raise ValueError("give residue letters and whitespace only, optionally after one FASTA header line "
                             "('>name', then the residues on the next lines)")
        return text

    return check


SEQUENCE_HELP = "one protein sequence, or FASTA text (the first record is run, the others are ignored)"


def sequence_type(settings: Settings, *, blank_ok: bool = False):
    """``str`` constrained as described above; ``blank_ok``: whitespace alone means "no sequence" (the form)."""
    pattern = sequence_pattern(settings.max_residues, blank_ok=blank_ok)
    return Annotated[
        str,
        Field(max_length=sequence_max_chars(settings), json_schema_extra={"pattern": pattern}),
        AfterValidator(_sequence_checker(settings.max_residues, pattern, blank_ok)),
    ]


def json_integer(value):
    # JSON Schema's "integer": a number without a fraction (5 or 5.0), but not `true` and not "5",
    # which pydantic's lax mode would take for 1 and 5
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


LATENTS_PATTERN = rf"^[ ,]*(?:[0-9]+(?:[ ,]+[0-9]+){{0,{MAX_LATENTS - 1}}})?[ ,]*$"
_LATENTS_RE = re.compile(LATENTS_PATTERN)


def _check_latent_list(text: str) -> str:
    bad = re.search(r"[^0-9 ,]+", text)
    if bad:
        raise ValueError(f"latents must be comma-separated numbers, e.g. 12,345; got {bad.group()!r}")
    if _LATENTS_RE.fullmatch(text) is None:
        raise ValueError(f"at most {MAX_LATENTS} latents can be shown at once")
    return text


LatentListText = Annotated[
    str,
    Field(max_length=400, json_schema_extra={"pattern": LATENTS_PATTERN}),
    AfterValidator(_check_latent_list),
]


def parse_latent_list(text: Optional[str]) -> list[int]:
    """A validated ``LatentListText`` -> latents in order, without repeats."""
    return list(dict.fromkeys(int(x) for x in re.findall(r"[0-9]+", text or "")))
