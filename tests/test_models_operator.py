"""An operator's own mail, end to end: train on a Maildir tree and an mbox pair made here, evaluate,
promote through the gates, score one file, and a running classifier hot-reloads the new champion.
Also what a corpus that cannot be used as given answers, and explanations that add up."""

from __future__ import annotations

import json
import mailbox
import re
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models import corpora, explain, registry
from models.corpus import Message, load_spamassassin
from pipeline.cli import app
from pipeline.core import config, events
from tests.kafka_helpers import wait_for
from tests.worker_helpers import process, produce, scrape

DATA = config.ROOT / "data"


@pytest.fixture(scope="module")
def mail() -> tuple[list[Message], list[Message]]:
    try:
        msgs = list(load_spamassassin(DATA, groups=("easy_ham", "spam")))
    except FileNotFoundError:
        pytest.skip(f"the SpamAssassin corpus is not in {DATA}: run `make data`")
    return [m for m in msgs if m.label == "ham"][::20], [m for m in msgs if m.label == "spam"][::5]


def cli(registry_dir: Path, *args: str) -> tuple[int, str]:
    env = {"FLOODGATE_PATHS_REGISTRY": str(registry_dir), "FLOODGATE_PATHS_DATA": str(DATA),
           "FLOODGATE_MODERN_CORPUS": "off"}
    result = CliRunner().invoke(app, ["model", *args], env=env)
    return result.exit_code, result.output


def mbox(path: Path, msgs: list[Message]) -> Path:
    box = mailbox.mbox(path)
    for m in msgs:
        box.add(m.raw)
    box.close()
    return path


def maildir_tree(root: Path, ham: list[Message], spam: list[Message], trash: list[Message]) -> Path:
    inbox = mailbox.Maildir(root, create=True)
    for m in ham:
        inbox.add(m.raw)
    for name, msgs in (("Junk", spam), ("Trash", trash)):
        folder = inbox.add_folder(name)  # Maildir++: root/.Junk, as Dovecot keeps it
        for m in msgs:
            folder.add(m.raw)
    return root


@pytest.mark.kafka
def test_train_evaluate_promote_score_and_hot_reload(mail, topic_settings: config.Settings, tmp_path: Path) -> None:
    ham, spam = mail  # 125 ham, 100 spam
    reg = tmp_path / "registry"
    tree = maildir_tree(tmp_path / "Maildir", ham[:80], spam[:60], ham[120:123])
    ham_box, spam_box = mbox(tmp_path / "ham.mbox", ham[80:120]), mbox(tmp_path / "spam.mbox", spam[60:])
    weak = (mbox(tmp_path / "weak-ham.mbox", ham[:5]), mbox(tmp_path / "weak-spam.mbox", spam[:5]))

    code, out = cli(reg, "train", "--no-base", "--corpus", str(weak[0]), "--corpus", f"spam={weak[1]}")
    assert code == 0, out
    first = re.search(r"registered (\S+)", out).group(1)  # type: ignore[union-attr]
    assert f"promoted {first}" in out and registry.champion_version(reg) == first

    settings = replace(topic_settings, paths=replace(topic_settings.paths, registry=reg))
    with process(settings, "classify") as (_proc, port):
        def serving() -> str | None:
            return next((dict(labels)["version"] for (name, labels), _ in scrape(port).items()
                         if name == "floodgate_model_info"), None)

        assert serving() == first

        code, out = cli(reg, "train", "--no-base", "--corpus", str(tree), "--corpus", str(ham_box),
                        "--corpus", str(spam_box))
        assert code == 0, out
        second = re.search(r"registered (\S+)", out).group(1)  # type: ignore[union-attr]
        assert "not promoted: a champion exists" in out
        assert "3 left out: folder not used for training" in out  # Trash, counted
        card = registry.read_card(reg, second)
        assert [(c["format"], c["labels"]) for c in card["corpora"]] == [
            ("maildir", {"ham": 80, "spam": 60}), ("mbox", {"ham": 40}), ("mbox", {"spam": 40})]
        assert all(len(c["sha256"]) == 64 for c in card["corpora"])
        assert card["evaluation_set"]["messages"] == 16 + 12 + 8 + 8

        code, out = cli(reg, "evaluate", "--corpus", str(tree))
        assert code == 0, out
        assert "in the model's training data (not measured)" in out and "ham FPR" in out

        code, out = cli(reg, "promote")
        assert code == 0, out
        assert f"promoted {second}" in out and "evaluation set:" in out

        # The worker looks at the registry when it takes a batch (at most once a second) and swaps
        # the new model in, loaded in the background, at a later batch: a little mail makes batches.
        def reloaded() -> bool:
            event = events.new_event(events.Envelope("a@example.org", ("b@example.com",)), ham[0].raw)
            produce(settings, "inbound", [event])
            return serving() == second

        wait_for(reloaded, 60, interval=0.5, what="the classifier to hot-reload the new champion")

    code, out = cli(reg, "score", "--json", str(tree / ".Junk" / "cur"), str(spam_box))
    assert code == 1  # a folder is not a message: said so, and the exit code shows it
    assert sum(line.startswith("{") for line in out.splitlines()) == 40  # an mbox: each of its messages
    one = next((tree / ".Junk" / "new").iterdir())
    code, out = cli(reg, "score", "--json", str(one))
    assert code == 0, out
    got = json.loads(out)
    assert got["model_version"] == second and got["verdict"] in ("spam", "ham")
    assert got["towards_spam"] and got["towards_ham"]


def test_corpora_that_cannot_be_used_as_given(mail, tmp_path: Path) -> None:
    ham, spam = mail
    only_ham = mbox(tmp_path / "ham.mbox", ham[:10])
    with pytest.raises(corpora.CorpusError, match="has no spam"):
        corpora.require_both_labels(corpora.read(corpora.Spec(only_ham)).messages, "the training set")
    code, out = cli(tmp_path / "reg", "train", "--no-base", "--corpus", str(only_ham))
    assert code == 1 and "has no spam" in out

    clash = mbox(tmp_path / "spam.mbox", [*spam[:10], ham[0]])
    with pytest.raises(corpora.CorpusError, match="both ham and spam"):
        corpora.read_all([corpora.Spec(only_ham), corpora.Spec(clash)])
    read = corpora.read_all([corpora.Spec(only_ham), corpora.Spec(clash)], conflicts="drop")
    assert [len(c.messages) for c in read] == [9, 10]
    assert all(c.warnings["labelled both ham and spam (every copy left out)"] == 1 for c in read)

    folder = tmp_path / "eml"
    (folder / "a").mkdir(parents=True)
    for i, m in enumerate([*ham[:3], *spam[:3]]):
        (folder / "a" / f"{i}.eml").write_bytes(m.raw)
    (folder / "a" / "empty.eml").write_bytes(b"")
    (folder / "a" / "gone.eml").symlink_to(tmp_path / "nowhere")  # unreadable, even for root
    (folder / "a" / "nolabel.eml").write_bytes(ham[4].raw)
    (folder / "a" / "again.eml").write_bytes(ham[0].raw)
    (folder / "labels.tsv").write_text("".join(f"a/{i}.eml\t{'ham' if i < 3 else 'spam'}\n" for i in range(6))
                                       + "a/again.eml\tham\n")
    c = corpora.read_all([corpora.Spec(folder)])[0]
    assert c.labels_from == "labels.tsv" and len(c.messages) == 6
    assert c.warnings == {"empty file": 1, "unreadable file (FileNotFoundError)": 1,
                          "no label (name it in a labels file, or give the corpus as ham=PATH / spam=PATH)": 1,
                          "duplicate of a message read before (one copy kept)": 1}
    with pytest.raises(corpora.CorpusError, match="no such file"):
        corpora.read(corpora.Spec(tmp_path / "missing"))


def test_maildir_folder_labels() -> None:
    assert corpora.folder_label("INBOX", {}) == "ham"
    assert corpora.folder_label("Junk", {}) == "spam"
    assert corpora.folder_label("INBOX.Spam", {}) == "spam"
    assert corpora.folder_label("Trash", {}) is None
    assert corpora.folder_label("Lists.Newsletters", {"Newsletters": "skip"}) is None
    assert corpora.folder_label("Junk", {"Junk": "ham"}) == "ham"
    assert corpora.Spec.parse("spam=/x/y") == corpora.Spec(Path("/x/y"), "spam")
    assert corpora.Spec.parse("/x/a=b") == corpora.Spec(Path("/x/a=b"))


def test_an_explanation_adds_up_to_the_margin(trained_registry: Path) -> None:
    model = registry.load_champion(trained_registry)
    raw = (b"From: Prize Desk <win@lottery.example>\r\nSubject: You have WON $1,000,000!!!\r\n"
           b"Content-Type: text/html\r\n\r\n<html><body><a href='http://198.51.100.9/claim'>Click here</a> to claim "
           b"your prize now! Send your bank details.</body></html>\r\n")
    e = explain.explain(model, raw, n=10**6)
    total = sum(v for _, v in e["towards_spam"]) + sum(v for _, v in e["towards_ham"])
    assert total == pytest.approx(e["margin"], abs=1e-6)
    assert e["score"] == pytest.approx(float(model.score([raw])[0]))
    assert e["verdict"] == ("spam" if e["score"] >= model.threshold else "ham")
    assert any(k.startswith("text:") for k, _ in e["towards_spam"] + e["towards_ham"])
    text = explain.render("msg", explain.explain(model, raw))
    assert text.startswith("msg: ") and "towards spam:" in text and "towards ham" in text


def test_every_hostile_message_gets_an_explanation(trained_registry: Path) -> None:
    from tests import hostile

    model = registry.load_champion(trained_registry)
    for case in hostile.all_cases():
        e = explain.explain(model, case.raw)
        assert e["verdict"] in ("ham", "spam") and explain.render(case.name, e), case.name
