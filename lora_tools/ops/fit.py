"""How well a rank-reduced LoRA fits what it stands for: per module (:class:`ModuleFit`) and overall
(:class:`FitReport`). Reported by resize, svd merge and extract."""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_tools.lora.lowrank import DenseSvd, Truncation


@dataclass(frozen=True, slots=True)
class ModuleFit:
    """One module's rank change and what it lost.

    Attributes:
        name: the module name.
        rank_in: its rank before.
        rank_out: its rank after.
        energy: its delta's squared Frobenius norm.
        retained: the fraction of it kept.
        relative_error: ``||delta - new||_F / ||delta||_F``.
        method: ``factors`` (QR + core SVD), ``full`` or ``randomized`` (dense delta).
    """

    name: str
    rank_in: int
    rank_out: int
    energy: float
    retained: float
    relative_error: float
    method: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "rank_in": self.rank_in, "rank_out": self.rank_out,
                "retained_energy": self.retained, "relative_error": self.relative_error, "method": self.method}


@dataclass
class FitReport:
    """Per-module and overall fit of a resize, svd merge or extract.

    Attributes:
        modules: one entry per module.
        size_bytes: the written file's size in bytes (set by the caller).
    """

    modules: list[ModuleFit] = field(default_factory=list)
    size_bytes: int | None = None

    @property
    def retained_energy(self) -> float:
        """Overall retained fraction of the squared Frobenius norm, over every module."""
        total = sum(m.energy for m in self.modules)
        return 1.0 if total == 0 else sum(m.energy * m.retained for m in self.modules) / total

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules), default=0.0)

    def to_dict(self, *, per_module: bool = True) -> dict[str, object]:
        out: dict[str, object] = {"retained_energy": self.retained_energy,
                                  "max_relative_error": self.max_relative_error,
                                  "modules_count": len(self.modules)}
        if self.size_bytes is not None:
            out["size_bytes"] = self.size_bytes
        if per_module:
            out["modules"] = [m.to_dict() for m in self.modules]
        return out


def fit_of(name: str, rank_in: int, t: Truncation | DenseSvd, method: str) -> ModuleFit:
    """A :class:`ModuleFit` from a truncation (factors) or a dense SVD."""
    return ModuleFit(name, rank_in, t.rank, t.total_energy, t.retained_energy, t.relative_error, method)


__all__ = ["FitReport", "ModuleFit", "fit_of"]
