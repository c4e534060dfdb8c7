"""List-stripping and the cross-corpus evaluation, on small messages and a tarball made here."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from models import crosscorpus, liststrip, registry

LIST_POST = (
    b"From: Ann Author via Dev-list <dev-list@lists.example.org>\r\n"
    b"Reply-To: Ann Author <ann@example.net>\r\n"
    b"Sender: Dev-list <dev-list-bounces@lists.example.org>\r\n"
    b"Subject: [Dev-list] the build fails on arm\r\n"
    b"List-Id: Dev list <dev-list.lists.example.org>\r\n"
    b"List-Post: <mailto:dev-list@lists.example.org>\r\n"
    b"List-Unsubscribe: <mailto:dev-list-leave@lists.example.org>\r\n"
    b"Precedence: list\r\n"
    b"Received: from mx.example.net by lists.example.org\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    b"The build fails on arm since yesterday; see the log.\r\n\r\n"
    b"_______________________________________________\r\n"
    b"Dev-list mailing list -- dev-list@lists.example.org\r\n"
    b"To unsubscribe send an email to dev-list-leave@lists.example.org\r\n")


def test_strip_removes_what_the_list_added_and_nothing_else() -> None:
    out = liststrip.strip(LIST_POST, strict=True)
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"From: Ann Author <ann@example.net>" in head and b"Reply-To" not in head
    assert b"Subject: the build fails on arm" in head
    for name in (b"List-Id", b"List-Post", b"List-Unsubscribe", b"Precedence", b"Sender"):
        assert name not in head
    assert b"Received: from mx.example.net by lists.example.org" in head  # delivery path left alone
    assert body.strip() == b"The build fails on arm since yesterday; see the log."
    assert not liststrip.residue(body, "lists.example.org")
    plain = b"From: a@example.com\r\nSubject: hi\r\n\r\nno list here\r\n"
    assert liststrip.strip(plain, strict=True) == plain


def _tarball(path: Path, items: list[tuple[str, bytes, str]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        labels = "".join(f"{name}\t{label}\n" for name, _, label in items).encode()
        for name, data in [*((n, d) for n, d, _ in items), ("labels.tsv", labels)]:
            info = tarfile.TarInfo("modern/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_locate_load_and_evaluate(tmp_path: Path, trained_registry: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    assert crosscorpus.locate(root, env={}) is None
    report = crosscorpus.evaluate(registry.load_champion(trained_registry), root, env={})
    assert "skipped" in report["absent"] and crosscorpus.render(report)[0].startswith("cross-corpus")
    with pytest.raises(FileNotFoundError):
        crosscorpus.locate(root, env={crosscorpus.ENV: str(tmp_path / "nowhere.tar.gz")})

    spam = (b"From: Security <alert@paypa1-secure.example>\r\nSubject: Verify your account now!!\r\n"
            b"Content-Type: text/html\r\n\r\n<html><body><a href='http://198.51.100.7/x'>https://www.paypal.com"
            b"</a> Your account is suspended. Click here to verify your password!</body></html>\r\n")
    items = [(f"ham/{i:05d}.eml", LIST_POST.replace(b"arm", f"arm{i}".encode()), "ham") for i in range(3)]
    items += [(f"spam/{i:05d}.eml", spam.replace(b"now", f"now {i}".encode()), "spam") for i in range(3)]
    beside = tmp_path / "shared" / "corpora"
    beside.mkdir(parents=True)
    _tarball(beside / crosscorpus.TARBALL, items)
    assert crosscorpus.locate(root, env={}) == beside / crosscorpus.TARBALL
    msgs = crosscorpus.load(beside / crosscorpus.TARBALL)
    assert [(m.name, m.label) for m in msgs] == [(n, lab) for n, _, lab in items]

    report = crosscorpus.evaluate(registry.load_champion(trained_registry), root, env={})
    for view in ("raw", "list_stripped"):
        assert report[view]["n_ham"] == 3 and report[view]["n_spam"] == 3
        assert 0 <= report[view]["roc_auc"] <= 1
    assert len(crosscorpus.render(report)) == 3
