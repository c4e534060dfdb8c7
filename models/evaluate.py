"""``make evaluate``: the champion (or any version) measured on both corpus splits, with a plot.

* time split: the registered model itself on easy_ham_2 + spam_2 (newer mail than it trained on);
* random split: a fresh fit with the same settings on a seeded, stratified 70 %, measured on the
  other 30 % (the registered model has seen those messages, so it cannot be measured on them);
* cross-corpus: the registered model on the modern set, raw and list-stripped, when the set is
  there (:mod:`models.crosscorpus`; the report says so when it is not).

Writes ``reports/evaluate-<version>.json`` and ``.png`` (ROC curves on a log FPR axis, and the
score distributions with the decision threshold).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import crosscorpus, explain, metrics, registry, splits, train
from models.corpus import Message, load_spamassassin


def fixed_eval_set(data_dir: Path) -> list[Message]:
    """The evaluation set of a model trained on the base corpus (and what promotion gates judged
    every model on before operator corpora): the time split's test part."""
    return splits.time_split(load_spamassassin(data_dir))[1]


BASE_DESCRIPTION = "the SpamAssassin time split's test part (easy_ham_2 + spam_2)"


@dataclass
class EvalSet:
    """The messages a model is judged on, as its card names them."""

    messages: list[Message]
    description: str
    sha256: str  # splits.fingerprint of the messages as read now
    base_sha256: str | None  # that of the time split's test part, when it is in the set
    recorded_sha256: str | None  # what the card recorded at training (differs: the corpora changed since)


def eval_set_for(card: dict[str, Any], data_dir: Path) -> EvalSet:
    """Rebuild the evaluation set a model card names (``card["evaluation_set"]``): the time split's
    test part when the base corpus trained it, plus the held-out part of each operator corpus,
    read again from the paths recorded (:mod:`models.corpora`). A card without one (trained before
    operator corpora) means the time split's test part."""
    from models import corpora

    spec = card.get("evaluation_set") or {"base": True, "corpora": []}
    msgs: list[Message] = []
    base_sha = None
    base_all: list[Message] = []
    if spec.get("base", True) or spec.get("corpora"):
        try:
            base_all = list(load_spamassassin(data_dir))
        except FileNotFoundError:
            if spec.get("base", True):
                raise
    if spec.get("base", True):
        base_test = splits.time_split(base_all)[1]
        base_sha = splits.fingerprint(base_test)["sha256"]
        msgs += base_test
    parts = [BASE_DESCRIPTION] if spec.get("base", True) else []
    if spec.get("corpora"):
        read = corpora.read_all([corpora.Spec.parse(s) for s in spec["corpora"]], spec.get("folder_labels", {}),
                                base=base_all, conflicts=spec.get("conflicts", "error"))
        for c in read:
            held = corpora.holdout_split(c.messages, spec.get("holdout", corpora.HOLDOUT))[1]
            msgs += held
            parts.append(f"{c.spec}: newest {100 * spec.get('holdout', corpora.HOLDOUT):.0f} % by Date "
                         f"({len(held)} messages)")
    sha = splits.fingerprint(msgs)["sha256"]
    return EvalSet(msgs, "; ".join(parts), sha, base_sha, spec.get("sha256"))


def measure(model: registry.LoadedModel, messages: list[Message]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    y = train.targets(messages)
    s = model.score([m.raw for m in messages])
    target = float(model.card.get("target_fpr", train.TARGET_FPR))
    return metrics.metrics(y, s, model.threshold, target), y, s


def evaluate(data_dir: Path, registry_dir: Path, reports_dir: Path, version: str | None = None,
             top: int = 20, root: Path | None = None) -> dict[str, Any]:
    """``root``: the project root the modern set is looked for beside (default: this checkout's)."""
    model = registry.load(registry_dir, version) if version else registry.load_champion(registry_dir)
    target = float(model.card.get("target_fpr", train.TARGET_FPR))
    corpus = list(load_spamassassin(data_dir))
    t_train, t_test = splits.time_split(corpus)
    time_m, ty, ts = measure(model, t_test)
    r_train, r_test = splits.random_split(corpus)
    r_fit = train.fit(r_train, target_fpr=target)
    ry, rs = train.targets(r_test), train.score(r_fit.pipeline, r_test)
    random_m = metrics.metrics(ry, rs, r_fit.threshold, target)
    report = {
        "version": model.version,
        "target_fpr": target,
        "time_split": {"train_groups": list(splits.TIME_TRAIN_GROUPS), "test_groups": list(splits.TIME_TEST_GROUPS),
                       **time_m},
        "random_split": {"note": "fresh fit, same settings, seeded stratified 70/30",
                         "test_fraction": splits.RANDOM_TEST_FRACTION, "seed": splits.RANDOM_SEED, **random_m},
        "top_features": explain.top_features(model.pipeline, [m.raw for m in t_train], n=top),
        "cross_corpus": crosscorpus.evaluate(model, root if root is not None else _project_root()),
    }
    reports_dir.mkdir(parents=True, exist_ok=True)
    stem = reports_dir / f"evaluate-{model.version}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    plot({"time split": (ty, ts, model.threshold), "random split": (ry, rs, r_fit.threshold)},
         stem.with_suffix(".png"), title=f"model {model.version}")
    report["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".png"))]
    return report


def _project_root() -> Path:
    from pipeline.core.config import ROOT

    return ROOT


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, 1 + len(curves), figsize=(5 * (1 + len(curves)), 4.2))
    roc_ax = axes[0]
    for (name, (y, s, thr)), ax in zip(curves.items(), axes[1:], strict=True):
        fpr, tpr, _ = roc_curve(y, s)
        roc_ax.plot(np.maximum(fpr, 1e-4), tpr, label=name)
        flagged = s >= thr
        roc_ax.plot(max(np.mean(flagged[y == 0]), 1e-4), np.mean(flagged[y == 1]), "o", color="black")
        bins = np.linspace(0, 1, 51)
        ax.hist(s[y == 0], bins=bins, alpha=0.6, label="ham", log=True)
        ax.hist(s[y == 1], bins=bins, alpha=0.6, label="spam", log=True)
        ax.axvline(thr, color="black", linestyle="--", label=f"threshold {thr:.3f}")
        ax.set(title=f"{name}: scores", xlabel="spam probability", ylabel="messages (log)")
        ax.legend()
    roc_ax.set(xscale="log", xlim=(1e-4, 1), ylim=(0.5, 1.001), title="ROC (dot: at the threshold)",
               xlabel="ham false-positive rate (log)", ylabel="spam recall")
    roc_ax.axvline(1e-3, color="grey", linestyle=":", label="FPR 0.1 %")
    roc_ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(report: dict[str, Any]) -> str:
    lines = [f"model {report['version']} (threshold chosen for ham FPR <= {100 * report['target_fpr']:.2f}% "
             "on training folds)"]
    for key in ("time_split", "random_split"):
        m = report[key]
        c = m["confusion"]
        oracle = m.get(f"oracle_recall_at_fpr_{report['target_fpr']:g}", float("nan"))
        lines += [f"{key.replace('_', ' ')}: {metrics.summary(m)}",
                  f"  confusion: ham->ham {c['tn']}  ham->spam {c['fp']}  spam->ham {c['fn']}  spam->spam {c['tp']}",
                  f"  recall at FPR {100 * report['target_fpr']:.2f}% with a threshold chosen on this set "
                  f"(oracle, for comparison): {100 * oracle:.2f}%"]
    tf = report["top_features"]
    lines.append("top spam features: " + ", ".join(f"{t} {w:+.2f}" for t, w in tf["spam"]))
    lines.append("top ham features:  " + ", ".join(f"{t} {w:+.2f}" for t, w in tf["ham"]))
    if "cross_corpus" in report:
        lines += crosscorpus.render(report["cross_corpus"])
    lines += [f"wrote {f}" for f in report.get("files", [])]
    return "\n".join(lines)


def trained_on(card: dict[str, Any]) -> set[str]:
    """The digest prefixes of the messages a model was trained on, as its card recorded them."""
    return set(str(card.get("training_digests", "")).split())


def leave_out(messages: list[Message], digests: set[str]) -> list[Message]:
    """``messages`` less those whose :func:`models.corpora.digest` prefix is in ``digests``."""
    from models.corpora import digest

    if not digests:
        return messages
    return [m for m in messages if digest(m.raw)[:train.DIGEST_HEX] not in digests]


def evaluate_corpora(model: registry.LoadedModel, specs: list[Any], folder_labels: dict[str, str] | None = None,
                     conflicts: str = "error") -> dict[str, Any]:
    """``floodgate model evaluate --corpus PATH``: ``model`` on an operator's labelled mail, each
    corpus and all together, at the model's threshold. Messages the model was trained on (its card's
    ``training_digests``) are left out and counted, as is everything :mod:`models.corpora` leaves out."""
    from models import corpora

    read = corpora.read_all(specs, folder_labels, conflicts=conflicts)
    seen = trained_on(model.card)
    target = float(model.card.get("target_fpr", train.TARGET_FPR))
    per: dict[str, Any] = {}
    everything: list[Message] = []
    for c in read:
        if seen:
            kept = leave_out(c.messages, seen)
            if len(kept) < len(c.messages):
                c.warn("in the model's training data (not measured)", c.name, len(c.messages) - len(kept))
            c.messages = kept
        everything += c.messages
        per[str(c.spec)] = {**c.summary(), **_measure_labelled(model, c.messages, target)}
    return {"version": model.version, "threshold": model.threshold, "target_fpr": target,
            "corpora": per, "all": _measure_labelled(model, everything, target),
            "warnings": corpora.warnings_text(read)}


def _measure_labelled(model: registry.LoadedModel, messages: list[Message], target: float) -> dict[str, Any]:
    if not messages:
        return {"n_ham": 0, "n_spam": 0}
    m = metrics.metrics(train.targets(messages), model.score([x.raw for x in messages]), model.threshold, target)
    return m


def render_corpora(report: dict[str, Any]) -> str:
    lines = [f"model {report['version']} (threshold {report['threshold']:.4f}, chosen for ham FPR <= "
             f"{100 * report['target_fpr']:.2f}% on its training folds)", *report["warnings"]]
    for name, m in [*report["corpora"].items(), ("all corpora", report["all"])]:
        lines.append(f"{name}: " + _line(m))
    return "\n".join(lines)


def _line(m: dict[str, Any]) -> str:
    if "confusion" not in m:
        return "no messages measured"
    c = m["confusion"]
    out = []
    if m["n_ham"]:
        out.append(f"ham FPR {100 * m['ham_fpr']:.3f}% ({c['fp']}/{m['n_ham']})")
    if m["n_spam"]:
        out.append(f"spam recall {100 * m['spam_recall']:.2f}% ({c['tp']}/{m['n_spam']})")
    if m["n_ham"] and m["n_spam"]:
        oracle = next((v for k, v in m.items() if k.startswith("oracle_recall")), float("nan"))
        out.append(f"ROC AUC {m['roc_auc']:.5f}  recall at <=0.1% FPR, threshold on this set {100 * oracle:.2f}%")
    return "  ".join(out)
