"""How commands print: JSON (``--json``), human lines, or under ``-q`` only what a script uses.

The ``-q/--quiet`` rule, the same for every command (README "Quiet output"): no progress and no
summary; stdout carries only what was written, one path (or URL) per line, and for ``recipe show``
the recipe itself. A command that writes nothing prints nothing: its exit status is the answer.
Errors and warnings still go to stderr, and ``--json`` is printed as without ``-q``.

Every command gets the flag from here: generated commands through :func:`quiet_param` (added by
:func:`lora_tools.cli._generate.operation_command`), hand-written ones through :func:`quiet_flag`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

#: The one help text of ``-q`` (every command's, so that its meaning is one).
QUIET_HELP = "Print only what was written, one path per line (no progress, no summary); errors still print."

_QUIET = "loratool.quiet"
_JSON = "loratool.json"


def _remember(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_JSON if param.name == "as_json" else _QUIET] = True
    return value


def json_flag(func: F) -> F:
    """Decorator: ``--json`` on a hand-written command that prints as it goes (:func:`say` is silent under it);
    the function gets ``as_json`` and prints the JSON itself."""
    return click.option("--json", "as_json", is_flag=True, callback=_remember,
                        help="Print what was done as JSON on stdout (instead of the steps).")(func)


def quiet_param() -> click.Option:
    """The ``-q/--quiet`` option (not passed to the command function: read it with :func:`is_quiet`)."""
    return click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_remember, help=QUIET_HELP)


def quiet_flag(func: F) -> F:
    """Decorator: ``-q/--quiet`` on a hand-written click command."""
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_remember,
                        help=QUIET_HELP)(func)


def is_quiet() -> bool:
    """Whether the running command was given ``-q``."""
    return _meta(_QUIET)


def _meta(key: str) -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(key))


def say(*lines: str, err: bool = False) -> None:
    """Human lines (a summary, a listing): printed unless ``-q`` (or :func:`json_flag`'s ``--json``)."""
    if not is_quiet() and not _meta(_JSON):
        for line in lines:
            click.echo(line, err=err)


def written(paths: Iterable[object]) -> None:
    """Under ``-q``, what was written, one per line (without ``-q`` the summary already names it)."""
    if is_quiet() and not _meta(_JSON):
        for p in paths:
            click.echo(str(p))


def emit(report: dict[str, Any], as_json: bool, lines: list[str], paths: Iterable[object] = ()) -> None:
    """Print the report: JSON (``--json``), the human lines (file-derived text already made safe), or under
    ``-q`` the ``paths`` written."""
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    elif is_quiet():
        written(paths)
    else:
        say(*lines)


__all__ = ["QUIET_HELP", "emit", "is_quiet", "json_flag", "quiet_flag", "quiet_param", "say", "written"]
