"""lora_tools.lora.lowrank against dense references (dense SVD, dense sums, dense least squares)."""

from __future__ import annotations

import math

import pytest
import torch

from lora_tools.errors import ShapeMismatchError, UsageError
from lora_tools.lora.lowrank import (
    RankRule,
    StrengthFit,
    choose_rank,
    column_overlap,
    cosine_similarity,
    dense_svd,
    flatten_conv,
    inner_product,
    stack_factors,
    truncate,
    tucker_to_pair,
)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(out: int, inn: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _g(seed)
    return torch.randn(out, r, generator=g), torch.randn(r, inn, generator=g)


def _dense_sv(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(m.double())


@pytest.mark.parametrize("out,inn,r,k", [(40, 24, 8, 3), (16, 64, 12, 12), (30, 30, 6, 1)])
def test_truncate_matches_dense_svd(out: int, inn: int, r: int, k: int) -> None:
    up, down = _pair(out, inn, r, seed=out + k)
    scale = 0.37
    dense = scale * up.double() @ down.double()
    ref = _dense_sv(dense)
    t = truncate(up, down, RankRule(rank=k), scale=scale)
    # the same singular values as the dense SVD (the first r; the rest are zero)
    torch.testing.assert_close(t.singular_values.double(), ref[:r], rtol=1e-5, atol=1e-5)
    assert t.rank == k and t.up.shape == (out, k) and t.down.shape == (k, inn)
    # the approximation is the dense truncated SVD (Eckart-Young), error = dropped singular values
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vh[:k]
    torch.testing.assert_close((t.up @ t.down).double(), best, rtol=1e-4, atol=1e-4)
    measured = float((dense - (t.up @ t.down).double()).norm())
    assert t.error == pytest.approx(float(ref[k:].norm()), rel=1e-4, abs=1e-5)
    assert measured == pytest.approx(t.error, rel=1e-3, abs=1e-4)
    assert t.retained_energy == pytest.approx(float((ref[:k] ** 2).sum() / (ref ** 2).sum()), rel=1e-6)


def test_truncate_full_rank_is_exact() -> None:
    up, down = _pair(20, 12, 5, seed=3)
    t = truncate(up, down, RankRule(rank=5), scale=2.0)
    torch.testing.assert_close(t.up @ t.down, 2.0 * up @ down, rtol=1e-5, atol=1e-4)
    assert t.error == pytest.approx(0.0, abs=1e-4)


def test_rank_rules_follow_kohya_definitions() -> None:
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    sq = s ** 2
    cum = torch.cumsum(sq, 0) / sq.sum()
    assert choose_rank(s, RankRule(rank=3)) == 3
    assert choose_rank(s, RankRule(rank=99)) == 5
    # energy: smallest k with cumulative energy >= F
    for f in (0.5, 0.8, 0.95, 0.99, 1.0):
        k = choose_rank(s, RankRule(energy=f))
        assert float(cum[k - 1]) >= f - 1e-9 and (k == 1 or float(cum[k - 2]) < f)
    # sv_fro (kohya's): one more than the smallest rank whose retained Frobenius norm sqrt(cum) >= X
    k = choose_rank(s, RankRule(sv_fro=0.99))
    assert math.sqrt(float(cum[k - 2])) >= 0.99 and math.sqrt(float(cum[k - 3])) < 0.99
    # sv_ratio (kohya's): one more than the number of s > s_max / X
    assert choose_rank(s, RankRule(sv_ratio=4.0)) == 3
    assert choose_rank(s, RankRule(sv_ratio=10.0)) == 4
    assert choose_rank(s, RankRule(sv_ratio=4.0, max_rank=2)) == 2
    assert choose_rank(s, RankRule(energy=1.0, max_rank=2)) == 2


@pytest.mark.parametrize("kwargs", [{}, {"rank": 2, "energy": 0.5}, {"energy": 0.0}, {"energy": 1.5},
                                    {"sv_fro": -0.1}, {"rank": 0}, {"sv_ratio": 0.5},
                                    {"sv_cumulative": 1.5}, {"sv_fro": 0.5, "sv_cumulative": 0.5}])
def test_bad_rank_rules_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        RankRule(**kwargs)  # type: ignore[arg-type]


def test_stack_concat_is_exact_weighted_sum() -> None:
    a, b, c = _pair(24, 18, 4, 1), _pair(24, 18, 7, 2), _pair(24, 18, 2, 3)
    w = (0.8, -0.3, 1.7)
    up, down = stack_factors([(a[0], a[1], w[0]), (b[0], b[1], w[1]), (c[0], c[1], w[2])])
    assert up.shape == (24, 13) and down.shape == (13, 18)
    ref = sum(wi * x[0] @ x[1] for wi, x in zip(w, (a, b, c), strict=True))
    torch.testing.assert_close(up @ down, ref, rtol=1e-5, atol=1e-5)


def test_svd_merge_is_truncated_svd_of_weighted_sum() -> None:
    a, b = _pair(32, 20, 6, 4), _pair(32, 20, 5, 5)
    up, down = stack_factors([(a[0], a[1], 0.5), (b[0], b[1], 1.25)])
    dense = (0.5 * a[0] @ a[1] + 1.25 * b[0] @ b[1]).double()
    t = truncate(up, down, RankRule(rank=4))
    ref = _dense_sv(dense)
    torch.testing.assert_close(t.singular_values.double()[:11], ref[:11], rtol=1e-4, atol=1e-4)
    assert t.error == pytest.approx(float(ref[4:].norm()), rel=1e-4)


def test_stack_rejects_mismatched_shapes() -> None:
    a, b = _pair(8, 6, 2, 1), _pair(9, 6, 2, 2)
    with pytest.raises(ShapeMismatchError):
        stack_factors([(a[0], a[1], 1.0), (b[0], b[1], 1.0)])
    with pytest.raises(ShapeMismatchError):
        truncate(a[0], b[1].T, RankRule(rank=1))


def test_conv_and_tucker_through_factors() -> None:
    g = _g(7)
    up = torch.randn(10, 4, 1, 1, generator=g)
    down = torch.randn(4, 6, 3, 3, generator=g)
    u2, d2, shape = flatten_conv(up, down)
    # reference: a LoCon delta is the 1x1 up composed with the kxk down
    ref = torch.einsum("or,rikl->oikl", up.flatten(1), down)
    assert shape == (10, 6, 3, 3)
    torch.testing.assert_close((u2 @ d2).reshape(shape), ref)
    # Tucker: up (out, r'), mid (r', r, kh, kw), down (r, in): ComfyUI/LyCORIS contraction
    up_t = torch.randn(10, 3, generator=g)
    mid = torch.randn(3, 4, 3, 3, generator=g)
    down_t = torch.randn(4, 6, 1, 1, generator=g)
    u3, m3, shape3 = tucker_to_pair(up_t, mid, down_t)
    ref_t = torch.einsum("ijkl,jr,pi->prkl", mid, down_t.flatten(1), up_t)
    assert shape3 == (10, 6, 3, 3)
    torch.testing.assert_close((u3 @ m3).reshape(shape3), ref_t, rtol=1e-5, atol=1e-5)
    t = truncate(u3, m3, RankRule(rank=2))
    ref_sv = _dense_sv(ref_t.reshape(10, -1))
    torch.testing.assert_close(t.singular_values.double(), ref_sv[:3], rtol=1e-4, atol=1e-4)


def test_rescale_is_scaling_the_delta() -> None:
    up, down = _pair(12, 9, 3, 11)
    for s in (0.0, 0.5, -1.0, 2.5):
        t = truncate(up, down, RankRule(rank=3), scale=s)
        torch.testing.assert_close(t.up @ t.down, s * up @ down, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_dense_svd_error_is_measured(method: str) -> None:
    g = _g(9)
    # a low-rank signal plus noise, so the spectrum decays
    a = torch.randn(300, 8, generator=g) @ torch.randn(8, 200, generator=g) + 0.01 * torch.randn(300, 200, generator=g)
    d = dense_svd(a, RankRule(rank=8), method=method)
    ref = _dense_sv(a)
    measured = float((a.double() - (d.up @ d.down).double()).norm())
    assert d.method == method and d.rank == 8
    assert d.error == pytest.approx(measured, rel=1e-4)
    # optimal (full) or near-optimal (randomized with power iterations)
    assert d.error >= float(ref[8:].norm()) * (1 - 1e-4)
    assert d.error <= float(ref[8:].norm()) * (1.0 + (1e-4 if method == "full" else 0.05))


def test_dense_svd_energy_rule_randomized() -> None:
    g = _g(10)
    a = torch.randn(400, 12, generator=g) @ torch.randn(12, 300, generator=g) + 1e-3 * torch.randn(400, 300, generator=g)
    d = dense_svd(a, RankRule(energy=0.999), method="randomized")
    assert d.retained_energy >= 0.999
    assert d.rank <= 12


def test_inner_products_and_interference_match_dense() -> None:
    a, b = _pair(20, 15, 4, 12), _pair(20, 15, 3, 13)
    da, db = a[0] @ a[1], b[0] @ b[1]
    assert inner_product(a, b) == pytest.approx(float((da * db).sum()), rel=1e-4)
    cos = float((da * db).sum() / (da.norm() * db.norm()))
    assert cosine_similarity(a, b) == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert cosine_similarity(a, a) == pytest.approx(1.0, abs=1e-6)
    # column-space overlap: 1 for a delta against itself (and any rescaling), ~0 for orthogonal spaces
    assert column_overlap(a, (3.0 * a[0], a[1])) == pytest.approx(1.0, abs=1e-5)
    q = torch.linalg.qr(torch.randn(20, 8, generator=_g(14)))[0]
    left, right = (q[:, :4], a[1]), (q[:, 4:7], b[1])
    assert column_overlap(left, right) == pytest.approx(0.0, abs=1e-6)
    # dense reference: mean squared cosine of principal angles
    qa = torch.linalg.qr(a[0])[0]
    qb = torch.linalg.qr(b[0])[0]
    ref = float(torch.linalg.svdvals(qa.T @ qb).pow(2).sum() / 3)
    assert column_overlap(a, b) == pytest.approx(ref, rel=1e-4)


def test_strength_fit_recovers_strengths() -> None:
    fit = StrengthFit(3)
    for seed in range(4):
        la, lb, lc = (_pair(16, 12, 2, 100 * seed + j) for j in range(3))
        deltas = [x[0] @ x[1] for x in (la, lb, lc)]
        diff = 0.8 * deltas[0] + 0.3 * deltas[1]
        fit.add_dense(diff, deltas)
    strengths, explained = fit.solve()
    assert strengths == pytest.approx([0.8, 0.3, 0.0], abs=1e-6)
    assert explained == pytest.approx(1.0, abs=1e-9)


def test_strength_fit_partial_explanation() -> None:
    fit = StrengthFit(1)
    a, noise = _pair(16, 12, 2, 1), _pair(16, 12, 2, 2)
    d_a = a[0] @ a[1]
    diff = 0.5 * d_a + noise[0] @ noise[1]
    fit.add_dense(diff, [d_a])
    (s,), explained = fit.solve()
    ref_s = float((diff * d_a).sum() / (d_a * d_a).sum())
    assert s == pytest.approx(ref_s, rel=1e-6)
    ref_expl = 1 - float(((diff - ref_s * d_a) ** 2).sum() / (diff ** 2).sum())
    assert explained == pytest.approx(ref_expl, rel=1e-6)
