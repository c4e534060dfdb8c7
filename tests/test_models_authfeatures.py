"""The model's view of Floodgate's own Authentication-Results (models/authfeatures.py): it reads our
field only, adds nothing to mail without one (the public corpora), and a model trained on stamped
mail made here learns from it."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from models import authfeatures, corpus, explain, train
from models import pipeline as model_pipeline
from models.features import MailText
from pipeline.core import config
from pipeline.smtp import auth

ID = "mx.floodgate.test"


def results(good: bool, domain: str = "sender.test") -> auth.AuthResults:
    """What the ingress would record for a message from ``domain``: all passing, or a forgery."""
    if good:
        return auth.AuthResults(
            auth.SpfResult("pass", "mailfrom", domain, f"bounce@{domain}"), None,
            (auth.DkimResult("pass", domain, "sel", algorithm="rsa-sha256", b="abcdefgh"),),
            auth.DmarcResult("pass", domain, "reject", domain, domain, spf_aligned=True, dkim_aligned=domain), None)
    return auth.AuthResults(
        auth.SpfResult("fail", "mailfrom", domain, f"ceo@{domain}", "not permitted"),
        auth.SpfResult("fail", "helo", f"mail.{domain}"), (),
        auth.DmarcResult("fail", domain, "reject", domain, domain), None)


def stamped(raw: bytes, good: bool, authserv_id: str = ID) -> bytes:
    return auth.stamp(raw, results(good), authserv_id)[0]


MSG = b"From: Alice <alice@sender.test>\r\nSubject: hello\r\n\r\nHi Bob,\r\n"


def test_tokens_of_our_field_only() -> None:
    assert authfeatures.tokens(stamped(MSG, True), ID) == [
        "ar:spf:pass", "ar:dkim:pass", "ar:dmarc:pass", "ar:dmarc:p:reject", "ar:aligned:dkim", "ar:aligned:spf"]
    assert authfeatures.tokens(stamped(MSG, False), ID) == [
        "ar:spf:fail", "ar:helo:fail", "ar:dkim:none", "ar:dmarc:fail", "ar:dmarc:p:reject", "ar:aligned:none"]
    # Another server's field, however it reads, is not ours; nor is ours below the header block.
    other = b"Authentication-Results: mx.other.test; spf=pass; dmarc=pass header.from=sender.test\r\n" + MSG
    assert authfeatures.tokens(other, ID) == []
    assert authfeatures.tokens(MSG + b"Authentication-Results: mx.floodgate.test; dmarc=pass\r\n", ID) == []
    assert authfeatures.tokens(MSG, ID) == []
    # The topmost of ours is the one the ingress wrote (it removed every other with our id).
    both = stamped(b"Authentication-Results: mx.floodgate.test; dmarc=pass\r\n" + MSG, False)
    assert "ar:dmarc:fail" in authfeatures.tokens(both, ID) and "ar:dmarc:pass" not in authfeatures.tokens(both, ID)


def test_mail_without_our_field_gets_exactly_the_text_features() -> None:
    msgs = list(corpus.load_spamassassin(config.ROOT / "data", groups=("easy_ham", "spam")))
    sample = random.Random(3).sample(msgs, 300)
    raws = [m.raw for m in sample]
    assert authfeatures.MailWithAuth(MailText(), ID).transform(raws) == MailText().transform(raws)
    # So a model trained on the public corpus is the same model, weight for weight.
    with_auth = train.fit(sample).pipeline
    plain = model_pipeline.build(authserv_id=ID)
    plain.steps[0] = ("mail", MailText())
    plain.fit(raws, train.targets(train.labelled(sample)))
    assert np.array_equal(with_auth.named_steps["clf"].coef_, plain.named_steps["clf"].coef_)


def test_a_model_trained_on_stamped_mail_learns_from_the_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stamped mail made here: ham that passes, spam that forges. Half of each is stamped, so the
    text alone cannot carry what the results say; the model's weights show it used them."""
    monkeypatch.setattr(authfeatures, "default_authserv_id", lambda: ID)
    msgs = list(corpus.load_spamassassin(config.ROOT / "data", groups=("easy_ham", "spam")))
    rng = random.Random(5)
    ham = rng.sample([m for m in msgs if m.label == "ham"], 300)
    spam = rng.sample([m for m in msgs if m.label == "spam"], 300)
    made = [replace(m, raw=stamped(m.raw, m.label == "ham")) if i % 2 else m for i, m in enumerate(ham + spam)]
    trained = train.fit(made)
    pipe = trained.pipeline
    assert isinstance(pipe.named_steps["mail"], authfeatures.MailWithAuth)
    coef = pipe.named_steps["clf"].coef_[0]
    hv = pipe.named_steps["hash"]

    def weight(token: str) -> float:
        return float(coef[hv.transform([token]).tocsr().indices[0]])

    used = {t: round(weight(t), 3) for t in ("ar:dmarc:pass", "ar:dmarc:fail", "ar:spf:pass", "ar:spf:fail",
                                             "ar:dkim:pass", "ar:dkim:none", "ar:aligned:none")}
    print("auth feature weights (spam-ward > 0):", used)
    top = explain.top_features(pipe, [m.raw for m in made], n=40)
    print("top spam features:", top["spam"][:15])
    print("top ham features:", top["ham"][:15])
    assert used["ar:dmarc:fail"] > 0 > used["ar:dmarc:pass"]
    assert used["ar:spf:fail"] > 0 > used["ar:spf:pass"]
    assert any(t.startswith("ar:") for t, _w in top["spam"] + top["ham"])
    # The same text scores higher as a forgery than as an authenticated message.
    text = spam[0].raw
    forged, genuine = pipe.predict_proba([stamped(text, False), stamped(text, True)])[:, 1]
    assert forged > genuine
    # And a stamp under another authserv-id is read as no stamp at all.
    assert pipe.predict_proba([stamped(text, True, "mx.other.test")])[0, 1] == pytest.approx(
        pipe.predict_proba([text])[0, 1])


def test_the_verdict_cache_key_follows_our_results() -> None:
    pipe = model_pipeline.build(authserv_id=ID)
    key = authfeatures.cache_key_part
    assert key(pipe, stamped(MSG, True)) != key(pipe, stamped(MSG, False))
    # Per-message properties (addresses, signature bytes) are not in it: a campaign keeps one key.
    assert authfeatures.cache_key_part(pipe, stamped(MSG, True)) == authfeatures.cache_key_part(
        pipe, auth.stamp(MSG, replace(results(True), spf_mailfrom=auth.SpfResult(
            "pass", "mailfrom", "sender.test", "other@sender.test")), ID)[0])
    plain = model_pipeline.build(authserv_id=ID)
    plain.steps[0] = ("mail", MailText())
    assert authfeatures.cache_key_part(plain, stamped(MSG, True)) == ""
