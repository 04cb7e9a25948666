"""analyze: which LoRAs a checkpoint has baked in, at what strength, and where LoRAs interfere."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from lora_tools.errors import UsageError
from lora_tools.lora.validate import validate_lora
from lora_tools.lowrank import StrengthFit, column_overlap, cosine_similarity
from lora_tools.ops.extract import paired_targets, target_weight
from lora_tools.ops.lora_pairs import is_low_rank, pair_of

if TYPE_CHECKING:
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
    """

    fits: list[LoraFit]
    explained: float
    interference: list[Interference]

    def to_dict(self) -> dict[str, object]:
        return {"loras": [f.to_dict() for f in self.fits], "explained": self.explained,
                "interference": [i.to_dict() for i in self.interference]}


def _flat(m: "LoraModule", shape: tuple[int, ...]) -> torch.Tensor:
    d = m.delta(shape)
    return d.reshape(-1).to(torch.float64)


def analyze_model(model: str | Path, base: str | Path, loras: Sequence[tuple[str, "LoraAdapter"]]) -> AnalyzeReport:
    """Fit ``model - base`` onto each candidate LoRA's delta by least squares, module by module.

    The strengths are fitted jointly (one least-squares problem over every module, and one per
    block), so two LoRAs adapting the same modules are told apart. The models are streamed: one
    module's two weights at a time.

    Args:
        model: the checkpoint to analyze.
        base: the model it was made from.
        loras: ``(label, adapter)`` candidates.

    Raises:
        UsageError: no candidate LoRA, or a LoRA module with no counterpart in the models.
        InvalidFileError: the two models are of different architectures or shapes.
        ShapeMismatchError, NonFiniteError: an input LoRA whose factors do not fit each other or hold
            NaN/Inf (:func:`lora_tools.lora.validate.validate_lora`).
    """
    from lora_tools.layouts.targets import TargetIndex
    from lora_tools.models import open_model

    if not loras:
        raise UsageError("analyze needs at least one candidate LoRA")
    for _, ad in loras:
        validate_lora(ad, verb="analyze")
    n = len(loras)
    overall = StrengthFit(n)
    per_lora_alone = [StrengthFit(1) for _ in loras]
    blocks: dict[str, StrengthFit] = {}
    interference: list[Interference] = []
    labels = (Path(model).name, Path(base).name)
    with open_model(model) as a, open_model(base) as b:
        comps = sorted({m.component for _, ad in loras for m in ad.modules})
        targets = {t.sgm_key + repr(t.part): t for t in paired_targets(a, b, comps, labels)}
        index = TargetIndex(a.cfg.table)
        by_target: dict[str, list[tuple[int, "LoraModule"]]] = {}
        for j, (label, ad) in enumerate(loras):
            for m in ad.modules:
                t = index.lookup(m.component, m.name)
                if t is None:
                    raise UsageError(f"'{label}': module '{m.name}' ({m.component}) is not in '{labels[1]}'")
                by_target.setdefault(t.sgm_key + repr(t.part), []).append((j, m))
        counts = [0] * n
        for key, mods in by_target.items():
            t = targets[key]
            diff = (target_weight(a, t) - target_weight(b, t)).reshape(-1).to(torch.float64)
            flats = [torch.zeros_like(diff) for _ in range(n)]
            for j, m in mods:
                flats[j] = flats[j] + _flat(m, tuple(t.shape))
                counts[j] += 1
            gram = torch.stack([torch.stack([x @ y for y in flats]) for x in flats])
            rhs = torch.stack([x @ diff for x in flats])
            energy = float(diff @ diff)
            overall.add(gram, rhs, energy)
            blocks.setdefault(t.block, StrengthFit(n)).add(gram, rhs, energy)
            for j, m in mods:
                per_lora_alone[j].add(gram[j:j + 1, j:j + 1], rhs[j:j + 1], energy)
            for i in range(len(mods)):
                for k in range(i + 1, len(mods)):
                    (ji, mi), (jk, mk) = mods[i], mods[k]
                    if ji != jk and is_low_rank(mi) and is_low_rank(mk):
                        pi, pk = pair_of(mi), pair_of(mk)
                        fa, fb = (pi.up * pi.scale, pi.down), (pk.up * pk.scale, pk.down)
                        interference.append(Interference(t.diffusers_module, loras[ji][0], loras[jk][0],
                                                         cosine_similarity(fa, fb), column_overlap(fa, fb)))
    strengths, explained = overall.solve()
    block_strengths = {name: fit.solve()[0] for name, fit in sorted(blocks.items())}
    fits = []
    for j, (label, _) in enumerate(loras):
        fits.append(LoraFit(label, strengths[j], per_lora_alone[j].solve()[1],
                            {blk: s[j] for blk, s in block_strengths.items() if float(blocks[blk].gram[j, j]) > 0}, counts[j]))
    return AnalyzeReport(fits, explained, interference)
