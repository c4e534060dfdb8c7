"""`floodgate model …` end to end on a private registry: train, check, gated promote, evaluate.

Needs the SpamAssassin corpus (`make data`); skipped with that reason when it is absent.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models import registry, splits
from models.corpus import load_spamassassin
from models.train import train_and_register
from pipeline.cli import app
from pipeline.core import config
from tests.model_helpers import rewrite_card


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data = config.load().paths.data
    try:
        corpus = list(load_spamassassin(data))
    except FileNotFoundError:
        pytest.skip(f"the SpamAssassin corpus is not in {data}: run `make data`")
    reg = tmp_path_factory.mktemp("registry")
    train, _ = splits.time_split(corpus)
    strong = train_and_register(train, reg, promote=True)
    # A weak candidate: a sliver of the training data.
    sliver = random.Random(3).sample([m for m in train if m.label == "ham"], 60) + \
        random.Random(3).sample([m for m in train if m.label == "spam"], 12)
    weak = train_and_register(sliver, reg)
    return {"FLOODGATE_PATHS_REGISTRY": str(reg), "FLOODGATE_PATHS_DATA": str(data),
            "FLOODGATE_MODERN_CORPUS": "off",  # tests/test_models_crosscorpus.py covers it
            "strong": strong, "weak": weak, "reports": str(tmp_path_factory.mktemp("reports"))}


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["model", *args], env={k: v for k, v in env.items() if k.startswith("FLOOD")})
    return result.exit_code, result.output


def test_check_and_gated_promotion(env: dict[str, str]) -> None:
    reg = Path(env["FLOODGATE_PATHS_REGISTRY"])
    code, out = run(env, "check")
    assert code == 0 and env["strong"] in out

    code, out = run(env, "promote", env["weak"])
    assert code == 1 and "refused to promote" in out and "worse than the champion" in out
    assert registry.champion_version(reg) == env["strong"]

    code, out = run(env, "promote", env["weak"], "--recall-tolerance", "1", "--fpr-tolerance", "1", "--max-fpr", "1")
    assert code == 0 and f"promoted {env['weak']}" in out
    assert registry.champion_version(reg) == env["weak"]

    code, out = run(env, "promote", env["strong"])
    assert code == 0 and registry.champion_version(reg) == env["strong"]


def test_a_champion_this_code_cannot_load_is_judged_by_the_metrics_its_card_recorded(
        env: dict[str, str], tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    shutil.copytree(env["FLOODGATE_PATHS_REGISTRY"], reg)
    strong, weak = env["strong"], env["weak"]
    registry.promote(reg, strong)

    def older(card: dict) -> None:  # type: ignore[type-arg]
        card["features"]["feature_version"] = -1  # trained on features this code no longer extracts
        card["metrics"]["time_split_test"] = {"ham_fpr": 0.0, "spam_recall": 0.95}

    rewrite_card(reg / strong, older)
    here = env | {"FLOODGATE_PATHS_REGISTRY": str(reg)}
    code, out = run(here, "promote", weak)
    assert code == 1 and "cannot be scored by this code" in out and "worse than the champion" in out
    assert registry.champion_version(reg) == strong

    rewrite_card(reg / strong, lambda card: card["metrics"].pop("time_split_test"))
    code, out = run(here, "promote", weak, "--max-fpr", "1")
    assert code == 0 and "absolute limits only" in out and registry.champion_version(reg) == weak


def test_evaluate_writes_report_and_plot(env: dict[str, str]) -> None:
    code, out = run(env, "evaluate", env["strong"], "--reports-dir", env["reports"], "--top", "5")
    assert code == 0, out
    assert "time split: ham FPR" in out and "random split: ham FPR" in out and "top spam features" in out
    report = json.loads((Path(env["reports"]) / f"evaluate-{env['strong']}.json").read_text())
    assert report["time_split"]["n_ham"] == 1400 and report["time_split"]["n_spam"] == 1396
    assert report["time_split"]["roc_auc"] > 0.99
    assert (Path(env["reports"]) / f"evaluate-{env['strong']}.png").stat().st_size > 10_000


def test_no_champion_is_a_clear_error(tmp_path: Path, env: dict[str, str]) -> None:
    code, out = run({**env, "FLOODGATE_PATHS_REGISTRY": str(tmp_path)}, "check")
    assert code == 1 and "no usable champion" in out


@pytest.mark.kafka
def test_retrain_from_feedback_full_and_online(env: dict[str, str], topic_settings: config.Settings) -> None:
    from pipeline import kafka
    from pipeline.core import events

    producer = kafka.producer(topic_settings)
    for i in range(6):
        label = "spam" if i % 2 else "ham"
        raw = f"Subject: feedback {i}\r\n\r\n{'zorblax offer' if i % 2 else 'agenda minutes'} {i}\r\n".encode()
        ev = events.new_event(events.Envelope("a@b.example", ("c@example.com",)), raw, label=label)
        producer.produce(topic_settings.topic("feedback"), key=ev.key, value=events.encode(ev))
    assert producer.flush(30) == 0
    kenv = {**env, **{k: v for k, v in config.environment(topic_settings).items() if k.startswith("FLOODGATE_KAFKA_")}}
    reg = Path(env["FLOODGATE_PATHS_REGISTRY"])
    champion = registry.champion_version(reg)

    code, out = run(kenv, "retrain", "--online", "--no-promote")
    assert code == 0, out
    assert "6 verdicts used" in out
    online_version = out.split("registered ")[1].split()[0]
    card = registry.load(reg, online_version).card
    assert card["parent"] == champion and card["online_update"]["learned"] == 6

    code, out = run(kenv, "retrain", "--no-promote")
    assert code == 0, out
    full = registry.load(reg, out.split("registered ")[1].split()[0]).card
    assert full["feedback"]["labels"] == {"ham": 3, "spam": 3}
    assert full["training_data"]["messages"] == 3250 + 6
    assert registry.champion_version(reg) == champion  # --no-promote: the champion stays
