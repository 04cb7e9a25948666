"""``loratool inspect``: a thin command over :func:`lora_tools.ops.inspect.inspect_path`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lora_tools.cli._options import quiet_flag, say
from lora_tools.cli._output import safe_text
from lora_tools.cli._types import LocationType
from lora_tools.errors import ShapeMismatchError, UsageError
from lora_tools.layouts.blocks import block_of
from lora_tools.layouts.components import component_label
from lora_tools.lora.validate import FactorProblem, check_factor_shapes, raise_factor_problems
from lora_tools.ops.inspect import Acceleration, CheckpointSummary, InspectReport, LoraSummary, inspect_path
from lora_tools.presets import SamplerSettings
from lora_tools.units import format_bytes


@click.command("inspect")
@click.argument("path", type=LocationType(readable=False, path_type=str))  # inspect_path says what is wrong
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (stable fields, see the docs).")
@click.option("--keys", "show_keys", is_flag=True, help="Also list every tensor with its dtype and shape.")
@click.option("--targets", "show_targets", is_flag=True,
              help="Also list every LoRA module with its naming, factor spelling and the tensors it changes.")
@click.option("--hash/--no-hash", "with_hash", default=None,
              help="Compute sha256 and AutoV2 (default: only for files under 2 GiB).")
@quiet_flag
def inspect_command(path: str, as_json: bool, show_keys: bool, show_targets: bool, with_hash: bool | None) -> None:
    """Show what a LoRA, checkpoint or diffusers folder holds, from its headers alone.

    \b
    Example:
        loratool inspect sdxl_lightning_4step_lora.safetensors
        loratool inspect juggernaut.safetensors --no-hash
        loratool inspect my_lora.safetensors --targets
        loratool inspect my_lora.safetensors --json | jq .lora.ranks
    """
    report = inspect_path(path, with_hash=with_hash)
    problems, misfit = _factor_problems(path, report)
    if as_json:
        d = report.to_dict(include_keys=show_keys)
        if d.get("lora") is not None:
            d["lora"]["factor_problems"] = [{"component": p.component, "module": p.module, "reason": p.reason}
                                            for p in problems]
        click.echo(json.dumps(d, indent=2))
    else:
        say(*render(report, show_keys=show_keys, show_targets=show_targets))
        if problems:
            say(f"  modules whose factors do not fit each other ({len(problems)}):",
                *_aligned([(f"{p.component}:{safe_text(p.module, 120)}", safe_text(p.reason, 400))
                           for p in problems], indent=4))
    if misfit is not None:
        raise misfit
    if report.lora is not None and report.lora.mismatched:
        bad = report.lora.mismatched
        names = ", ".join(safe_text(m.module, 80) for m in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise click.ClickException(
            f"'{safe_text(path)}': {len(bad)} module(s) do not fit the weights they name: {names}.")


def _factor_problems(path: str | Path, report: InspectReport) -> tuple[list[FactorProblem], ShapeMismatchError | None]:
    """The LoRA's modules whose factors do not fit each other (up's rank is not down's...), and the
    one-line error that names the first (the fuse refuses the same file with the same line)."""
    if report.lora is None:
        return [], None
    from lora_tools.lora.load import load_lora

    with load_lora(path) as adapter:
        problems = check_factor_shapes(adapter)
        if not problems:
            return [], None
        try:
            raise_factor_problems(adapter)
        except ShapeMismatchError as e:
            return problems, e
    raise AssertionError("unreachable: check_factor_shapes found problems raise_factor_problems did not")


def render(report: InspectReport, *, show_keys: bool = False, show_targets: bool = False) -> list[str]:
    """The human form of a report: aligned ``label  value`` rows, then sections."""
    f = report.file
    rows: list[tuple[str, str]] = []
    if report.lora is not None:
        rows.append(("kind", f"LoRA ({report.lora.format})"))
    else:
        assert report.checkpoint is not None
        rows.append(("kind", f"checkpoint ({_layout_text(report.checkpoint)})"))
    rows.append(("size", f"{format_bytes(f.size_bytes)}, {report.tensors:,} tensors, {report.parameters:,} parameters"))
    rows.append(("dtypes", _counts(report.dtypes)))
    if f.sha256:
        rows.append(("sha256", f"{f.sha256}  (AutoV2 {f.autov2})"))
    elif f.container != "diffusers-folder":
        rows.append(("sha256", "not computed (pass --hash)"))
    lines = [safe_text(f.path, 1000)]
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    if report.lora is not None:
        rows += _lora_rows(report.lora)
        blocks = [(f"{_block_name(c, b)}  {c} {b}", str(n)) for c, bs in report.lora.modules_per_block.items()
                  for b, n in bs.items()]
        sections.append(("modules per block", blocks))
        if show_targets:
            sections.append((f"module targets ({len(report.lora.targets)})", _target_rows(report.lora)))
        if report.lora.mismatched:
            sections.append(("modules that do not fit", [(safe_text(m.module), safe_text(m.message, 400))
                                                         for m in report.lora.mismatched]))
    else:
        assert report.checkpoint is not None
        rows += _checkpoint_rows(report.checkpoint)
        comps = [(component_label(c), f"{s.parameters:>15,} parameters  {s.tensors:>5} tensors  {_counts(s.dtypes)}")
                 for c, s in report.checkpoint.components.items()]
        sections.append(("components", comps))
    meta = report.metadata
    meta_rows = [(safe_text(k, 80), safe_text(v)) for k, v in
                 list(meta.kohya.items()) + list(meta.modelspec.items()) + list(meta.other.items())]
    if meta.kohya_other_keys:
        meta_rows.append(("other ss_* keys", safe_text(", ".join(meta.kohya_other_keys), 1000)))
    sections.append(("metadata", meta_rows))
    lines += _aligned(rows, indent=2)
    for title, section_rows in sections:
        lines.append(f"  {title}:" + ("" if section_rows else " none"))
        lines += _aligned(section_rows, indent=4)
    if show_keys:
        lines.append(f"  tensors ({len(report.keys)}):")
        names = [safe_text(k.key, 1000) for k in report.keys]
        width = max((len(n) for n in names), default=0)
        for name, k in zip(names, report.keys, strict=True):
            lines.append(f"    {name:<{width}}  {safe_text(k.dtype):<5} {list(k.shape)}")
    return lines


def _lora_rows(lora: LoraSummary) -> list[tuple[str, str]]:
    per_comp = ", ".join(f"{c} {n}" for c, n in lora.modules_per_component.items())
    rows = [
        ("format", lora.format_description),
        ("naming", lora.naming),
        ("factor spelling", _counts(lora.spellings)),
        ("layout", f"{'SDXL' if lora.layout == 'sdxl' else 'tiny SDXL test model'}; UNet names: {lora.unet_naming}"),
        ("modules", f"{lora.modules} ({per_comp})"),
        ("algorithms", _counts(lora.algorithms)),
        ("ranks", _counts({str(r): n for r, n in lora.ranks.items()})),
        ("alphas", _counts(lora.alphas) + ("  (none: alpha = rank, scale 1)" if "none" in lora.alphas else "")),
        ("scale alpha/rank", _counts(lora.scales)),
    ]
    u = lora.unmatched
    if u.count:
        text = f"{u.count} (first: {', '.join(safe_text(n, 120) for n in u.first)})"
        rows.append(("unmatched", text + (f". {u.hint}" if u.hint else "")))
    else:
        rows.append(("unmatched", "none"))
    rows += _acceleration_rows(lora.acceleration)
    rows.append(("applies to", lora.applies_to))
    rows += [(f"{name} sees", text) for name, text in (("A1111/Forge", lora.loaders.get("a1111_forge")),) if text]
    for w in lora.warnings:
        rows.append(("warning", safe_text(w, 400)))
    return rows


def _target_rows(lora: LoraSummary) -> list[tuple[str, str]]:
    """``component:module  naming/spelling algorithm -> target [+ bias]`` for every module."""
    rows = []
    for t in lora.targets:
        changed = [k for k in (t.target, t.bias) if k is not None]
        where = " + ".join(safe_text(k, 200) for k in changed) if changed else "no target"
        if t.rows:
            where += f" (rows {t.rows})"
        if t.transposed:
            where += " (stored transposed)"
        if t.reason:
            where += f": {safe_text(t.reason, 400)}"
        rows.append((safe_text(t.module, 200), f"{t.naming}/{t.spelling} {t.algorithm} -> {where}"))
    return rows


def _checkpoint_rows(c: CheckpointSummary) -> list[tuple[str, str]]:
    support = "supported" if c.supported else f"not supported: {c.why_unsupported}"
    rows = []
    if c.pipeline:
        rows.append(("pipeline", safe_text(c.pipeline)))
    rows += [
        ("architecture", f"{c.architecture} ({support})"),
        ("prediction", safe_text(c.prediction) + ("" if c.prediction_source == "default"
                                                   else f" (from {c.prediction_source.replace('_', ' ')})")),
        ("markers", safe_text(", ".join(c.markers)) or "none"),
    ]
    if c.fp8:
        rows.append(("fp8", safe_text(c.fp8)))
    if c.extra_keys:
        shown = ", ".join(safe_text(k, 80) for k in c.extra_keys[:6]) + (", ..." if len(c.extra_keys) > 6 else "")
        rows.append(("extra keys", f"{len(c.extra_keys)}: {shown}"))
    rows += _acceleration_rows(c.acceleration)
    p = c.provenance
    if p is not None:
        fused = ", ".join(safe_text(f"{s.get('name')} x{s.get('strength')}", 120)
                          + (f" ({safe_text(s['preset'], 60)})" if s.get("preset") else "")
                          for s in p.fused) or "nothing recorded"
        rows.append(("fused by loratool", f"{safe_text(p.operation or 'unknown operation', 60)}: {fused}"))
        if p.lightning_steps:
            rows.append(("lightning steps", str(p.lightning_steps)))
        if p.sampler:
            rows.append(("sampler", _sampler_text(p.sampler)))
    for w in c.warnings:
        rows.append(("warning", safe_text(w, 400)))
    return rows


def _acceleration_rows(a: Acceleration | None) -> list[tuple[str, str]]:
    if a is None:
        return [("acceleration", "none detected")]
    how = {"sha256": "sha256", "filename": "file name", "metadata": "metadata", "keys": "key signature"}[a.identified_by]
    text = f"{a.label} (by {how}" + (", keys match" if a.key_signature and a.identified_by != "keys" else "") + ")"
    if a.steps is None:
        text += "; step count unknown"
    rows = [("acceleration", text)]
    if a.sampler_summary:
        rows.append(("sample with", a.sampler_summary))
    rows.append(("", a.note))
    return rows


def _sampler_text(sampler: dict[str, object]) -> str:
    try:
        return safe_text(SamplerSettings.from_dict(sampler).describe(), 400)
    except UsageError:
        return safe_text(json.dumps(sampler), 400)


def _layout_text(c: CheckpointSummary) -> str:
    return {"sgm": "single file, SGM layout", "diffusers-unet": "diffusers UNet file",
            "diffusers-folder": "diffusers folder"}.get(c.layout, c.layout)


def _aligned(rows: list[tuple[str, str]], *, indent: int) -> list[str]:
    if not rows:
        return []
    width = max(len(label) for label, _ in rows)
    return [f"{' ' * indent}{label:<{width}}  {value}".rstrip() for label, value in rows]


def _counts(counts: dict[str, int]) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{safe_text(k, 40)} x{n}" for k, n in counts.items())


def _block_name(component: str, block: str) -> str:
    """The block-scheme name (``IN04``) of an SGM block prefix (``input_blocks.4``)."""
    try:
        return block_of(component, block)  # type: ignore[arg-type]
    except LookupError:
        return "?"
