"""Regenerate data/demo/sae_sets.json: the demo SAE corpus (3,000 proteins) clustered with MMseqs2
(30 % identity, 80 % coverage of both; plmscope.homology) and whole clusters dealt to the SAE's
train / selection / report sets (80 / 10 / 10 % of proteins, seed 0).

    python scripts/demo_sets.py            # rewrite the file
    python scripts/demo_sets.py --check    # exit 1 if a fresh clustering differs from the file

The committed file is what `plmscope demo` reads, so the demo trains on the same proteins with any
MMseqs2 installation; tests/test_demo.py runs the --check comparison.
"""

from __future__ import annotations

import argparse
import sys

from plmscope import demo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing it")
    args = ap.parse_args()
    text = demo.format_sae_sets(demo.compute_sae_sets())
    if args.check:
        same = demo.SETS_FILE.is_file() and demo.SETS_FILE.read_text() == text
        print(f"{demo.SETS_FILE}: {'matches' if same else 'DIFFERS FROM'} a fresh clustering")
        return 0 if same else 1
    demo.SETS_FILE.write_text(text)
    print(f"wrote {demo.SETS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
