"""Reading a LoRA file: which format its keys are in (:func:`detect_format`), and the file as a
:class:`~lora_tools.lora.adapter.LoraAdapter` (:func:`load_lora`, headers and alphas only)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lora_tools.errors import InvalidFileError, UnknownFormatError, UnsupportedModelError
from lora_tools.io.sources import TensorMeta, TensorSource, open_source
from lora_tools.layouts.table import Component
from lora_tools.lora import peft_meta
from lora_tools.lora.adapter import LoraAdapter, LoraModule, kind_of, rank_of
from lora_tools.lora.family import flux_message, looks_like_flux
from lora_tools.lora.formats import FORMATS, format_family, format_of_keys
from lora_tools.lora.spelling import ParsedKey, parse_key


def detect_format(keys: list[str], *, source: str = "file") -> str:
    """Name of the LoRA format of a file whose every key parses.

    Raises:
        UnknownFormatError: some key fits no naming family and spelling (names the first), or
            the keys mix naming families.
        UnsupportedModelError: the keys name another model family's blocks (Flux).
    """
    if not keys:
        raise UnknownFormatError(f"'{source}' holds no tensors.")
    if looks_like_flux(keys):
        raise UnsupportedModelError(flux_message(source, keys))
    parsed = [parse_key(k) for k in keys]
    left = [k for k, p in zip(keys, parsed, strict=True) if p is None]
    if not left:
        fmt = format_of_keys([p for p in parsed if p is not None])
        if fmt != "mixed":
            return fmt
        fams = sorted({format_family(p) for p in parsed if p is not None})
        raise UnknownFormatError(f"'{source}' mixes LoRA naming families ({', '.join(fams)}); "
                                 "split it into one file per family.")
    ok = [p for p in parsed if p is not None]
    if not ok:
        hint = _checkpoint_hint(keys)
        raise UnknownFormatError(f"'{source}' is not a LoRA in any known format (first key: {keys[0]}){hint}.")
    best = format_of_keys(ok)
    if best == "mixed":
        best = format_family(ok[0])
    raise UnknownFormatError(
        f"'{source}' looks like a {best} LoRA but {len(left)} keys do not fit that format (first: {left[0]})."
    )


def _checkpoint_hint(keys: list[str]) -> str:
    if any(k.startswith(("model.diffusion_model.", "conditioner.", "first_stage_model.")) for k in keys):
        return ": it looks like a full checkpoint, not a LoRA"
    if any(k.startswith(("down_blocks.", "mid_block.", "conv_in.")) for k in keys):
        return ": it looks like a diffusers UNet, not a LoRA"
    return ""


def load_lora(path: str | Path, *, source: TensorSource | None = None) -> LoraAdapter:
    """Read a LoRA file (headers and alphas only) into a :class:`LoraAdapter`.

    Args:
        path: a ``.safetensors`` LoRA (or a legacy pickle, read with ``weights_only=True``).
        source: an already open source of ``path`` (inspect shares its own).

    Raises:
        UnknownFormatError: the keys fit no format.
        InvalidFileError: a module's keys do not make a LoRA module.

    Example:
        >>> with load_lora("sdxl_lightning_4step_lora.safetensors") as lora:
        ...     print(lora.format, len(lora.modules))
        kohya-diffusers 788
    """
    src = source or open_source(path)
    try:
        keys = src.keys()
        fmt = detect_format(keys, source=str(path))
        groups: dict[tuple[Component, str], dict[str, tuple[str, ParsedKey]]] = {}
        for k in keys:
            p = parse_key(k)
            assert p is not None
            roles = groups.setdefault((p.component, p.module), {})
            if p.role in roles:
                raise InvalidFileError(
                    f"'{path}' has two '{p.role}' tensors for module '{p.module}' ({roles[p.role][0]}, {k}).")
            roles[p.role] = (k, p)
        peft_data = peft_meta.parse(src.metadata) if FORMATS.get(fmt, FORMATS["kohya"]).alphas != "tensor" else {}
        modules = [_build_module(src, c, m, roles, peft_data, str(path)) for (c, m), roles in groups.items()]
        if fmt in ("kohya", "kohya-diffusers"):  # text-encoder names are the same in both families
            modules = [replace(m, naming=fmt) if m.component != "unet" else m for m in modules]
    except BaseException:
        src.close()
        raise
    return LoraAdapter(Path(path), fmt, modules, dict(src.metadata), src)  # type: ignore[arg-type]


_SHARED_ROLES = ("alpha", "diff_b", "dora_scale")


def _build_module(src: TensorSource, component: Component, name: str, roles: dict[str, tuple[str, ParsedKey]],
                  peft_data: dict[str, object], path: str) -> LoraModule:
    kind = kind_of(roles, name, path)
    keys = {r: k for r, (k, _) in roles.items() if r != "alpha"}
    factor_parts = [p for r, (_, p) in roles.items() if r != "alpha"] or [p for _, p in roles.values()]
    first = factor_parts[0]
    # ``.diff_b`` and ``.dora_scale`` are spelled alike beside every factor spelling (ComfyUI reads them
    # by those names whatever the weight's keys): they do not vote on the module's spelling.
    voters = [p for r, (_, p) in roles.items() if r not in _SHARED_ROLES] or factor_parts
    spellings = {p.spelling for p in voters}
    spelling = spellings.pop() if len(spellings) == 1 else "mixed"
    rank = rank_of(src, kind, keys)  # type: ignore[arg-type]
    alpha: float | None = None
    alpha_meta: TensorMeta | None = None
    if "alpha" in roles:
        alpha_key = roles["alpha"][0]
        alpha = src.scalar(alpha_key)
        alpha_meta = src.meta(alpha_key)
    elif peft_data:
        alpha = peft_meta.alpha_for(peft_data, component, name, rank)
    return LoraModule(component, name, kind, keys, alpha, rank, src, naming=first.naming,  # type: ignore[arg-type]
                      spelling=spelling, envelope=first.envelope, alpha_meta=alpha_meta)


__all__ = ["detect_format", "load_lora"]
