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
from pathlib import Path
from typing import Any

import numpy as np

from models import crosscorpus, explain, metrics, registry, splits, train
from models.corpus import Message, load_spamassassin


def fixed_eval_set(data_dir: Path) -> list[Message]:
    """The evaluation set every model is judged on (and promotion gates use): the time split's test part."""
    return splits.time_split(load_spamassassin(data_dir))[1]


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
