"""Helpers for model tests that edit registry artifacts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models import registry


def rewrite_card(vdir: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Edit a version's card and re-sign its checksums, as a model trained elsewhere would be."""
    card = json.loads((vdir / registry.CARD_FILE).read_text())
    change(card)
    (vdir / registry.CARD_FILE).write_text(json.dumps(card))
    sums = "".join(f"{hashlib.sha256((vdir / n).read_bytes()).hexdigest()}  {n}\n"
                   for n in (registry.MODEL_FILE, registry.CARD_FILE))
    (vdir / registry.SUMS_FILE).write_text(sums)
