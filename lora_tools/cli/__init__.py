"""The ``loratool`` command: one click group, one module per command.

Every exception a command raises becomes one ``Error: ...`` line on stderr and its exit code, here
and only here, through the one boundary :func:`lora_tools.error_text.describe` (library errors exit
1; OS errors name the path, the reason and a next step; device, network, library, memory and
internal errors have their own codes). Ctrl-C, SIGTERM and SIGHUP all take one abort path
(exit 130, 143, 129). ``--debug`` (or ``LORATOOL_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

import click

from lora_tools._version import __version__
from lora_tools.errors import LoraToolsError

#: Library parameter -> the CLI flag that sets it: the one place library hints become flags.
PARAM_FLAGS: dict[str, str] = {
    "overwrite": "--overwrite",
    "force": "--force",
    "allow_unmatched": "--allow-unmatched",
    "output": "-o",
    "lora": "--lora",
    "lightning_dir": "--lightning-dir",
    "preset": "--preset",
    "revision": "--revision",
    "variant": "--variant",
    "steps": "--steps",
    "license": "--license",
    "config": "--config",
    "base": "--base",
    "against": "--against",
    "out": "--out",
    "prompt": "--prompt",
    "saves": "--save",
}


#: Library parameter -> the names an operation's options may give it (``save_lora(format=)`` is convert's ``to``).
PARAM_ALIASES: dict[str, tuple[str, ...]] = {
    "lora": ("loras",),
    "format": ("to",),
    "prompt": ("prompts",),
    "saves": ("save",),
    "output": ("output",),
    "lightning_dir": ("preset_dir",),
}


def spell_param(name: str) -> str:
    """The CLI flag for a library parameter (the parameter name as a flag where none is listed)."""
    return PARAM_FLAGS.get(name, "--" + name.replace("_", "-"))


def command_speller(command: click.Command | None) -> Callable[[str], str]:
    """How a library parameter is spelled in ``command``'s own words: its option's flag (``--to`` for
    convert's format), its argument (``LORA[:W]...``), or ``""`` when the command has no such parameter
    (the hint is left out rather than name a flag the command does not have). Commands that declare no
    operation (``run``, ``inspect``...) spell with :data:`PARAM_FLAGS`."""
    if command is None or command.name not in _operation_names():
        return spell_param
    by_name = {p.name: p for p in command.params if p.name}

    def spell(name: str) -> str:
        for candidate in (name, *PARAM_ALIASES.get(name, ())):
            param = by_name.get(candidate)
            if isinstance(param, click.Option):
                longs = [o for o in param.opts if o.startswith("--")]
                return (longs or param.opts)[0] if name != "output" else param.opts[0]
            if isinstance(param, click.Argument):
                return param.make_metavar(click.Context(command))
        return ""

    return spell


def _operation_names() -> set[str]:
    from lora_tools.ops.registry import OPS

    return set(OPS)


def error_message(error: LoraToolsError) -> str:
    """One line for a library error, its hint spelled with CLI flags."""
    return _one_line(error.render(spell_param))


class LoratoolGroup(click.Group):
    """Turns library errors into clean messages; lists commands in the order they were added."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command with its whole first sentence (click cuts summaries at the terminal's width), wrapped."""
        rows = [(name, cmd.get_short_help_str(limit=1000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> object:
        previous = _catch_signals()
        from lora_tools.io.remote import reset_counts

        reset_counts()  # --debug says how many object-store requests this command sent
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the one error boundary of the CLI
            if ctx.meta.get("loratool.debug"):
                raise
            from lora_tools.error_text import describe

            failure = describe(e, command_speller(self.commands.get(ctx.invoked_subcommand or "")))
            clean = click.ClickException(_one_line(failure.message))
            clean.exit_code = failure.exit_code  # type: ignore[misc]  # click's stubs make it a ClassVar; ours is per failure
            raise clean from None
        except KeyboardInterrupt as e:
            click.echo("Interrupted: nothing was written under the output names.", err=True)
            sys.exit(128 + getattr(e, "signum", signal.SIGINT))
        finally:
            _restore_signals(previous)
            if ctx.meta.get("loratool.debug"):
                _say_object_requests()


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised as Ctrl-C is: one abort path (temp files removed,
    nothing under the output names), exit status ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: Signals that end a run the way Ctrl-C does (SIGINT itself is caught too) (``timeout``, ``docker stop``, systemd, a closed SSH session).
ABORT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _on_signal(signum: int, frame: object) -> None:
    from lora_tools.testing.hooks import ABORTING

    for s in (*ABORT_SIGNALS, signal.SIGINT):  # a second signal must not cut the cleanup short
        signal.signal(s, signal.SIG_IGN)
    ABORTING.set()
    raise Interrupted(signum)


def _catch_signals() -> dict[int, object]:
    """Route SIGTERM/SIGHUP into :class:`Interrupted` (main thread only); returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    from lora_tools.testing.hooks import ABORTING

    ABORTING.clear()
    previous: dict[int, object] = {}
    for s in (*ABORT_SIGNALS, signal.SIGINT):
        previous[s] = signal.signal(s, _on_signal)
    return previous


def _restore_signals(previous: dict[int, object]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)  # type: ignore[arg-type]


def _say_object_requests() -> None:
    """With ``--debug``: how many object-store requests the command sent, by kind (none: nothing said)."""
    from lora_tools.io.remote import request_counts

    counts = request_counts()
    if counts:
        click.echo(f"debug: {sum(counts.values())} object-store requests ("
                   + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) + ")", err=True)


def _one_line(message: str) -> str:
    return " ".join(message.split())


@click.group(cls=LoratoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratool")
@click.option("--debug", is_flag=True, envvar="LORATOOL_DEBUG", help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug logs).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Turn SDXL checkpoints into few-step Lightning models; inspect and fuse LoRAs.

    \b
    Quick start (offline, on synthetic models):
        loratool demo
    Fuse the 4-step Lightning LoRA into a community checkpoint:
        loratool fuse juggernaut.safetensors --lightning 4
    See what a LoRA or checkpoint holds:
        loratool inspect sdxl_lightning_4step_lora.safetensors
    """
    ctx.meta["loratool.debug"] = debug or os.environ.get("LORATOOL_DEBUG") == "1"
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    # Our own logger only: huggingface_hub and diffusers print their warnings through their own
    # handlers, and a root handler would print each of them a second time.
    log = logging.getLogger("lora_tools")
    for old in [h for h in log.handlers if getattr(h, "_loratool", False)]:
        log.removeHandler(old)  # the stream of an earlier invocation (tests run several in one process)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._loratool = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(level)


def main() -> None:
    try:
        cli(prog_name="loratool")
    finally:
        # The interpreter's last garbage collection walks every object torch created at import:
        # half a second at exit, for nothing. Frozen objects are skipped.
        gc.freeze()


# One module per command; their heavy imports (torch, diffusers) stay inside the functions.
from lora_tools.cli.analyze import analyze_command  # noqa: E402
from lora_tools.cli.check import check_command  # noqa: E402
from lora_tools.cli.convert import convert_command  # noqa: E402
from lora_tools.cli.demo import demo_command  # noqa: E402
from lora_tools.cli.extract import extract_command  # noqa: E402
from lora_tools.cli.fuse import fuse_command  # noqa: E402
from lora_tools.cli.inspect import inspect_command  # noqa: E402
from lora_tools.cli.merge import merge_command  # noqa: E402
from lora_tools.cli.presets import presets_command  # noqa: E402
from lora_tools.cli.publish import publish_command  # noqa: E402
from lora_tools.cli.recipe import recipe_group  # noqa: E402
from lora_tools.cli.rescale import rescale_command  # noqa: E402
from lora_tools.cli.resize import resize_command  # noqa: E402
from lora_tools.cli.run import run_command  # noqa: E402
from lora_tools.cli.verify import verify_command  # noqa: E402

for _command in (inspect_command, check_command, fuse_command, presets_command, verify_command, rescale_command,
                 resize_command, merge_command, convert_command, extract_command, analyze_command, run_command,
                 recipe_group, publish_command, demo_command):
    cli.add_command(_command)

from lora_tools.cli._generate import generic_command  # noqa: E402
from lora_tools.ops.registry import OPS  # noqa: E402

for _op in OPS.values():  # an operation without a hand-written command gets the generated one
    if _op.name not in cli.commands:
        cli.add_command(generic_command(_op))
