"""The ``pipeline`` command: the root app with every command group's module registered,
and ``main``, where every failure the user can act on ends in one error line."""

from __future__ import annotations

import sys

import typer
from confluent_kafka import KafkaException
from rich.console import Console

from pipeline.cli import (
    archive,
    backtest,
    bars,
    portfolio,
    produce,
    replay,
    services,
    topics,
    topology,
    venue,
    version,
    web,
)
from pipeline.cli.common import setup_logging
from pipeline.core.errors import PipelineError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Gemini market data and trading on Apache Kafka.")
# `pipeline --help` lists the commands in this order, then the groups in theirs.
app.command("topics")(topics.topics)
app.command("backtest")(backtest.backtest)
app.command("venue")(venue.venue)
app.command("up")(topology.up)
app.command("down")(topology.down)
app.command("chaos")(topology.chaos)
app.command("status")(topology.status)
app.command("metrics")(topology.metrics)
app.command("run")(topology.run_group)
app.command("web")(web.web)
app.command("kill-switch")(portfolio.kill_switch_command)
app.command("version")(version.version)
app.add_typer(services.broker_app, name="broker")
app.add_typer(services.registry_app, name="registry")
app.add_typer(topics.schemas_app, name="schemas")
app.add_typer(produce.produce_app, name="produce")
app.add_typer(produce.load_app, name="load")
app.add_typer(bars.bars_app, name="bars")
app.add_typer(archive.archive_app, name="archive")
app.add_typer(replay.replay_app, name="replay")
app.add_typer(portfolio.portfolio_app, name="portfolio")
app.add_typer(portfolio.strategy_app, name="strategy")


def main() -> None:
    setup_logging("WARNING")
    try:
        app()
    except PipelineError as exc:
        _fail(str(exc))
    except KafkaException as exc:
        _fail(f"Kafka: {exc.args[0].str() if exc.args else exc}")


def _fail(message: str) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(1)


if __name__ == "__main__":
    main()
