"""One parser per kind of value a user types: strengths, weights, ranks, ratios, seeds, sizes and
``PATH:NUMBER``. Torch-free and pydantic-free.

The CLI uses them as click parameter types (:mod:`lora_tools.cli._types`), the recipe schema as
pydantic field types (:mod:`lora_tools.ops.fields`), so a flag and its recipe key follow one rule.
Each parser takes the raw value (the text of a flag, or a YAML number, string or list) and returns
the value, or raises :class:`BadValue` whose message quotes the bad text; the caller puts the flag
or the recipe key in front (``--strength: 'nan' is not a finite number``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

from lora_tools.errors import UsageError

T = TypeVar("T")

#: The largest seed: torch's CPU generator takes 64 bits, but numpy and most UIs take 32.
MAX_SEED = 2**32 - 1
#: The largest rank anyone would choose (SDXL's widest layer is 10240).
MAX_RANK = 65536
#: Image sides: diffusers needs multiples of 8; 16384 px is beyond any SDXL use.
MAX_SIDE = 16384

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")
_NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
_DECIMAL_COMMA = re.compile(r"[-+]?\d*,\d+")
#: File suffixes after which ``=NUMBER`` is a mistyped ``:NUMBER``.
_WEIGHT_FILES = re.compile(r"(?P<path>.+\.(?:safetensors|ckpt|pt|pth|bin))=(?P<number>[^/\\]*)", re.IGNORECASE)


class BadValue(UsageError):
    """A typed value that is not valid for its flag or recipe key (exit 1, one line)."""


def _bad(expected: str, value: Any, note: str = "") -> BadValue:
    """``expected E, got 'TEXT'`` (the recipe schema's wording for every wrong value)."""
    text = _text(value)
    got = f"'{text}'" if text else "nothing"
    return BadValue(f"expected {expected}, got {got}" + (f" ({note})" if note else ""))


def _text(value: Any) -> str:
    return str(value).strip() if not isinstance(value, str) else value.strip()


def number(value: Any) -> float:
    """A finite number from ``value`` (an int, a float or its text).

    Raises:
        [`BadValue`]: empty, not a number (``0,6``, ``abc``), NaN, Inf or beyond a float (``1e400``).

    Example:
        ```py
        >>> number("0.6"), number(2)
        (0.6, 2.0)
        ```
    """
    if isinstance(value, bool):
        raise _bad("a number", value)
    if isinstance(value, (int, float)):
        try:
            result = float(value)
        except OverflowError:
            raise _bad("a finite number", value) from None
    else:
        text = _text(value)
        if text.lower() in _NON_FINITE:
            raise _bad("a finite number", text)
        if not _NUMBER.fullmatch(text):
            if _DECIMAL_COMMA.fullmatch(text):
                raise _bad("a number", text, f"write the decimal point as '.': '{text.replace(',', '.')}'")
            raise _bad("a number", text)
        result = float(text)
    if not math.isfinite(result):
        raise _bad("a finite number", value)
    return result


def strength(value: Any) -> float:
    """A LoRA strength: any finite number (negative subtracts the LoRA)."""
    return number(value)


def weight(value: Any) -> float:
    """A merge weight: any finite number."""
    return number(value)


def integer(value: Any, low: int, high: int) -> int:
    """An integer in ``[low, high]`` (``4`` or ``"4"``; ``4.0`` and ``"4.5"`` are refused)."""
    expected = f"an integer from {low} to {high}"
    if isinstance(value, bool):
        raise _bad(expected, value)
    if isinstance(value, int):
        result = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise _bad(expected, value)
        result = int(value)
    else:
        text = _text(value)
        if not _INTEGER.fullmatch(text):
            raise _bad(expected, text)
        result = int(text)
    if not low <= result <= high:
        raise _bad(expected, value)
    return result


def rank(value: Any) -> int:
    """A rank: an integer from 1 to :data:`MAX_RANK`."""
    return integer(value, 1, MAX_RANK)


def fraction(value: Any) -> float:
    """A fraction of energy or norm kept: a number in ``(0, 1]``."""
    result = number(value)
    if not 0.0 < result <= 1.0:
        raise BadValue(f"must be in (0, 1], got '{_text(value)}'")
    return result


def sv_ratio(value: Any) -> float:
    """kohya's ``sv_ratio``: a finite number ``>= 1``."""
    result = number(value)
    if result < 1.0:
        raise BadValue(f"must be >= 1, got '{_text(value)}'")
    return result


def seed(value: Any) -> int:
    """A seed: an integer from 0 to :data:`MAX_SEED`."""
    return integer(value, 0, MAX_SEED)


def seeds(value: Any) -> tuple[int, ...]:
    """Seeds: ``"0,1,2"`` or a list; at least one.

    Raises:
        [`BadValue`]: empty, or a seed that is not an integer from 0 to 2**32-1.
    """
    expected = f"seeds: integers from 0 to {MAX_SEED} separated by commas (at least one)"
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        text = _text(value)
        items = text.split(",") if text else []
        if any(not s.strip() for s in items):
            raise _bad(expected, text)
    if not items:
        raise _bad(expected, "")
    out = []
    for item in items:
        try:
            out.append(seed(item))
        except BadValue:
            raise _bad(f"seeds from 0 to {MAX_SEED}", item) from None
    return tuple(out)


def size(value: Any) -> tuple[int, int]:
    """An image size ``WIDTHxHEIGHT``: each side a multiple of 8 from 8 to :data:`MAX_SIDE`."""
    text = _text(value)
    expected = f"WIDTHxHEIGHT, each side a multiple of 8 from 8 to {MAX_SIDE} (e.g. 1024x1024)"
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(re.fullmatch(r"\d+", p.strip()) for p in parts):
        raise _bad(expected, text)
    w, h = (int(p) for p in parts)
    if any(not 8 <= side <= MAX_SIDE or side % 8 for side in (w, h)):
        raise _bad(expected, text)
    return w, h


#: ``scheme://`` at the start of a location: a URL, not a local path.
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


def location(value: Any) -> str:
    """A file or folder: a local path, or an object URL ``s3://BUCKET/KEY`` (the only scheme read).

    Raises:
        [`BadValue`]: empty, another scheme (``gs://``, ``https://``), or an ``s3://`` URL with no bucket or key.

    Example:
        ```py
        >>> location("s3://models/base.safetensors"), location("base.safetensors")
        ('s3://models/base.safetensors', 'base.safetensors')
        ```
    """
    text = _text(value)
    if not text:
        raise _bad("a path or s3://BUCKET/KEY", text)
    m = _URL.match(text)
    if m is None:
        return text
    if m.group("scheme") != "s3":
        raise BadValue(f"'{text}': {m.group('scheme')}:// is not read; use a local path or s3://BUCKET/KEY "
                       "(any S3-compatible store through AWS_ENDPOINT_URL)")
    bucket, _, key = text[5:].partition("/")
    if not bucket or not key.strip("/"):
        raise BadValue(f"'{text}' names no object: write s3://BUCKET/KEY")
    return text


def path_number(value: str, parse: Callable[[Any], T], default: T, *, name: str = "number") -> tuple[str, T]:
    """Split ``PATH[:NUMBER]`` (a LoRA and its strength or weight).

    The text is a path as a whole when it names an existing file. Otherwise the part after the last
    ``:`` is the number, unless it holds a ``/`` or ``\\`` (a Windows drive such as
    ``C:\\loras\\x.safetensors``) or looks like a file name (``weird:name.safetensors``). A hub id
    (``owner/repo/file.safetensors``) has no ``:``. ``style.safetensors=0.6`` is a mistyped ``:``.

    Args:
        value: the text.
        parse: the number's parser (:func:`strength`, :func:`weight`).
        default: the number when none is given.
        name: what the number is, for messages (``strength``, ``weight``).

    Raises:
        [`BadValue`]: an empty path, a ``:`` with no number, a bad number (``:0,6``, ``:abc``, ``:nan``),
            or ``=`` in place of ``:``.

    Example:
        ```py
        >>> path_number("x.safetensors:0.6", strength, 1.0)
        ('x.safetensors', 0.6)
        >>> path_number("C:\\\\loras\\\\x.safetensors", strength, 1.0)
        ('C:\\\\loras\\\\x.safetensors', 1.0)
        ```
    """
    text = _text(value)
    if not text:
        raise _bad(f"PATH or PATH:{name.upper()}", text)
    if os.path.exists(text):
        return text, default
    if ":" in text:
        head, tail = text.rsplit(":", 1)
        tail = tail.strip()
        if "/" not in tail and "\\" not in tail and not re.search(r"\.[A-Za-z]\w*$", tail):
            if not tail:
                raise BadValue(f"'{text}' ends with ':' but gives no {name}: write PATH or PATH:{name.upper()}")
            try:
                result = parse(tail)
            except BadValue as e:
                raise BadValue(f"'{text}': the {name} after ':': {e.message}") from None
            head = head.strip()
            if not head:
                raise BadValue(f"'{text}' gives a {name} but no file: write PATH:{name.upper()}")
            return head, result
        return text, default
    m = _WEIGHT_FILES.fullmatch(text)
    if m:
        raise BadValue(f"'{text}': write the {name} after ':', not '=' ('{m.group('path')}:{m.group('number')}')")
    return text, default


__all__ = [
    "MAX_RANK",
    "MAX_SEED",
    "MAX_SIDE",
    "BadValue",
    "fraction",
    "integer",
    "location",
    "number",
    "path_number",
    "rank",
    "seed",
    "seeds",
    "size",
    "strength",
    "sv_ratio",
    "weight",
]
