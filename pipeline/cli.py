"""The ``floodgate`` console command: one subcommand per worker and per operator task.

Stage modules are imported inside their commands so that each worker loads only what it runs.
"""

from __future__ import annotations

import typer

from pipeline import config

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Floodgate: Kafka stream processing for mail; a spam flood never delays ham.")
topics_app = typer.Typer(no_args_is_help=True, help="The topics of infra/topics.toml.")
app.add_typer(topics_app, name="topics")

from models.cli import app as model_app  # noqa: E402 - light: model modules load inside its commands

app.add_typer(model_app, name="model")


@topics_app.command("apply")
def topics_apply(dry_run: bool = typer.Option(False, help="report what would change, change nothing")) -> None:
    """Create missing topics, grow partitions, set configs; report drift that needs a human."""
    from pipeline import kafka
    from pipeline.kafka import topics

    settings = config.load()
    report = topics.apply(settings, kafka.admin(settings), dry_run=dry_run)
    for line in report:
        typer.echo(line)
    typer.echo(f"topics: {len(report)} change(s)" if report else "topics: no changes")


@topics_app.command("show")
def topics_show() -> None:
    """Each topic of the spec with its partitions and end offsets."""
    from confluent_kafka import TopicPartition

    from pipeline import kafka
    from pipeline.kafka import topics

    settings = config.load()
    metadata = kafka.admin(settings).list_topics(timeout=10).topics
    probe = kafka.consumer(settings, group=settings.group("topics-show"))
    try:
        for t in topics.desired(settings):
            if t.name not in metadata:
                typer.echo(f"{t.name:28} MISSING")
                continue
            parts = sorted(metadata[t.name].partitions)
            total = sum(probe.get_watermark_offsets(TopicPartition(t.name, p), timeout=10)[1] for p in parts)
            typer.echo(f"{t.name:28} partitions={len(parts):<3} records={total}")
    finally:
        probe.close()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
