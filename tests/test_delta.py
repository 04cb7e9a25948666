"""Tests for lora_tools.lora.delta against independent dense references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_tools.errors import ShapeMismatchError
from lora_tools.lora.delta import (
    dora_apply,
    loha_delta,
    lokr_delta,
    lokr_scale_applies,
    lora_delta,
    module_scale,
)

ATOL = 1e-5
RTOL = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------
# Plain LoRA / LoCon
# --------------------------------------------------------------------------------------------


def test_lora_linear_matches_two_linear_layers_on_identity():
    g = _gen(0)
    out_f, in_f, r = 7, 5, 3
    up, down = _randn(out_f, r, g=g), _randn(r, in_f, g=g)
    lin_down = nn.Linear(in_f, r, bias=False)
    lin_up = nn.Linear(r, out_f, bias=False)
    with torch.no_grad():
        lin_down.weight.copy_(down)
        lin_up.weight.copy_(up)
        # x @ W.T for x = I gives W.T.
        ref = lin_up(lin_down(torch.eye(in_f))).T

    delta = lora_delta(up, down, target_shape=(out_f, in_f))

    assert delta.dtype == torch.float32
    _close(delta, ref)


def test_lora_conv1x1_matches_conv_composition():
    g = _gen(1)
    out_c, in_c, r = 6, 4, 2
    up, down = _randn(out_c, r, 1, 1, g=g), _randn(r, in_c, 1, 1, g=g)
    ref = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)

    delta = lora_delta(up, down, target_shape=(out_c, in_c, 1, 1))

    _close(delta, ref)


def test_lora_conv3x3_matches_kohya_conv_composition_and_sequential_convs():
    g = _gen(2)
    out_c, in_c, r = 5, 3, 2
    up, down = _randn(out_c, r, 1, 1, g=g), _randn(r, in_c, 3, 3, g=g)
    ref = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)

    delta = lora_delta(up, down, target_shape=(out_c, in_c, 3, 3))

    assert delta.shape == (out_c, in_c, 3, 3)
    _close(delta, ref)
    # Behavioural check: one conv with delta equals the down conv followed by the up conv.
    x = _randn(2, in_c, 6, 6, g=g)
    _close(F.conv2d(x, delta, padding=1), F.conv2d(F.conv2d(x, down, padding=1), up), atol=1e-4)


def test_lora_2d_factors_fit_1x1_conv_target_and_4d_factors_fit_linear_target():
    g = _gen(3)
    up, down = _randn(4, 2, g=g), _randn(2, 3, g=g)
    ref = up @ down
    _close(lora_delta(up, down, target_shape=(4, 3, 1, 1)), ref.reshape(4, 3, 1, 1))
    _close(lora_delta(up[..., None, None], down[..., None, None], target_shape=(4, 3)), ref)


def test_lora_tucker_mid_matches_three_sequential_convs():
    g = _gen(4)
    out_c, in_c, r_down, r_up = 5, 3, 2, 4  # non-square core to pin the index order
    down = _randn(r_down, in_c, 1, 1, g=g)
    mid = _randn(r_up, r_down, 3, 3, g=g)
    up = _randn(out_c, r_up, 1, 1, g=g)

    delta = lora_delta(up, down, mid=mid, target_shape=(out_c, in_c, 3, 3))

    # LyCORIS LoCon-Tucker forward: lora_down (1x1) -> lora_mid (3x3) -> lora_up (1x1).
    x = _randn(2, in_c, 7, 7, g=g)
    ref_out = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    _close(F.conv2d(x, delta, padding=1), ref_out, atol=1e-4)
    # And the explicit sum over the core, written with loops over kernel positions.
    ref = torch.empty(out_c, in_c, 3, 3)
    for k in range(3):
        for j in range(3):
            ref[:, :, k, j] = up.flatten(1) @ mid[:, :, k, j] @ down.flatten(1)
    _close(delta, ref)


def test_lora_upcasts_half_inputs_to_float32():
    g = _gen(5)
    for dtype in (torch.float16, torch.bfloat16):
        up, down = _randn(8, 4, g=g, dtype=dtype), _randn(4, 6, g=g, dtype=dtype)
        delta = lora_delta(up, down, target_shape=(8, 6))
        assert delta.dtype == torch.float32
        ref = (up.double() @ down.double()).float()
        # Tight tolerance: a product rounded to half precision would be off by ~1e-3.
        _close(delta, ref)


def test_lora_does_not_modify_inputs():
    g = _gen(6)
    up, down = _randn(3, 2, g=g), _randn(2, 4, g=g)
    up0, down0 = up.clone(), down.clone()
    lora_delta(up, down, target_shape=(3, 4))
    assert torch.equal(up, up0) and torch.equal(down, down0)


@pytest.mark.parametrize(
    ("up_shape", "down_shape", "target"),
    [
        ((4, 2), (3, 5), (4, 5)),  # rank mismatch
        ((4, 2), (2, 5), (3, 5)),  # wrong out
        ((4, 2), (2, 5), (4, 6)),  # wrong in
        ((4, 2, 1, 1), (2, 5, 3, 3), (4, 5, 1, 1)),  # kernel does not fit
        ((4, 2, 1, 1), (2, 5, 3, 3), (4, 5)),  # conv delta into a linear
        ((4, 2, 1, 1), (2, 5, 1, 1), (4, 5, 3, 3)),  # 1x1 delta into a 3x3 conv
        ((4, 2, 3, 3), (2, 5, 1, 1), (4, 5, 3, 3)),  # up with a kernel
        ((4, 2), (2, 5), (20,)),  # not a weight shape
    ],
)
def test_lora_shape_errors(up_shape, down_shape, target):
    up, down = torch.zeros(up_shape), torch.zeros(down_shape)
    with pytest.raises(ShapeMismatchError):
        lora_delta(up, down, target_shape=target)


def test_lora_shape_error_is_a_value_error_with_a_clear_message():
    with pytest.raises(ValueError, match=r"rank mismatch"):
        lora_delta(torch.zeros(4, 2), torch.zeros(3, 5), target_shape=(4, 5))
    with pytest.raises(ShapeMismatchError, match=r"\(4, 5\).*\(4, 6\)"):
        lora_delta(torch.zeros(4, 2), torch.zeros(2, 5), target_shape=(4, 6))


@pytest.mark.parametrize(
    ("up_shape", "mid_shape", "down_shape", "target"),
    [
        ((4, 3, 1, 1), (2, 2, 3, 3), (2, 5, 1, 1), (4, 5, 3, 3)),  # up rank != mid out
        ((4, 2, 1, 1), (2, 3, 3, 3), (2, 5, 1, 1), (4, 5, 3, 3)),  # mid in != down rank
        ((4, 2, 1, 1), (2, 2, 3, 3), (2, 5, 3, 3), (4, 5, 3, 3)),  # down with a kernel
        ((4, 2, 1, 1), (2, 2, 3, 3), (2, 5, 1, 1), (4, 5, 1, 1)),  # core kernel vs target
        ((4, 2, 1, 1), (2, 2), (2, 5, 1, 1), (4, 5)),  # core not 4-D
    ],
)
def test_lora_tucker_shape_errors(up_shape, mid_shape, down_shape, target):
    with pytest.raises(ShapeMismatchError):
        lora_delta(
            torch.zeros(up_shape), torch.zeros(down_shape), mid=torch.zeros(mid_shape),
            target_shape=target,
        )


# --------------------------------------------------------------------------------------------
# LoHa
# --------------------------------------------------------------------------------------------


def _loop_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Naive triple-loop matrix product (an implementation independent of torch.mm)."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = sum(float(a[i, k]) * float(b[k, j]) for k in range(a.shape[1]))
    return out


def test_loha_linear_matches_elementwise_formula():
    g = _gen(10)
    out_f, in_f, r = 4, 5, 2
    w1a, w1b = _randn(out_f, r, g=g), _randn(r, in_f, g=g)
    w2a, w2b = _randn(out_f, r, g=g), _randn(r, in_f, g=g)
    ref = _loop_matmul(w1a, w1b) * _loop_matmul(w2a, w2b)

    delta = loha_delta(w1a, w1b, w2a, w2b, target_shape=(out_f, in_f))

    assert delta.dtype == torch.float32
    _close(delta, ref.float())


def test_loha_conv_flattened_b_reshapes_to_kernel():
    g = _gen(11)
    out_c, in_c, r = 3, 2, 2
    w1a, w1b = _randn(out_c, r, g=g), _randn(r, in_c * 9, g=g)
    w2a, w2b = _randn(out_c, r, g=g), _randn(r, in_c * 9, g=g)
    ref = ((w1a @ w1b) * (w2a @ w2b)).reshape(out_c, in_c, 3, 3)

    delta = loha_delta(w1a, w1b, w2a, w2b, target_shape=(out_c, in_c, 3, 3))

    _close(delta, ref)


def test_loha_cp_matches_per_kernel_position_products():
    g = _gen(12)
    out_c, in_c, r = 4, 3, 2
    # CP layout (LyCORIS use_tucker): a is (r, out), b is (r, in), t is (r, r, kh, kw).
    w1a, w1b, t1 = _randn(r, out_c, g=g), _randn(r, in_c, g=g), _randn(r, r, 3, 3, g=g)
    w2a, w2b, t2 = _randn(r, out_c, g=g), _randn(r, in_c, g=g), _randn(r, r, 3, 3, g=g)
    ref = torch.empty(out_c, in_c, 3, 3)
    for k in range(3):
        for j in range(3):
            m1 = w1a.T @ t1[:, :, k, j] @ w1b
            m2 = w2a.T @ t2[:, :, k, j] @ w2b
            ref[:, :, k, j] = m1 * m2

    delta = loha_delta(w1a, w1b, w2a, w2b, t1=t1, t2=t2, target_shape=(out_c, in_c, 3, 3))

    _close(delta, ref)


def test_loha_upcasts_bf16():
    g = _gen(13)
    w = [_randn(3, 2, g=g, dtype=torch.bfloat16), _randn(2, 4, g=g, dtype=torch.bfloat16)]
    v = [_randn(3, 2, g=g, dtype=torch.bfloat16), _randn(2, 4, g=g, dtype=torch.bfloat16)]
    delta = loha_delta(w[0], w[1], v[0], v[1], target_shape=(3, 4))
    assert delta.dtype == torch.float32
    ref = (w[0].double() @ w[1].double()) * (v[0].double() @ v[1].double())
    _close(delta, ref.float())


def test_loha_shape_errors():
    z = torch.zeros
    with pytest.raises(ShapeMismatchError):  # rank mismatch in term 1
        loha_delta(z(4, 2), z(3, 5), z(4, 2), z(2, 5), target_shape=(4, 5))
    with pytest.raises(ShapeMismatchError):  # terms of different shapes
        loha_delta(z(4, 2), z(2, 5), z(4, 2), z(2, 6), target_shape=(4, 5))
    with pytest.raises(ShapeMismatchError):  # does not fit target
        loha_delta(z(4, 2), z(2, 5), z(4, 2), z(2, 5), target_shape=(5, 4))
    with pytest.raises(ShapeMismatchError, match="together"):  # t1 without t2
        loha_delta(z(2, 4), z(2, 5), z(2, 4), z(2, 5), t1=z(2, 2, 3, 3), target_shape=(4, 5, 3, 3))
    with pytest.raises(ShapeMismatchError):  # CP core does not chain with a
        loha_delta(
            z(3, 4), z(2, 5), z(2, 4), z(2, 5), t1=z(2, 2, 3, 3), t2=z(2, 2, 3, 3),
            target_shape=(4, 5, 3, 3),
        )


# --------------------------------------------------------------------------------------------
# LoKr
# --------------------------------------------------------------------------------------------


def _block_kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product by explicit block placement: block (i, j) is a[i, j] * b."""
    o1, i1 = a.shape[:2]
    o2, i2 = b.shape[:2]
    rest = b.shape[2:]
    out = torch.zeros(o1 * o2, i1 * i2, *rest)
    for i in range(o1):
        for j in range(i1):
            out[i * o2:(i + 1) * o2, j * i2:(j + 1) * i2] = a[i, j] * b
    return out


def test_lokr_full_factors_match_block_kron():
    g = _gen(20)
    w1, w2 = _randn(2, 3, g=g), _randn(4, 5, g=g)
    delta = lokr_delta(w1=w1, w2=w2, target_shape=(8, 15))
    _close(delta, _block_kron(w1, w2))


def test_lokr_decomposed_factors_match_block_kron():
    g = _gen(21)
    w1a, w1b = _randn(2, 1, g=g), _randn(1, 3, g=g)
    w2a, w2b = _randn(4, 2, g=g), _randn(2, 5, g=g)
    ref = _block_kron(w1a @ w1b, w2a @ w2b)
    _close(lokr_delta(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, target_shape=(8, 15)), ref)
    # Mixed: full w1, decomposed w2.
    w1 = _randn(2, 3, g=g)
    _close(
        lokr_delta(w1=w1, w2a=w2a, w2b=w2b, target_shape=(8, 15)),
        _block_kron(w1, w2a @ w2b),
    )


def test_lokr_conv_full_w2_matches_block_kron_and_conv_of_blocks():
    g = _gen(22)
    w1, w2 = _randn(2, 2, g=g), _randn(3, 2, 3, 3, g=g)
    delta = lokr_delta(w1=w1, w2=w2, target_shape=(6, 4, 3, 3))
    _close(delta, _block_kron(w1, w2))


def test_lokr_conv_decomposed_w2_with_flattened_b():
    g = _gen(23)
    w1 = _randn(2, 2, g=g)
    w2a, w2b = _randn(3, 2, g=g), _randn(2, 2 * 9, g=g)  # LyCORIS stores (r, i2 * kh * kw)
    ref = _block_kron(w1, (w2a @ w2b).reshape(3, 2, 3, 3))
    _close(lokr_delta(w1=w1, w2a=w2a, w2b=w2b, target_shape=(6, 4, 3, 3)), ref)


def test_lokr_tucker_t2_matches_per_kernel_position_products():
    g = _gen(24)
    o2, i2, r = 3, 2, 2
    w1 = _randn(2, 2, g=g)
    w2a, w2b, t2 = _randn(r, o2, g=g), _randn(r, i2, g=g), _randn(r, r, 3, 3, g=g)
    w2 = torch.empty(o2, i2, 3, 3)
    for k in range(3):
        for j in range(3):
            w2[:, :, k, j] = w2a.T @ t2[:, :, k, j] @ w2b

    delta = lokr_delta(w1=w1, w2a=w2a, w2b=w2b, t2=t2, target_shape=(6, 4, 3, 3))

    _close(delta, _block_kron(w1, w2))


def test_lokr_upcasts_half():
    g = _gen(25)
    w1, w2 = _randn(2, 2, g=g, dtype=torch.float16), _randn(2, 3, g=g, dtype=torch.float16)
    delta = lokr_delta(w1=w1, w2=w2, target_shape=(4, 6))
    assert delta.dtype == torch.float32
    _close(delta, _block_kron(w1.float(), w2.float()))


def test_lokr_argument_and_shape_errors():
    z = torch.zeros
    with pytest.raises(ShapeMismatchError, match="not both"):
        lokr_delta(w1=z(2, 2), w1a=z(2, 1), w1b=z(1, 2), w2=z(2, 2), target_shape=(4, 4))
    with pytest.raises(ShapeMismatchError, match="missing"):
        lokr_delta(w2=z(2, 2), target_shape=(4, 4))
    with pytest.raises(ShapeMismatchError, match="missing"):
        lokr_delta(w1=z(2, 2), w2a=z(2, 1), target_shape=(4, 4))
    with pytest.raises(ShapeMismatchError, match="not both"):  # t2 with a full w2
        lokr_delta(w1=z(2, 2), w2=z(2, 2), t2=z(1, 1, 3, 3), target_shape=(4, 4))
    with pytest.raises(ShapeMismatchError):  # rank mismatch
        lokr_delta(w1=z(2, 2), w2a=z(2, 1), w2b=z(2, 2), target_shape=(4, 4))
    with pytest.raises(ShapeMismatchError):  # kron (4, 6) vs target (6, 4)
        lokr_delta(w1=z(2, 2), w2=z(2, 3), target_shape=(6, 4))
    with pytest.raises(ShapeMismatchError):  # kernel 3x3 vs 1x1 target
        lokr_delta(w1=z(2, 2), w2=z(2, 2, 3, 3), target_shape=(4, 4, 1, 1))


def test_lokr_scale_applies_only_when_a_factor_is_decomposed():
    full = torch.zeros(2, 2)
    assert lokr_scale_applies(w1=full, w2=full) is False
    assert lokr_scale_applies(w1=None, w2=full) is True
    assert lokr_scale_applies(w1=full, w2=None) is True
    assert lokr_scale_applies(w1=None, w2=None) is True


# --------------------------------------------------------------------------------------------
# module_scale
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "rank", "expected"),
    [(None, 64, 1.0), (0, 64, 1.0), (0.0, 4, 1.0), (8, 64, 0.125), (8.0, 64, 0.125),
     (16, 16, 1.0), (1, 4, 0.25), (32, 16, 2.0)],
)
def test_module_scale(alpha, rank, expected):
    assert module_scale(alpha, rank) == pytest.approx(expected, rel=0, abs=0)


def test_module_scale_accepts_a_scalar_tensor_alpha():
    assert module_scale(torch.tensor(8.0), 64) == 0.125  # type: ignore[arg-type]


def test_module_scale_rejects_non_positive_rank():
    with pytest.raises(ShapeMismatchError):
        module_scale(8, 0)


# --------------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------------


def _dora_reference(w, delta, mag, strength, axis):
    """Hand-written DoRA: loops over channels (output axis) or columns (input axis) of W + delta."""
    w = w.double()
    wc = w + delta.double()
    out = wc.clone()
    eps = torch.finfo(torch.float32).eps
    mag = mag.double().flatten()
    if axis == "out":
        for o in range(w.shape[0]):
            norm = torch.sqrt((wc[o] ** 2).sum())
            out[o] = wc[o] * mag[o] / (norm + eps)
    else:
        for i in range(w.shape[1]):
            norm = torch.sqrt((wc[:, i] ** 2).sum())
            out[:, i] = wc[:, i] * mag[i] / (norm + eps)
    return (w + strength * (out - w)).float()


@pytest.mark.parametrize("strength", [1.0, 0.5, 1.7])
@pytest.mark.parametrize("shape", [(5, 4), (6, 3, 3, 3), (4, 4)])
def test_dora_output_axis_matches_hand_reference(shape, strength):
    g = _gen(30)
    w, delta = _randn(*shape, g=g), 0.3 * _randn(*shape, g=g)
    mag = _randn(shape[0], g=g).abs() + 0.5
    result = dora_apply(w, delta, mag, strength=strength)
    _close(result, _dora_reference(w, delta, mag, strength, "out"))
    # LyCORIS-style magnitude shapes (out, 1[, 1, 1]) give the same result.
    _close(dora_apply(w, delta, mag.reshape(shape[0], *[1] * (len(shape) - 1)), strength=strength),
           result, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(5, 4), (6, 3, 3, 3)])
def test_dora_input_axis_matches_hand_reference(shape):
    g = _gen(31)
    w, delta = _randn(*shape, g=g), 0.3 * _randn(*shape, g=g)
    mag = (_randn(shape[1], g=g).abs() + 0.5).reshape(1, shape[1], *[1] * (len(shape) - 2))
    result = dora_apply(w, delta, mag, strength=0.8)
    _close(result, _dora_reference(w, delta, mag, 0.8, "in"))


def test_dora_norm_uses_combined_weight_not_base_weight():
    g = _gen(32)
    w, delta = _randn(4, 6, g=g), _randn(4, 6, g=g)
    mag = torch.ones(4)
    result = dora_apply(w, delta, mag)
    # With magnitude 1, each output row of the result has unit norm only if W + delta was normed.
    _close(torch.linalg.vector_norm(result, dim=1), torch.ones(4))
    wrong = (w + delta) / (torch.linalg.vector_norm(w, dim=1, keepdim=True))
    assert not torch.allclose(result, wrong, atol=1e-3)


def test_dora_strength_zero_returns_base_and_inputs_untouched():
    g = _gen(33)
    w, delta, mag = _randn(3, 5, g=g), _randn(3, 5, g=g), _randn(3, g=g).abs()
    w0, d0, m0 = w.clone(), delta.clone(), mag.clone()
    _close(dora_apply(w, delta, mag, strength=0.0), w, atol=0, rtol=0)
    dora_apply(w, delta, mag)
    assert torch.equal(w, w0) and torch.equal(delta, d0) and torch.equal(mag, m0)


def test_dora_upcasts_half_inputs():
    g = _gen(34)
    w = _randn(4, 3, g=g, dtype=torch.float16)
    delta = _randn(4, 3, g=g, dtype=torch.bfloat16)
    mag = _randn(4, g=g, dtype=torch.float16).abs()
    result = dora_apply(w, delta, mag, strength=0.5)
    assert result.dtype == torch.float32
    _close(result, _dora_reference(w.float(), delta.float(), mag.float(), 0.5, "out"))


def test_dora_shape_errors():
    z = torch.zeros
    with pytest.raises(ShapeMismatchError, match="does not match"):
        dora_apply(z(4, 3), z(3, 4), z(4))
    with pytest.raises(ShapeMismatchError, match="fits neither"):
        dora_apply(z(4, 3), z(4, 3), z(5))
    with pytest.raises(ShapeMismatchError):
        dora_apply(z(4, 3, 3, 3), z(4, 3, 3, 3), z(1, 9))


def _peft_dora(base: nn.Module, r: int, alpha: int, g: torch.Generator):
    from peft import LoraConfig, get_peft_model

    model = nn.Sequential(base)
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_dora=True, target_modules=["0"],
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        mag = layer.lora_magnitude_vector["default"].weight
        mag.copy_(torch.rand(mag.shape, generator=g) + 0.5)
    peft_model.eval()
    return peft_model, layer


def test_dora_matches_peft_linear():
    pytest.importorskip("peft")
    g = _gen(40)
    out_f, in_f, r, alpha = 6, 5, 2, 4
    base = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g))
    peft_model, layer = _peft_dora(base, r, alpha, g)
    up = layer.lora_B["default"].weight.detach()
    down = layer.lora_A["default"].weight.detach()
    mag = layer.lora_magnitude_vector["default"].weight.detach()
    w = base.weight.detach().clone()

    delta = module_scale(alpha, r) * lora_delta(up, down, target_shape=(out_f, in_f))
    fused = dora_apply(w, delta, mag)

    with torch.no_grad():
        ref = peft_model(torch.eye(in_f)).T  # x @ W_fused.T at x = I
    _close(fused, ref, atol=1e-5, rtol=1e-4)


def test_dora_matches_peft_conv3x3():
    pytest.importorskip("peft")
    g = _gen(41)
    out_c, in_c, r, alpha = 4, 3, 2, 8
    base = nn.Conv2d(in_c, out_c, 3, padding=1, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_c, in_c, 3, 3, generator=g))
    peft_model, layer = _peft_dora(base, r, alpha, g)
    up = layer.lora_B["default"].weight.detach()  # (out, r, 1, 1)
    down = layer.lora_A["default"].weight.detach()  # (r, in, 3, 3)
    mag = layer.lora_magnitude_vector["default"].weight.detach().reshape(out_c)
    w = base.weight.detach().clone()

    delta = module_scale(alpha, r) * lora_delta(up, down, target_shape=(out_c, in_c, 3, 3))
    fused = dora_apply(w, delta, mag)

    x = torch.randn(2, in_c, 5, 5, generator=g)
    with torch.no_grad():
        ref = peft_model(x)
    _close(F.conv2d(x, fused, padding=1), ref, atol=1e-4, rtol=1e-4)
