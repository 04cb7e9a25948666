"""Recipe field types over :mod:`lora_tools.values`: the same rule for a recipe key as for its flag.

Each type is ``Annotated[T, BeforeValidator(parser), ValueKind(name)]``: pydantic hands the raw YAML
value (a number, a string such as ``0,6`` or ``1e400``, or a list) to the one parser, and a refusal
becomes the recipe error ``file:line:column: jobs[0].rescale.strength: 'nan' is not a finite number``.
``ValueKind`` names the kind, so code that derives click options from an options model can pick the
matching type of :mod:`lora_tools.cli._types`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator

from lora_tools import values


@dataclass(frozen=True)
class ValueKind:
    """Marks a field's kind of value (``strength``, ``rank``, ``seeds``...)."""

    name: str


def _checked(parse: Callable[[Any], Any]) -> BeforeValidator:
    return BeforeValidator(lambda v: v if v is None else parse(v))


Strength = Annotated[float, _checked(values.strength), ValueKind("strength")]
Weight = Annotated[float, _checked(values.weight), ValueKind("weight")]
Rank = Annotated[int, _checked(values.rank), ValueKind("rank")]
Fraction = Annotated[float, _checked(values.fraction), ValueKind("fraction")]
SvRatio = Annotated[float, _checked(values.sv_ratio), ValueKind("sv_ratio")]
Seeds = Annotated[list[int], _checked(lambda v: list(values.seeds(v))), ValueKind("seeds")]
Size = Annotated[str, _checked(lambda v: "{}x{}".format(*values.size(v))), ValueKind("size")]
#: A file or folder: a local path or ``s3://BUCKET/KEY``.
Location = Annotated[str, _checked(values.location), ValueKind("path")]

__all__ = ["ValueKind", "Strength", "Weight", "Rank", "Fraction", "SvRatio", "Seeds", "Size", "Location"]
