"""The model registry contract: register, promote, load with checksums and trusted types, hot-reload pointer."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio

from models import registry
from models.corpus import Message
from models.registry import LoadedModel, ModelIntegrityError, ModelNotFound
from models.train import train_and_register
from tests.model_helpers import rewrite_card

HAM_WORDS = ("meeting", "agenda", "patch", "review", "kernel", "release", "notes", "lunch", "thanks", "build")
SPAM_WORDS = ("viagra", "casino", "winner", "prize", "cheap", "pills", "click", "offer", "money", "guaranteed")


def synthetic(n: int = 30, seed: int = 1) -> list[Message]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        for label, words, ctype in (("ham", HAM_WORDS, "text/plain"), ("spam", SPAM_WORDS, "text/html")):
            body = " ".join(rng.choices(words, k=40))
            raw = (f"From: sender{i}@{label}.example\r\nSubject: {' '.join(rng.choices(words, k=4))}\r\n"
                   f"Content-Type: {ctype}\r\n\r\n{body}\r\n").encode()
            out.append(Message(raw, label, label, f"{label}{i}"))
    return out


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("registry")
    return path, train_and_register(synthetic(), path, promote=True)


def test_no_champion(tmp_path: Path) -> None:
    assert registry.champion_version(tmp_path) is None
    with pytest.raises(ModelNotFound):
        registry.load_champion(tmp_path)
    with pytest.raises(ModelNotFound):
        registry.promote(tmp_path, "20260101T000000Z-deadbeef")


def test_register_promote_load_score(reg: tuple[Path, str]) -> None:
    path, version = reg
    assert registry.champion_version(path) == version
    assert sorted((path / version).iterdir()) == [path / version / n for n in ("SHA256SUMS", "card.json",
                                                                                "model.skops")]
    model = registry.load_champion(path)
    assert isinstance(model, LoadedModel) and model.version == version
    assert 0.0 < model.threshold < 1.0 and model.card["threshold"] == model.threshold
    assert model.card["training_data"]["labels"] == {"ham": 30, "spam": 30}
    fresh = synthetic(5, seed=99)
    scores = model.score([m.raw for m in fresh])
    assert scores.shape == (10,) and np.all((scores >= 0) & (scores <= 1))
    verdicts = model.verdicts([m.raw for m in fresh])
    assert [v for v, _ in verdicts] == [m.label for m in fresh]
    assert model.score([]).shape == (0,)
    garbage = model.verdicts([b"", b"\xff\x00garbage"])  # scored, not raised on
    assert len(garbage) == 2 and all(v in ("ham", "spam") and 0 <= s <= 1 for v, s in garbage)


def test_versions_sort_by_age_and_promotion_is_logged(reg: tuple[Path, str], tmp_path: Path) -> None:
    first = reg[1]
    second = train_and_register(synthetic(seed=2), tmp_path)
    third = train_and_register(synthetic(seed=3), tmp_path)
    assert registry.versions(tmp_path) == sorted([second, third])
    assert registry.champion_version(tmp_path) is None  # registering never promotes by itself
    registry.promote(tmp_path, second)
    registry.promote(tmp_path, third)
    log = [json.loads(line) for line in (tmp_path / registry.PROMOTIONS_FILE).read_text().splitlines()]
    assert [(r["from"], r["to"]) for r in log] == [(None, second), (second, third)]
    assert first < "9" and first[8] == "T" and first[15] == "Z"


def copy_of(reg: tuple[Path, str], dest: Path) -> str:
    """The module's registered version copied into a fresh registry and promoted there."""
    shutil.copytree(reg[0] / reg[1], dest / reg[1])
    registry.promote(dest, reg[1])
    return reg[1]


def test_tampered_model_is_refused(reg: tuple[Path, str], tmp_path: Path) -> None:
    version = copy_of(reg, tmp_path)
    model_file = tmp_path / version / registry.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError, match="checksum"):
        registry.load_champion(tmp_path)
    with pytest.raises(ModelIntegrityError):
        registry.promote(tmp_path, version)


def test_untrusted_types_are_refused_even_with_matching_checksums(reg: tuple[Path, str], tmp_path: Path) -> None:
    version = copy_of(reg, tmp_path)
    vdir = tmp_path / version
    # An artifact holding a type outside the trusted list, with honest checksums: skops must refuse it.
    blob = sio.dumps({"payload": threading.Lock})
    (vdir / registry.MODEL_FILE).write_bytes(blob)
    sums = "".join(f"{hashlib.sha256((vdir / n).read_bytes()).hexdigest()}  {n}\n"
                   for n in (registry.MODEL_FILE, registry.CARD_FILE))
    (vdir / registry.SUMS_FILE).write_text(sums)
    with pytest.raises(ModelIntegrityError):
        registry.load_champion(tmp_path)


def test_model_for_other_features_is_refused(reg: tuple[Path, str], tmp_path: Path) -> None:
    version = copy_of(reg, tmp_path)
    vdir = tmp_path / version
    card = json.loads((vdir / registry.CARD_FILE).read_text())
    card["features"]["feature_version"] = -1
    (vdir / registry.CARD_FILE).write_text(json.dumps(card))
    sums = "".join(f"{hashlib.sha256((vdir / n).read_bytes()).hexdigest()}  {n}\n"
                   for n in (registry.MODEL_FILE, registry.CARD_FILE))
    (vdir / registry.SUMS_FILE).write_text(sums)
    with pytest.raises(ModelIntegrityError, match="feature version"):
        registry.load_champion(tmp_path)


def test_a_champion_of_older_features_still_gates_a_new_model_by_its_recorded_metrics(
        reg: tuple[Path, str], tmp_path: Path) -> None:
    from models.train import _refusals

    version = copy_of(reg, tmp_path)

    def older(card: dict) -> None:  # type: ignore[type-arg]
        card["features"]["feature_version"] = -1
        card["metrics"]["time_split_test"] = {"ham_fpr": 0.0, "spam_recall": 0.9}

    rewrite_card(tmp_path / version, older)
    with pytest.raises(ModelIntegrityError):
        registry.load_champion(tmp_path)  # unusable by this code...
    assert registry.read_card(tmp_path, version)["metrics"]["time_split_test"]["spam_recall"] == 0.9  # ...but it tells
    refused = _refusals(tmp_path, {"ham_fpr": 0.0, "spam_recall": 0.85})
    assert len(refused) == 1 and "recall" in refused[0] and version in refused[0]
    assert _refusals(tmp_path, {"ham_fpr": 0.0, "spam_recall": 0.9}) == []
    assert _refusals(tmp_path / "empty", {"ham_fpr": 0.5, "spam_recall": 0.1}) == []  # no champion: nothing to protect


def test_register_refuses_untrusted_pipeline(tmp_path: Path) -> None:
    class Custom:  # defined here: not in the trusted list
        pass

    with pytest.raises(ModelIntegrityError, match="trusted"):
        registry.register({"step": Custom()}, {"threshold": 0.5}, tmp_path)
    assert registry.versions(tmp_path) == []


def test_champion_pointer_is_replaced_atomically(reg: tuple[Path, str], tmp_path: Path) -> None:
    a = copy_of(reg, tmp_path)
    b = train_and_register(synthetic(seed=7), tmp_path)
    seen: set[str | None] = set()
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            seen.add(registry.champion_version(tmp_path))

    t = threading.Thread(target=poll)
    t.start()
    try:
        for _ in range(30):
            registry.promote(tmp_path, b)
            registry.promote(tmp_path, a)
    finally:
        stop.set()
        t.join()
    assert seen <= {a, b}  # a reader never sees a missing or half-written pointer
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_train_needs_both_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 ham and 2 spam"):
        train_and_register([m for m in synthetic() if m.label == "ham"], tmp_path)
