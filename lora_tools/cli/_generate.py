"""Click commands generated from an operation's options model (the declaration in :mod:`lora_tools.ops.registry`).

Each field of the model becomes one option (or argument) with the field's name, help, default and
type; :func:`lora_tools.ops.registry.cli` settings give flags, metavars and value kinds. Field types
map to click types, and command-line texts to model values, through ONE table, :data:`TYPE_TABLE`.
A command's own run controls (``--overwrite``, ``--json``, ``--dry-run``...) are added beside them:
they steer the run and are not recorded.

A command function takes the built options model first, then its run controls::

    @operation_command(OPS["rescale"], extra=[overwrite_option(), json_option()])
    def rescale_command(options, overwrite, as_json): ...
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import click

from lora_tools.cli import _types
from lora_tools.cli._options import quiet_param
from lora_tools.ops.registry import Operation, cli_spec


@dataclass(frozen=True)
class CliType:
    """How one kind of value is read from the command line.

    Attributes:
        click_type: the click type that reads the text.
        convert: turns click's value into the model's value, while the command builds its options
            (a library error raised here is one ``Error:`` line, as any other).
    """

    click_type: click.ParamType
    convert: Callable[[Any], Any] | None = None


def _lora_ref(parsed: tuple[str, float]) -> Any:
    from lora_tools.ops.verbs._lora import LoraRef

    return LoraRef.model_construct(lora=parsed[0], strength=parsed[1])


def _weighted_ref(parsed: tuple[str, float]) -> Any:
    from lora_tools.ops.verbs._lora import WeightedRef

    return WeightedRef.model_construct(lora=parsed[0], weight=parsed[1])


#: Field type, value kind (:class:`lora_tools.ops.fields.ValueKind`) or ``cli(kind=...)`` -> how the command
#: line reads it: the one place to wire a parser (each parser is one rule of :mod:`lora_tools.values`).
TYPE_TABLE: dict[Any, CliType] = {
    str: CliType(click.STRING),
    int: CliType(click.INT),
    float: CliType(click.FLOAT),
    "path": CliType(_types.LocationType(readable=False, path_type=str)),
    "strength": CliType(_types.STRENGTH),
    "preset_strength": CliType(_types.PRESET_STRENGTH),
    "weight": CliType(_types.WEIGHT),
    "rank": CliType(_types.RANK),
    "fraction": CliType(_types.FRACTION),
    "sv_ratio": CliType(_types.SV_RATIO),
    "seeds": CliType(_types.SEEDS, list),
    "size": CliType(_types.SIZE, lambda wh: f"{wh[0]}x{wh[1]}"),
    "lora_ref": CliType(_types.LORA_STRENGTH, _lora_ref),
    "weighted_ref": CliType(_types.LORA_WEIGHT, _weighted_ref),
}


def _value_kind(info: Any, inner: Any) -> str | None:
    """The field's value kind (``strength``, ``rank``...), from its ``Annotated`` metadata."""
    from lora_tools.ops.fields import ValueKind

    metadata = list(getattr(info, "metadata", ()))
    if typing.get_origin(inner) is typing.Annotated:
        metadata += list(inner.__metadata__)
    return next((m.name for m in metadata if isinstance(m, ValueKind)), None)


@dataclass(frozen=True)
class _Field:
    name: str
    param: click.Parameter
    convert: Callable[[Any], Any] | None
    choices: dict[str, Any] | None
    many: bool
    default: Callable[[], Any] | None


def _unwrap(annotation: Any) -> tuple[Any, bool, bool]:
    """``(inner type, optional, list)`` of an annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
        origin = typing.get_origin(annotation)
    if origin in (list, tuple, Sequence):
        return typing.get_args(annotation)[0], optional, True
    return annotation, optional, False


def _path_type(spec: dict[str, Any]) -> _types.LocationType:
    folder = spec.get("folder")
    return _types.LocationType(exists=bool(spec.get("exists")), readable=False, path_type=str,
                               file_okay=folder is not True, dir_okay=folder is not False)


def _field(op: Operation, name: str, info: Any) -> _Field | None:
    spec = cli_spec(info)
    if not spec.get("command", True):
        return None
    inner, optional, many = _unwrap(info.annotation)
    choices: dict[str, Any] | None = None
    convert = None
    flag = inner is bool and not many
    kind = spec.get("kind") or _value_kind(info, inner)
    if kind:
        entry = TYPE_TABLE[kind]
        click_type, convert = entry.click_type, entry.convert
        if kind == "seeds":
            many = False  # one text, split by the parser
    elif typing.get_origin(inner) is Literal:
        choices = {str(v): v for v in typing.get_args(inner)}
        click_type = click.Choice(list(choices))
    elif name in op.path_keys:
        click_type = _path_type(spec)
    elif flag:
        click_type = click.BOOL
    else:
        entry = TYPE_TABLE[inner]
        click_type, convert = entry.click_type, entry.convert
    required = info.is_required()
    default_factory = None if required else (lambda: info.get_default(call_default_factory=True))
    metavar = spec.get("metavar")
    if spec.get("argument"):
        param: click.Parameter = click.Argument([name], type=click_type, nargs=-1 if many else 1,
                                                required=required, metavar=metavar)
    else:
        flags = list(spec.get("flags") or ["--" + name.replace("_", "-")])
        kwargs: dict[str, Any] = {"help": info.description, "metavar": metavar, "hidden": bool(spec.get("hidden"))}
        if flag:
            param = click.Option([*flags, name], is_flag=True, default=False, **kwargs)
        elif many:
            param = click.Option([*flags, name], type=click_type, multiple=True, **kwargs)
        else:
            default = None if required else info.get_default(call_default_factory=True)
            if kind == "seeds" and isinstance(default, list):
                default = ",".join(str(x) for x in default)
            param = click.Option([*flags, name], type=click_type, required=required,
                                 default=default, show_default=bool(spec.get("show_default")), **kwargs)
    return _Field(name, param, convert, choices, many, default_factory)


def generated_fields(op: Operation) -> list[_Field]:
    """The command-line parameters of ``op``'s options, in the model's order."""
    out = []
    for name, info in op.options_model.model_fields.items():
        f = _field(op, name, info)
        if f is not None:
            out.append(f)
    return out


def build_options(op: Operation, fields: Sequence[_Field], values: dict[str, Any]) -> Any:
    """The options model from click's values (a repeatable option given nothing takes the model's default).

    The values are already typed by click, so the model is built as is (its recipe-level checks are
    the library's to make, with the same messages as the command always gave)."""
    data: dict[str, Any] = {}
    for f in fields:
        value = values.get(f.name)
        if f.many:
            items = list(value or ())
            if not items and f.default is not None:
                data[f.name] = f.default()
                continue
            value = [_one(f, v) for v in items]
        elif value is not None:
            value = _one(f, value)
        elif f.default is not None:
            value = f.default()
        data[f.name] = value
    return op.options_model.model_construct(**data)


def _one(f: _Field, value: Any) -> Any:
    if f.choices is not None:
        return f.choices.get(str(value), value)
    return f.convert(value) if f.convert is not None else value


def operation_command(op: Operation, *, name: str | None = None,
                      extra: Sequence[click.Parameter] = ()) -> Callable[[Callable[..., Any]], click.Command]:
    """A click command whose options are generated from ``op``'s options model, plus the run controls
    ``extra`` and ``-q`` (:func:`lora_tools.cli._options.quiet_param`, the same on every command); the decorated
    function gets the built options model, then the run controls by name."""
    fields = generated_fields(op)
    extra = [*extra, quiet_param()]

    def decorate(func: Callable[..., Any]) -> click.Command:
        extra_names = [p.name for p in extra if p.expose_value]

        def callback(**kwargs: Any) -> Any:
            controls = {n: kwargs.pop(n) for n in extra_names if n is not None}
            return func(build_options(op, fields, kwargs), **controls)

        callback.__doc__ = func.__doc__
        return click.Command(name or op.name, callback=callback, params=[f.param for f in fields] + list(extra),
                             help=inspect.getdoc(func))

    return decorate


def generic_command(op: Operation) -> click.Command:
    """The command of an operation that has no hand-written one: its generated options plus
    ``--overwrite``/``--json``; it runs the operation and prints the files written (or, with ``--json``,
    them and the report)."""
    from lora_tools.cli._options import emit
    from lora_tools.cli._output import safe_text

    def command(options: Any, overwrite: bool, as_json: bool) -> None:
        result = op(options, overwrite=overwrite)
        report = result.report.to_dict() if hasattr(result.report, "to_dict") else result.report
        emit({"files": [str(f) for f in result.files], "report": report}, as_json,
             [f"Wrote {safe_text(f)}" for f in result.files], result.files)

    summary = (op.summary[:1].upper() + op.summary[1:]).rstrip(".") + "." if op.summary else op.name
    command.__doc__ = f"{summary}\n\n\b\nExample:\n    {op.example or 'loratool ' + op.name + ' --help'}"
    return operation_command(op, extra=[overwrite_option(), json_option()])(command)


def overwrite_option(help: str = "Replace OUTPUT if it exists.") -> click.Option:
    return click.Option(["--overwrite"], is_flag=True, help=help)


def json_option(help: str = "Print the report as JSON on stdout.") -> click.Option:
    return click.Option(["--json", "as_json"], is_flag=True, help=help)


def command_flags(command: click.Command) -> dict[str, list[str]]:
    """Parameter name -> its flags (arguments: ``[]``), as ``--help`` lists them."""
    return {str(p.name): (list(p.opts) + list(p.secondary_opts) if isinstance(p, click.Option) else [])
            for p in command.params}


__all__ = ["TYPE_TABLE", "CliType", "operation_command", "generic_command", "build_options", "generated_fields",
           "overwrite_option", "json_option", "command_flags"]
