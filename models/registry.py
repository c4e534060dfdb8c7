"""The versioned model registry: the contract between training and the classifier workers.

Layout (default ``settings.paths.registry``, i.e. ``models/registry/``)::

    registry/
      CHAMPION                      the version in service (one line); replaced atomically
      PROMOTIONS.jsonl              one line per promotion: when, from, to
      <version>/model.skops         the fitted Pipeline (skops: no pickle, explicit trusted types)
      <version>/card.json           the model card: metrics, data fingerprint, settings, threshold
      <version>/SHA256SUMS          checksums of both, verified on every load

Versions are ``<UTC time>-<model hash>`` (``20261127T081500Z-1a2b3c4d``), so they sort by age.
Workers poll :func:`champion_version` (one small file read) and call :func:`load_champion` when
it changes: hot reload without restarts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.skops"
CARD_FILE = "card.json"
SUMS_FILE = "SHA256SUMS"
CHAMPION_FILE = "CHAMPION"
PROMOTIONS_FILE = "PROMOTIONS.jsonl"
# The only types outside skops' default (scikit-learn, numpy, scipy) trust list that a model may
# hold. Anything else in an artifact is refused, whoever wrote it.
TRUSTED_TYPES = ("models.features.MailText", "models.features.split_tokens", "models.features.ByteGrams",
                 "models.pipeline.SequentialUnion", "models.authfeatures.MailWithAuth")


class ModelNotFound(Exception):
    """The registry has no champion (or not the version asked for)."""


class ModelIntegrityError(Exception):
    """An artifact whose checksums do not match, or that holds types outside the trusted list."""


@dataclass(frozen=True)
class LoadedModel:
    version: str
    threshold: float
    card: dict[str, Any]
    pipeline: Any = field(repr=False, compare=False)

    def score(self, raws: Sequence[bytes]) -> np.ndarray:
        """Spam probability in [0, 1] for each message (raw RFC 5322 bytes), in order."""
        if len(raws) == 0:
            return np.zeros(0, dtype=np.float64)
        proba = self.pipeline.predict_proba(list(raws))
        spam_col = list(self.pipeline.classes_).index(1)
        return np.asarray(proba[:, spam_col], dtype=np.float64)

    def verdicts(self, raws: Sequence[bytes]) -> list[tuple[str, float]]:
        """``("spam" | "ham", score)`` per message: spam when the score reaches the card's threshold."""
        return [("spam" if s >= self.threshold else "ham", float(s)) for s in self.score(raws)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def versions(registry: Path) -> list[str]:
    """Every registered version, oldest first."""
    registry = Path(registry)
    if not registry.is_dir():
        return []
    return sorted(p.name for p in registry.iterdir() if p.is_dir() and (p / SUMS_FILE).exists())


def champion_version(registry: Path) -> str | None:
    """The version in service, or None. Cheap: reads one small file (poll it for hot reload)."""
    try:
        text = (Path(registry) / CHAMPION_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def register(pipeline: Any, card: dict[str, Any], registry: Path) -> str:
    """Store a fitted pipeline and its card as a new version; return the version. Never changes the champion."""
    import skops.io as sio

    registry = Path(registry)
    registry.mkdir(parents=True, exist_ok=True)
    blob = sio.dumps(pipeline)
    untrusted = set(sio.get_untrusted_types(data=blob)) - set(TRUSTED_TYPES)
    if untrusted:
        raise ModelIntegrityError(f"pipeline holds types outside the trusted list: {sorted(untrusted)}")
    digest = hashlib.sha256(blob).hexdigest()
    version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + digest[:8]
    card = {**card, "version": version, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model_sha256": digest}
    card_bytes = json.dumps(card, indent=2, sort_keys=True, default=str).encode() + b"\n"
    final = registry / version
    if final.exists():
        return version  # the same model bytes registered within the same second: already there
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=registry))
    tmp.chmod(0o755)  # mkdtemp makes it private; workers under another user must read it
    _fsync_write(tmp / MODEL_FILE, blob)
    _fsync_write(tmp / CARD_FILE, card_bytes)
    sums = f"{digest}  {MODEL_FILE}\n{hashlib.sha256(card_bytes).hexdigest()}  {CARD_FILE}\n"
    _fsync_write(tmp / SUMS_FILE, sums.encode())
    try:
        os.replace(tmp, final)  # a version directory appears whole or not at all
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
        # the same model bytes registered concurrently within the same second: that copy stands
    return version


def _verify(vdir: Path) -> None:
    try:
        lines = (vdir / SUMS_FILE).read_text().splitlines()
    except FileNotFoundError:
        raise ModelIntegrityError(f"{vdir} has no {SUMS_FILE}") from None
    expected = dict(reversed(line.split(None, 1)) for line in lines if line.strip())
    for name in (MODEL_FILE, CARD_FILE):
        if name not in expected:
            raise ModelIntegrityError(f"{vdir / SUMS_FILE} does not list {name}")
        try:
            actual = _sha256(vdir / name)
        except FileNotFoundError:
            raise ModelIntegrityError(f"{vdir / name} is missing") from None
        if actual != expected[name].strip():
            raise ModelIntegrityError(f"{vdir / name}: checksum mismatch")


def load(registry: Path, version: str) -> LoadedModel:
    """One version, checksums verified, loaded with skops and the explicit trusted list."""
    import skops.io as sio

    card = read_card(registry, version)
    vdir = Path(registry) / version
    from models.features import FEATURE_VERSION

    built_for = card.get("features", {}).get("feature_version")
    if built_for != FEATURE_VERSION:
        raise ModelIntegrityError(f"{version} was trained on feature version {built_for}, this code extracts "
                                  f"version {FEATURE_VERSION}: its scores would be meaningless; retrain (make train)")
    try:
        pipeline = sio.load(vdir / MODEL_FILE, trusted=list(TRUSTED_TYPES))
    except sio.exceptions.UntrustedTypesFoundException as e:
        raise ModelIntegrityError(f"{vdir / MODEL_FILE}: {e}") from None
    except Exception as e:  # a corrupt artifact that still matched its checksum: refuse it clearly
        raise ModelIntegrityError(f"{vdir / MODEL_FILE} does not load: {e!r}") from None
    return LoadedModel(version=version, threshold=float(card["threshold"]), card=card, pipeline=pipeline)


def read_card(registry: Path, version: str) -> dict[str, Any]:
    """A version's model card, checksums verified, without loading the model: what a model trained
    on another feature version still tells (its metrics on the fixed evaluation set)."""
    vdir = Path(registry) / version
    if not vdir.is_dir():
        raise ModelNotFound(f"no version {version} in {registry}")
    _verify(vdir)
    card: dict[str, Any] = json.loads((vdir / CARD_FILE).read_text())
    return card


def load_champion(registry: Path) -> LoadedModel:
    version = champion_version(registry)
    if version is None:
        raise ModelNotFound(f"no champion in {registry}: run `make train`")
    return load(registry, version)


def promote(registry: Path, version: str) -> None:
    """Make ``version`` the champion: verified first, then CHAMPION is replaced atomically."""
    registry = Path(registry)
    if not (registry / version).is_dir():
        raise ModelNotFound(f"no version {version} in {registry}")
    _verify(registry / version)
    previous = champion_version(registry)
    fd, tmp = tempfile.mkstemp(prefix=".champion-", dir=registry)
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, registry / CHAMPION_FILE)
    record = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "from": previous, "to": version}
    with (registry / PROMOTIONS_FILE).open("a") as f:
        f.write(json.dumps(record) + "\n")
