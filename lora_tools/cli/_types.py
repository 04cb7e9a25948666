"""click parameter types over :mod:`lora_tools.values`: one parser per kind of value.

A bad value is one line naming the flag (or argument) and the text, exit 1, like every bad input:
``Error: --strength: 'nan' is not a finite number.`` (click's own ``BadParameter`` would print the
usage block and exit 2.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from lora_tools import values
from lora_tools.errors import UsageError


def flag_of(param: click.Parameter | None) -> str:
    """How the user wrote ``param``: its long flag (``--strength``), or an argument's metavar."""
    if param is None:
        return "value"
    if isinstance(param, click.Option):
        longs = [o for o in param.opts if o.startswith("--")]
        return (longs or param.opts)[0]
    return (param.metavar or (param.name or "value").upper()).rstrip(".")


class ValueType(click.ParamType):
    """A click type that parses with one function of :mod:`lora_tools.values`."""

    def __init__(self, name: str, parse: Callable[[Any], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return self._parse(value)
        except values.BadValue as e:
            sep = " " if e.message.startswith("must ") else ": "  # "--energy must be in (0, 1], got '2'"
            raise UsageError(f"{flag_of(param)}{sep}{e.message}.") from None


def _keep_parsed(parse: Callable[[Any], Any], kind: type) -> Callable[[Any], Any]:
    return lambda v: v if isinstance(v, kind) else parse(v)


STRENGTH = ValueType("strength", values.strength)
WEIGHT = ValueType("weight", values.weight)
RANK = ValueType("rank", values.rank)
FRACTION = ValueType("fraction", values.fraction)
SV_RATIO = ValueType("ratio", values.sv_ratio)
SEEDS = ValueType("seeds", _keep_parsed(values.seeds, tuple))
SIZE = ValueType("WxH", _keep_parsed(values.size, tuple))
#: A preset's strength: a number (``0,6``, ``abc``, ``1e400`` refused here); NaN and Inf pass on to the preset's
#: own rule, which names the range (``out of range``) or the missing preset.
PRESET_STRENGTH = ValueType("strength", lambda v: float(v) if str(v).strip().lower() in (
    "nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity") else values.strength(v))
#: A file or folder: a local path or ``s3://BUCKET/KEY``.
PATH = ValueType("PATH", values.location)


class LocationType(click.Path):
    """A file or folder option: :func:`lora_tools.values.location` first (an ``s3://`` URL passes as it is), then
    click's own checks of a local path."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = PATH.convert(value, param, ctx)
        if text.startswith("s3://"):
            return text
        return super().convert(text, param, ctx)


#: ``SRC[:S]``: a LoRA (file or hub id) and its strength.
LORA_STRENGTH = ValueType("SRC[:S]", _keep_parsed(
    lambda v: values.path_number(v, values.strength, 1.0, name="strength"), tuple))
#: ``LORA[:W]``: a LoRA and its merge weight.
LORA_WEIGHT = ValueType("LORA[:W]", _keep_parsed(
    lambda v: values.path_number(v, values.weight, 1.0, name="weight"), tuple))

__all__ = ["ValueType", "flag_of", "STRENGTH", "PRESET_STRENGTH", "WEIGHT", "RANK", "FRACTION", "SV_RATIO", "SEEDS", "SIZE", "PATH", "LocationType",
           "LORA_STRENGTH", "LORA_WEIGHT"]
