"""What every command shares: error-to-exit-code mapping, quiet/progress detection, printing."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import click

from ..errors import HardenError


class HardenGroup(click.Group):
    """A click group that turns harden's exceptions into one clear line and an exit code.

    HardenError subclasses carry their exit code (1 gate, 2 bad input); anything else is an
    internal error (exit 3) and is still reported in one line unless HARDEN_DEBUG is set.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except HardenError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            import os

            if os.environ.get("HARDEN_DEBUG"):
                raise
            click.echo(f"internal error: {type(exc).__name__}: {exc} (set HARDEN_DEBUG=1 for a traceback)", err=True)
            ctx.exit(3)


def stage_printer(quiet: bool, command: str, lines: bool = False) -> Callable[[str], None] | None:
    """Progress on long work: "  ... stage" lines on a terminal; with `lines` (--progress, for a
    CI log), one line per stage with the time since the start even without a terminal, so a log
    shows where the minutes went. Nothing with --quiet, and without a terminal nothing unless
    asked: a bad input's output stays its one `error:` line."""
    if quiet:
        return None
    if lines:
        started = time.perf_counter()
        return lambda stage: click.echo(f"harden {command}: [{time.perf_counter() - started:7.1f}s] {stage}", err=True)
    if sys.stderr.isatty():
        return lambda stage: click.echo(f"  ... {stage}", err=True)
    return None


def progress_option(func: Callable) -> Callable:
    """The shared --progress flag (also HARDEN_PROGRESS=1)."""
    return click.option("--progress", "progress_lines", is_flag=True, envvar="HARDEN_PROGRESS",
                        help="One line per step with the time since the start, also without a terminal (a CI log).")(func)


def show_progress(quiet: bool) -> bool:
    """Progress bars only on an interactive terminal and never with --quiet (CI logs stay clean)."""
    return not quiet and sys.stderr.isatty()


def quiet_option(func: Callable) -> Callable:
    """The shared --quiet flag."""
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars or tables; errors only.")(func)


def echo(msg: str = "", quiet: bool = False) -> None:
    """Print a line to stdout unless quiet."""
    if not quiet:
        click.echo(msg)
