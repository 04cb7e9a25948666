"""Plan-time factor checks agree with the delta maths: what ``check_factor_shapes`` refuses,
``lora.delta`` refuses on real tensors, and every well-formed synthetic LoRA passes."""

from __future__ import annotations

import pytest
import torch

from lora_tools.errors import ShapeMismatchError
from lora_tools.lora import delta as d
from lora_tools.lora.adapter import LoraModule
from lora_tools.lora.load import load_lora
from lora_tools.lora.validate import check_factor_shapes, module_problem
from lora_tools.testing.synthetic_lora import write_lora


@pytest.mark.parametrize("algorithm", ["lora", "lora-tucker", "loha", "lokr", "dora"])
def test_well_formed_synthetic_loras_pass(tmp_path, algorithm):
    path = write_lora(tmp_path / f"{algorithm}.safetensors", "tiny", algorithm=algorithm, targets="all", rank=2)
    with load_lora(path) as adapter:
        assert adapter.modules and check_factor_shapes(adapter) == []


def _delta(kind: str, shapes: dict[str, tuple[int, ...]], target: tuple[int, ...]) -> None:
    t = {k: torch.zeros(v) for k, v in shapes.items()}
    if kind == "lora":
        d.lora_delta(t["up"], t["down"], mid=t.get("mid"), target_shape=target)
    elif kind == "loha":
        d.loha_delta(t["w1a"], t["w1b"], t["w2a"], t["w2b"], t1=t.get("t1"), t2=t.get("t2"), target_shape=target)
    else:
        d.lokr_delta(**t, target_shape=target)


#: (kind, factor shapes, the base weight they are meant for, what our reason says)
MISFITS = [
    ("lora", {"up": (8, 4), "down": (2, 6)}, (8, 6), "up (8, 4) has rank 4, down (2, 6) has rank 2"),
    ("lora", {"up": (8, 4, 3, 3), "down": (4, 6)}, (8, 6), "up must be (out, r) or (out, r, 1, 1)"),
    ("lora", {"up": (8, 2, 1, 1), "mid": (2, 3, 3, 3), "down": (2, 6, 1, 1)}, (8, 6, 3, 3), "Tucker mid (2, 3, 3, 3) does not chain"),
    ("lora", {"up": (8, 2, 1, 1), "mid": (2, 2), "down": (2, 6, 1, 1)}, (8, 6, 3, 3), "Tucker mid must be (r, r, kh, kw)"),
    ("loha", {"w1a": (8, 2), "w1b": (3, 6), "w2a": (8, 2), "w2b": (2, 6)}, (8, 6), "term 1: a (8, 2) has rank 2, b (3, 6) has rank 3"),
    ("loha", {"w1a": (8, 2), "w1b": (2, 6), "w2a": (4, 2), "w2b": (2, 6)}, (8, 6), "two Hadamard terms have different shapes"),
    ("lokr", {"w1": (2, 2), "w2a": (4, 2), "w2b": (3, 3)}, (8, 6), "w2: a (4, 2) has rank 2, b (3, 3) has rank 3"),
    ("lokr", {"w1a": (2, 1), "w2": (4, 3)}, (8, 6), "factor w1 is missing"),
    ("lokr", {"w1": (2, 2), "w1a": (2, 1), "w1b": (1, 2), "w2": (4, 3)}, (8, 6), "give w1 or w1a/w1b, not both"),
    ("lokr", {"w1": (2, 2), "w2a": (2, 4), "w2b": (2, 3), "t2": (3, 2, 1, 1)}, (8, 6, 1, 1), "w2: the Tucker core (3, 2, 1, 1) does not chain"),
]


@pytest.mark.parametrize("kind,shapes,target,reason", MISFITS, ids=[m[3][:40] for m in MISFITS])
def test_misfits_are_named_and_the_delta_maths_refuses_them_too(kind, shapes, target, reason):
    module = LoraModule("unet", "mid_block_attentions_0_proj_in", kind, {r: r for r in shapes}, None, 2)  # type: ignore[arg-type]
    problem = module_problem(module, shapes)
    assert problem is not None and reason in problem.reason, problem
    assert problem.describe().startswith("module 'mid_block_attentions_0_proj_in' (unet): ")
    with pytest.raises(ShapeMismatchError):
        _delta(kind, shapes, target)


@pytest.mark.parametrize("kind,shapes,target", [
    ("lora", {"up": (8, 2), "down": (2, 6)}, (8, 6)),
    ("lora", {"up": (8, 2, 1, 1), "mid": (2, 2, 3, 3), "down": (2, 6, 1, 1)}, (8, 6, 3, 3)),
    ("loha", {"w1a": (8, 2), "w1b": (2, 6), "w2a": (8, 3), "w2b": (3, 6)}, (8, 6)),
    ("lokr", {"w1": (2, 2), "w2a": (4, 2), "w2b": (2, 3)}, (8, 6)),
])
def test_fitting_factors_pass_here_and_in_the_delta_maths(kind, shapes, target):
    module = LoraModule("unet", "m", kind, {r: r for r in shapes}, None, 2)  # type: ignore[arg-type]
    assert module_problem(module, shapes) is None
    _delta(kind, shapes, target)
