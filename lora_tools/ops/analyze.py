"""analyze: which LoRAs a checkpoint has baked in, at what strength, and where LoRAs interfere."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_tools.engine.differences import paired_targets, stream_differences
from lora_tools.errors import Hint, UsageError
from lora_tools.lora.lowrank import StrengthFit, column_overlap, cosine_similarity, inner_product
from lora_tools.lora.pairs import is_low_rank, pair_of
from lora_tools.lora.validate import validate_lora

if TYPE_CHECKING:
    from lora_tools.io.model import ModelSource
    from lora_tools.layouts.targets import ModuleTarget
    from lora_tools.lora.adapter import LoraAdapter, LoraModule


@dataclass
class LoraFit:
    """How much of one candidate LoRA a checkpoint holds.

    Attributes:
        label: the LoRA's name.
        strength: the least-squares strength over every module it adapts (fitted jointly with the
            other candidates).
        explained: the fraction of the difference's energy, on the modules it adapts, that this
            LoRA alone at its fitted strength explains.
        per_block: the strength fitted per block (``input_blocks.4`` ...).
        modules: how many of its modules the checkpoint has.
    """

    label: str
    strength: float
    explained: float
    per_block: dict[str, float] = field(default_factory=dict)
    modules: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"label": self.label, "strength": self.strength, "explained": self.explained,
                "per_block": self.per_block, "modules": self.modules}


@dataclass
class Interference:
    """Two LoRAs on one module: the cosine similarity and column-space overlap of their deltas."""

    module: str
    a: str
    b: str
    cosine: float
    overlap: float

    def to_dict(self) -> dict[str, object]:
        return {"module": self.module, "a": self.a, "b": self.b, "cosine": self.cosine, "overlap": self.overlap}


@dataclass
class AnalyzeReport:
    """What :func:`analyze_model` found.

    Attributes:
        fits: one entry per candidate LoRA.
        explained: the fraction of the difference's energy (on the modules any candidate adapts)
            that all candidates together explain.
        interference: per-module interference of every pair of candidates (modules both adapt).
        presets_tried: with :func:`analyze_presets`, the presets whose LoRA files were found and fitted.
        presets_unavailable: with :func:`analyze_presets`, the presets whose LoRA files are not on
            this machine (not tried).
    """

    fits: list[LoraFit]
    explained: float
    interference: list[Interference]
    presets_tried: list[str] = field(default_factory=list)
    presets_unavailable: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"loras": [f.to_dict() for f in self.fits], "explained": self.explained,
                                  "interference": [i.to_dict() for i in self.interference]}
        if self.presets_tried or self.presets_unavailable:
            out["presets"] = {"tried": self.presets_tried, "unavailable": self.presets_unavailable}
        return out


def _flat(m: LoraModule, shape: tuple[int, ...]) -> torch.Tensor:
    d = m.delta(shape)
    return d.reshape(-1).to(torch.float64)


def _energy(m: LoraModule) -> float:
    """``||delta||_F^2`` of a module, through its factors when it is a plain pair."""
    if is_low_rank(m):
        p = pair_of(m)
        f = (p.up * p.scale, p.down)
        return inner_product(f, f)
    return float(m.delta().double().pow(2).sum())


def analyze_model(model: str | Path, base: str | Path, loras: Sequence[tuple[str, LoraAdapter]], *,
                  sample: int | None = None) -> AnalyzeReport:
    """Fit ``model - base`` onto each candidate LoRA's delta by least squares, module by module.

    The strengths are fitted jointly (one least-squares problem over every module, and one per
    block), so two LoRAs adapting the same modules are told apart. Both models are read in one
    pass through the shared engine (:func:`lora_tools.engine.differences.stream_differences`).

    Args:
        model: the checkpoint to analyze.
        base: the model it was made from.
        loras: ``(label, adapter)`` candidates.
        sample: fit on only this many modules, those where the candidates' deltas are largest
            (default: every module a candidate adapts).

    Raises:
        UsageError: no candidate LoRA, or a LoRA module with no counterpart in the models.
        InvalidFileError: the two models are of different architectures or shapes.
        ShapeMismatchError, NonFiniteError: an input LoRA whose factors do not fit each other or hold
            NaN/Inf (:func:`lora_tools.lora.validate.validate_lora`).
    """
    from lora_tools.io.model import open_model

    for _, ad in loras:
        validate_lora(ad, verb="analyze")
    with open_model(model) as a, open_model(base) as b:
        return fit_models(a, b, loras, labels=(Path(model).name, Path(base).name), sample=sample)


def fit_models(a: ModelSource, b: ModelSource, loras: Sequence[tuple[str, LoraAdapter]], *,
               labels: tuple[str, str], sample: int | None = None) -> AnalyzeReport:
    """:func:`analyze_model` on two open models (``a - b``); `labels` name them in errors."""
    from lora_tools.layouts.targets import TargetIndex

    if not loras:
        raise UsageError("analyze needs at least one candidate LoRA", hint=Hint("lora", "naming a candidate", "PATH"))
    n = len(loras)
    overall = StrengthFit(n)
    per_lora_alone = [StrengthFit(1) for _ in loras]
    blocks: dict[str, StrengthFit] = {}
    interference: list[Interference] = []
    comps = sorted({m.component for _, ad in loras for m in ad.modules})
    targets = {t.sgm_key + repr(t.part): t for t in paired_targets(a, b, comps, labels)}
    index = TargetIndex(a.cfg.table)
    by_target: dict[str, list[tuple[int, LoraModule]]] = {}
    for j, (label, ad) in enumerate(loras):
        for m in ad.modules:
            t = index.lookup(m.component, m.name)
            if t is None or t.sgm_key + repr(t.part) not in targets:
                raise UsageError(f"'{label}': module '{m.name}' ({m.component}) is not in '{labels[1]}'")
            by_target.setdefault(t.sgm_key + repr(t.part), []).append((j, m))
    if sample is not None and sample < len(by_target):
        weight = {key: sum(_energy(m) for _, m in mods) for key, mods in by_target.items()}
        keep = set(sorted(weight, key=lambda k: -weight[k])[:max(1, sample)])
        by_target = {k: v for k, v in by_target.items() if k in keep}
    counts = [0] * n

    def fit(t: ModuleTarget, difference: torch.Tensor) -> None:
        mods = by_target[t.sgm_key + repr(t.part)]
        diff = difference.reshape(-1).to(torch.float64)
        flats = [torch.zeros_like(diff) for _ in range(n)]
        for j, m in mods:
            flats[j] = flats[j] + _flat(m, tuple(t.shape))
            counts[j] += 1
        gram = torch.stack([torch.stack([x @ y for y in flats]) for x in flats])
        rhs = torch.stack([x @ diff for x in flats])
        energy = float(diff @ diff)
        overall.add(gram, rhs, energy)
        blocks.setdefault(t.block, StrengthFit(n)).add(gram, rhs, energy)
        for j, _ in mods:
            per_lora_alone[j].add(gram[j:j + 1, j:j + 1], rhs[j:j + 1], energy)
        for i in range(len(mods)):
            for k in range(i + 1, len(mods)):
                (ji, mi), (jk, mk) = mods[i], mods[k]
                if ji != jk and is_low_rank(mi) and is_low_rank(mk):
                    pi, pk = pair_of(mi), pair_of(mk)
                    fa, fb = (pi.up * pi.scale, pi.down), (pk.up * pk.scale, pk.down)
                    interference.append(Interference(t.diffusers_module, loras[ji][0], loras[jk][0],
                                                     cosine_similarity(fa, fb), column_overlap(fa, fb)))

    stream_differences(a, b, [targets[key] for key in by_target], fit)
    strengths, explained = overall.solve()
    block_strengths = {name: fit.solve()[0] for name, fit in sorted(blocks.items())}
    fits = []
    for j, (label, _) in enumerate(loras):
        fits.append(LoraFit(label, strengths[j], per_lora_alone[j].solve()[1],
                            {blk: s[j] for blk, s in block_strengths.items() if float(blocks[blk].gram[j, j]) > 0}, counts[j]))
    return AnalyzeReport(fits, explained, interference)


def analyze_presets(model: str | Path, base: str | Path, *, preset_dir: str | Path | None = None,
                    sample: int | None = None) -> AnalyzeReport:
    """:func:`analyze_model` with the acceleration presets as candidates: those whose LoRA files
    are available locally (in `preset_dir` or the Hugging Face cache; nothing is downloaded).

    Args:
        model: the checkpoint to analyze.
        base: the model it was made from.
        preset_dir: a folder holding downloaded preset LoRA files (by their hub file names).
        sample: as in :func:`analyze_model`.

    Returns:
        The report, with ``presets_tried`` and ``presets_unavailable`` filled in.

    Raises:
        UsageError: no preset LoRA file is available (the error names where it looked).
    """
    from contextlib import ExitStack

    from lora_tools.lora.load import load_lora
    from lora_tools.presets.local import local_preset_loras

    files = local_preset_loras(preset_dir)
    if not files.found:
        where = f"'{preset_dir}' or " if preset_dir is not None else ""
        raise UsageError(f"No candidate LoRA: none of the {len(files.missing)} acceleration presets' LoRA files is in "
                         f"{where}the Hugging Face cache", hint=Hint("lora", "naming a candidate", "PATH"))
    with ExitStack() as stack:
        cands = [(p.name, stack.enter_context(load_lora(path))) for p, path in files.found]
        report = analyze_model(model, base, cands, sample=sample)
    report.presets_tried = [p.name for p, _ in files.found]
    report.presets_unavailable = [p.name for p in files.missing]
    return report
