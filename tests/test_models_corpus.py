"""Corpus loaders on small files the tests write: each format, label rules, format detection."""

from __future__ import annotations

import base64
import hashlib
import mailbox
from pathlib import Path

import orjson
import pytest

from models import corpus, dataset
from models.corpus import Message, iter_messages

HAM = b"From: alice@example.org\r\nSubject: lunch\r\n\r\nSee you at noon.\r\n"
SPAM = b"From: promo@deals.example\nSubject: WIN \xff\xfe money\n\nClick http://x.example/now\n"


def test_label_from_name() -> None:
    assert corpus.label_from_name("easy_ham_2") == "ham"
    assert corpus.label_from_name("spam_2") == "spam"
    assert corpus.label_from_name(".Junk") == "spam"
    assert corpus.label_from_name("inbox") is None
    assert corpus.label_from_name("Birmingham") is None


def test_spamassassin_layout(tmp_path: Path) -> None:
    root = tmp_path / "spamassassin"
    for group, raw in (("easy_ham", HAM), ("spam_2", SPAM)):
        (root / group).mkdir(parents=True)
        (root / group / f"00001.{hashlib.md5(raw).hexdigest()}").write_bytes(raw)
        (root / group / "cmds").write_text("mv a b\n")  # the original tarballs' helper script: not a message
    got = list(iter_messages(tmp_path))
    assert [(m.group, m.label, m.raw) for m in got] == [("easy_ham", "ham", HAM), ("spam_2", "spam", SPAM)]
    with pytest.raises(FileNotFoundError):
        list(corpus.load_spamassassin(tmp_path, groups=("hard_ham",)))


def test_mbox_keeps_bytes(tmp_path: Path) -> None:
    path = tmp_path / "spam.mbox"
    box = mailbox.mbox(path)
    box.add(HAM)
    box.add(SPAM)
    box.close()
    assert corpus.detect(path) == "mbox"
    got = list(iter_messages(path))
    assert [m.label for m in got] == ["spam", "spam"]
    assert b"See you at noon." in got[0].raw and b"\xff\xfe" in got[1].raw
    assert got[1].name == "spam.mbox:1"


def test_maildir(tmp_path: Path) -> None:
    path = tmp_path / "Junk"
    box = mailbox.Maildir(path, create=True)
    box.add(SPAM)
    box.add(HAM)
    assert corpus.detect(path) == "maildir"
    got = list(iter_messages(path))
    assert sorted(m.raw.replace(b"\r\n", b"\n") for m in got) == sorted([SPAM, HAM.replace(b"\r\n", b"\n")])
    assert {m.label for m in got} == {"spam"}


def test_eml_dir_labels_from_folders_and_file(tmp_path: Path) -> None:
    (tmp_path / "ham").mkdir()
    (tmp_path / "spam").mkdir()
    (tmp_path / "ham" / "a.eml").write_bytes(HAM)
    (tmp_path / "spam" / "b.eml").write_bytes(SPAM)
    (tmp_path / ".hidden").write_bytes(b"not mail")
    got = list(iter_messages(tmp_path))
    assert [(m.name, m.label, m.group) for m in got] == [("ham/a.eml", "ham", "ham"), ("spam/b.eml", "spam", "spam")]

    index = tmp_path / "index"
    index.write_text("spam ../data/a.eml\nham ../data/b.eml\n")  # TREC spam track format
    got = list(corpus.iter_eml_dir(tmp_path, labels_file=index))
    assert [(m.name, m.label) for m in got] == [("ham/a.eml", "spam"), ("spam/b.eml", "ham")]

    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("name,label\na.eml,ham\n")
    got = list(corpus.iter_eml_dir(tmp_path, labels_file=csv_file))
    assert [(m.name, m.label) for m in got] == [("ham/a.eml", "ham"), ("index", None), ("spam/b.eml", None)]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "mail.jsonl"
    lines = [
        {"raw_b64": base64.b64encode(SPAM).decode(), "label": "spam", "name": "s1"},
        {"text": HAM.decode(), "label": "HAM", "group": "inbox"},
    ]
    path.write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n\n")
    got = list(iter_messages(path))
    assert got == [Message(SPAM, "spam", "mail", "s1"), Message(HAM, "ham", "inbox", "mail.jsonl:2")]

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"raw": "x"}\n{"label": "spam"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(iter_messages(bad))


def test_single_eml_file(tmp_path: Path) -> None:
    path = tmp_path / "one.eml"
    path.write_bytes(HAM)
    assert corpus.detect(path) == "eml"
    assert [m.raw for m in iter_messages(path)] == [HAM]


def test_dataset_verify_detects_a_changed_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset, "EXPECTED", {"spam": 1})
    (tmp_path / "spam").mkdir()
    (tmp_path / "spam" / "m").write_bytes(SPAM)
    (tmp_path / dataset.MANIFEST).write_text(f"spam\tm\t{hashlib.sha256(SPAM).hexdigest()}\n")
    assert dataset.verify(tmp_path) == {"spam": 1}
    (tmp_path / "spam" / "m").write_bytes(SPAM + b"tampered")
    with pytest.raises(dataset.CorpusError, match="changed"):
        dataset.verify(tmp_path)
