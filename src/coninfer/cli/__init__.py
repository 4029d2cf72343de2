"""`coninfer` command line: a click group whose subcommands are imported only when used.

Lazy imports keep `coninfer --help` fast (no torch import) and let each subcommand live in its own module.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys

import click

from coninfer.errors import ConInferError

_SUBCOMMANDS = {
    "segment": ("coninfer.cli.segment", "segment", "Segment a GeoTIFF/PNG/JPEG scene into a class map."),
    "refine": ("coninfer.cli.refine", "refine", "Refine any model's prior with the ConInfer solver (.npz in/out)."),
    "eval": ("coninfer.cli.eval", "eval_command", "Evaluate on the 17 benchmarks of the paper."),
    "models": ("coninfer.cli.models", "models", "List, download and convert model presets."),
    "data": ("coninfer.cli.data", "data", "Prepare benchmark datasets."),
    "cache": ("coninfer.cli.cache", "cache", "List and clear work folders (kept embeddings, unfinished runs)."),
}


def _exit_on_sigterm(signum, frame) -> None:
    click.echo("Terminated.", err=True)
    raise SystemExit(128 + signal.SIGTERM)


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _SUBCOMMANDS:
            return None
        module_name, attribute, _ = _SUBCOMMANDS[name]
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Usage errors as one line naming the problem and where help is (click prints three by default)."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        # SIGTERM (timeout, docker stop, batch schedulers) unwinds like Ctrl-C, so every `finally` removes its
        # temporary files; the exit status is the shell's 128 + SIGTERM
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as error:
            where = error.ctx.command_path if error.ctx is not None else "coninfer"
            click.echo(f"Error: {error.format_message()} (see `{where} --help`)", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            click.echo(f"Error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except (click.Abort, KeyboardInterrupt):  # Ctrl-C: the shell's convention, 128 + SIGINT
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConInferError as error:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {error}", err=True)
            sys.exit(error.exit_code)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="coninfer")
@click.pass_context
def main(ctx: click.Context, verbose: int, debug: bool) -> None:
    """coninfer: training-free open-vocabulary segmentation of aerial imagery (ConInfer)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
