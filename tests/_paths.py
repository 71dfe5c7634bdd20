"""Where the tests find the project's committed data: ``data/demo`` of this checkout, never
``../shared`` (a user's fresh clone has nothing beside it)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
