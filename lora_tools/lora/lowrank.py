"""Pure low-rank maths for LoRA operations (resize, merge, extract, analyze); no file I/O.

Every function works on float32 2-D factors: ``up`` of shape ``(out, r)`` and ``down`` of shape
``(r, in)``, with the module's delta ``scale * up @ down``. Convolutions are flattened by the
caller (:func:`flatten_conv`, :func:`tucker_to_pair`) so the maths never sees 4-D tensors.

The central trick (resize, svd merge): the delta ``scale * up @ down`` is never formed. With
``up = Qu Ru`` and ``down^T = Qd Rd`` (thin QR), ``delta = Qu (scale Ru Rd^T) Qd^T``; the SVD of
the small ``r x r`` core ``scale Ru Rd^T = U S V^T`` gives the exact SVD of the delta,
``(Qu U) S (Qd V)^T``. Truncating it is therefore the optimal rank-``k`` approximation
(Eckart-Young), at ``O((out + in) r^2)`` cost instead of ``O(out in min(out, in))``.

Rank rules. ``rank`` is a fixed rank; ``energy`` (ours) keeps the smallest rank whose retained
squared Frobenius norm (energy) is at least ``F``. ``sv_ratio``, ``sv_fro`` and ``sv_cumulative`` are
kohya sd-scripts' dynamic rules (``networks/resize_lora.py``), exactly as kohya counts them: an
index from the singular values ``S`` (``sv_ratio``: how many ``S > s_max / X``; ``sv_fro``: the
smallest ``i`` with ``sum(S[:i]^2) / sum(S^2) >= X^2``, the threshold on ``S^2`` being the square of
the Frobenius fraction; ``sv_cumulative``: the smallest ``i`` with ``sum(S[:i]) / sum(S) >= X``, on
``S`` itself, not squared), at least 1, then ONE MORE rank is kept (kohya's ``index + 1``), capped at
the number of singular values and at ``max_rank`` (kohya's ``--new_rank``); a module whose largest
singular value is at most ``1e-6`` keeps rank 1.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

from lora_tools.errors import Hint, ShapeMismatchError, UsageError

__all__ = [
    "DenseSvd",
    "ModulePool",
    "RankRule",
    "StrengthFit",
    "Truncation",
    "column_overlap",
    "cosine_similarity",
    "dense_svd",
    "flatten_conv",
    "inner_product",
    "choose_rank",
    "kohya_index",
    "map_modules",
    "module_threads",
    "randomized_svd",
    "stack_factors",
    "truncate",
    "tucker_to_pair",
]

# Above this many elements a dense matrix is factorised by randomized SVD (extract).
RANDOMIZED_MIN_ELEMENTS = 1_000_000

T = TypeVar("T")
R = TypeVar("R")

_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


def _one_thread(fn: Callable[[T], R]) -> Callable[[T], R]:
    """``fn`` run with one torch (OpenMP, MKL) thread on the thread that calls it: a new thread
    starts with the OpenMP default, and MKL would otherwise split a LAPACK call on it (results
    then depend on timing)."""
    def run(x: T) -> R:
        if torch.get_num_threads() != 1 or not getattr(_local, "one", False):
            torch.set_num_threads(1)
            _local.one = True
        return fn(x)
    return run


_local = threading.local()


def _share_heap() -> None:
    """Let worker threads allocate from the main heap (glibc: ``M_ARENA_MAX`` = 1, where available).

    glibc gives each new thread a heap (arena) of its own and keeps what is freed there for that
    thread; per-module temporaries of tens of MB on every worker then stay resident (extract at
    full size: 2.8 GB instead of 1.7 GB). Large allocations are rare here, so one shared heap
    costs no measurable lock contention.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


@contextmanager
def module_threads() -> Iterator[int]:
    """One torch thread per task while inside, and the number of cores to spread tasks over.

    The per-module maths (QR, SVD and GEMMs of a few hundred rows) is far too small to share
    between OpenMP threads: their hand-offs cost more than the work, and on a busy machine the
    spinning threads take the cores from each other (a 1280 x 128 QR: 2.4 ms on one thread,
    20 ms on two under load). Independent modules on one thread each keep every core busy
    instead. Nested uses share one setting; the previous one comes back at the last exit.
    """
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield max(1, _threads_saved if _threads_saved > 0 else (os.cpu_count() or 1))
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def map_modules(fn: Callable[[T], R], items: Iterable[T], *, workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]``, the calls spread over the cores, one torch thread each.

    Each call must be independent of the others (its own inputs, its own result); torch
    releases the GIL inside its kernels, so threads suffice. Results come back in order and
    are the same, bit for bit, whatever the number of workers (each call runs on one thread).

    Args:
        fn: the per-module work.
        items: its inputs.
        workers: how many calls run at once (default: the torch threads set before, i.e. the cores).
    """
    with module_threads() as cores:
        n = workers if workers is not None else cores
        if n <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(n, thread_name_prefix="loratool-maths") as pool:
            return list(pool.map(_one_thread(fn), items))


#: kohya's ``MIN_SV``: a module whose largest singular value is at most this keeps rank 1 under kohya's rules.
KOHYA_MIN_SV = 1e-6
#: The rules named after kohya's ``--dynamic_method`` values, counted as kohya counts them.
KOHYA_RULES = ("sv_ratio", "sv_fro", "sv_cumulative")
_RULES = ("rank", "energy", *KOHYA_RULES)


@dataclass(frozen=True, slots=True)
class RankRule:
    """How to choose the kept rank from singular values; exactly one rule field is set.

    Attributes:
        rank: a fixed rank (capped at the number of singular values).
        energy: ours: keep the smallest rank retaining at least this fraction of the squared
            Frobenius norm, in ``(0, 1]``.
        sv_ratio: kohya's: one more than the number of singular values ``> s_max / sv_ratio``
            (``sv_ratio >= 1``).
        sv_fro: kohya's: one more than the smallest rank retaining at least this fraction of the
            Frobenius norm (``X^2`` of the squared norm), in ``(0, 1]``.
        sv_cumulative: kohya's: one more than the smallest rank whose singular values sum to at
            least this fraction of their total, in ``(0, 1]``.
        max_rank: an upper cap applied to the dynamic rules (kohya's ``--new_rank``, the input's rank).
    """

    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None
    sv_fro: float | None = None
    sv_cumulative: float | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        chosen = [n for n in _RULES if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise UsageError("more than one rank rule was given" if chosen else "no rank rule was given",
                             hint=Hint("rank", "", "N",
                                       alternatives=("energy", "sv_ratio", "sv_fro", "sv_cumulative")))
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"rank must be >= 1, got {self.rank}")
        for name in ("energy", "sv_fro", "sv_cumulative"):
            v = getattr(self, name)
            if v is not None and not (0.0 < v <= 1.0):
                raise UsageError(f"{name} must be in (0, 1], got {v}")
        if self.sv_ratio is not None and not self.sv_ratio >= 1.0:
            raise UsageError(f"sv_ratio must be >= 1, got {self.sv_ratio}")
        if self.max_rank is not None and self.max_rank < 1:
            raise UsageError(f"max_rank must be >= 1, got {self.max_rank}")

    @property
    def kohya(self) -> bool:
        """Whether this is one of kohya's dynamic rules (counted with kohya's ``+1``)."""
        return any(getattr(self, n) is not None for n in KOHYA_RULES)

    def capped(self, cap: int) -> RankRule:
        """This rule with its rank capped at ``cap`` (a fixed rank: ``min(rank, cap)``; a dynamic rule: ``max_rank``)."""
        if self.rank is not None:
            return RankRule(rank=min(self.rank, cap))
        fields = {n: getattr(self, n) for n in _RULES if getattr(self, n) is not None}
        return RankRule(**fields, max_rank=min(cap, self.max_rank) if self.max_rank else cap)

    def describe(self) -> dict[str, float | int]:
        """The rule as a plain dict (for reports and provenance records)."""
        return {k: getattr(self, k) for k in (*_RULES, "max_rank") if getattr(self, k) is not None}


def kohya_index(s: Tensor, rule: RankRule, *, total: float | None = None) -> int | None:
    """kohya's index (before its ``+1``) of a dynamic rule, from descending singular values ``s``.

    ``total`` is the sum of all squared singular values when ``s`` is only the head of the spectrum
    (a randomized sketch); then ``None`` means the index may lie beyond ``s`` (and ``sv_cumulative``,
    which needs the sum of every singular value, always answers ``None``).
    """
    s = s.to(torch.float64)
    if rule.sv_ratio is not None:
        return int((s > s[0] / rule.sv_ratio).sum())
    if rule.sv_fro is not None:
        sq = s * s
        cum = torch.cumsum(sq, 0) / (sq.sum() if total is None else total)
        i = int(torch.searchsorted(cum, torch.tensor(rule.sv_fro ** 2, dtype=torch.float64))) + 1
    else:
        assert rule.sv_cumulative is not None
        if total is not None:
            return None
        cum = torch.cumsum(s, 0) / s.sum()
        i = int(torch.searchsorted(cum, torch.tensor(rule.sv_cumulative, dtype=torch.float64))) + 1
    return i if total is None or i <= s.numel() else None


def choose_rank(s: Tensor, rule: RankRule, *, scale: float = 1.0) -> int:
    """The number of singular values to keep under `rule`.

    Args:
        s: singular values, descending, 1-D.
        rule: the rank rule.
        scale: ``s`` are the singular values of ``scale * M``; kohya's zero-module test
            (``s_max(M) <= 1e-6``: rank 1) is on ``M``'s, as kohya resizes the unscaled ``up @ down``.

    Returns:
        The kept rank, between 1 and ``len(s)`` (0 only when ``s`` is empty or all zero).
    """
    n = int(s.numel())
    if n == 0:
        return 0
    s = s.to(torch.float64)
    if float(s[0]) == 0.0:
        return 0
    if rule.rank is not None:
        k = min(rule.rank, n)
    elif rule.energy is not None:
        sq = s * s
        cum = torch.cumsum(sq, 0) / sq.sum()
        # smallest k with cum[k-1] >= target (tolerance for target == 1.0 vs rounding)
        k = int(torch.searchsorted(cum, torch.tensor(rule.energy - 1e-12, dtype=torch.float64))) + 1
    elif float(s[0]) / abs(scale) <= KOHYA_MIN_SV:
        k = 1
    else:
        index = kohya_index(s, rule)
        assert index is not None
        k = max(1, index) + 1
    k = max(1, min(k, n))
    if rule.max_rank is not None:
        k = min(k, rule.max_rank)
    return k


@dataclass(frozen=True, slots=True)
class Truncation:
    """A rank-``rank`` approximation ``up @ down`` of a delta, with what it lost.

    Attributes:
        up: ``(out, rank)`` float32; the singular values are split evenly (``sqrt``) between
            the two factors, so ``up @ down`` is the approximation with scale 1 (alpha = rank).
        down: ``(rank, in)`` float32.
        singular_values: all singular values of the input delta, descending.
        rank: the kept rank.
    """

    up: Tensor
    down: Tensor
    singular_values: Tensor
    rank: int

    @property
    def total_energy(self) -> float:
        """Squared Frobenius norm of the input delta."""
        return float((self.singular_values.double() ** 2).sum())

    @property
    def retained_energy(self) -> float:
        """Fraction of the squared Frobenius norm kept, in [0, 1] (1.0 for a zero delta)."""
        total = self.total_energy
        if total == 0.0:
            return 1.0
        return float((self.singular_values[: self.rank].double() ** 2).sum()) / total

    @property
    def error(self) -> float:
        """Frobenius norm of the dropped part: ``||delta - up @ down||_F``."""
        return float(self.singular_values[self.rank:].double().norm())

    @property
    def relative_error(self) -> float:
        """``error / ||delta||_F`` (0.0 for a zero delta)."""
        total = math.sqrt(self.total_energy)
        return self.error / total if total > 0 else 0.0


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _check_pair(up: Tensor, down: Tensor) -> None:
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ShapeMismatchError(
            f"low-rank factors do not chain: up {tuple(up.shape)} @ down {tuple(down.shape)}; "
            "expected up (out, r) and down (r, in)"
        )


def _split(u: Tensor, s: Tensor, vh: Tensor, k: int) -> tuple[Tensor, Tensor]:
    root = s[:k].clamp_min(0).sqrt()
    return (u[:, :k] * root).contiguous(), (root[:, None] * vh[:k]).contiguous()


def truncate(up: Tensor, down: Tensor, rule: RankRule, *, scale: float = 1.0) -> Truncation:
    """Optimal low-rank truncation of ``scale * up @ down`` without forming the delta.

    Thin QR of ``up`` and ``down^T``, SVD of the ``r x r`` core, truncation by `rule`.

    Args:
        up: ``(out, r)`` factor.
        down: ``(r, in)`` factor.
        rule: how to choose the kept rank.
        scale: the module's scale (``alpha / rank`` times any strength).

    Returns:
        The truncation; its singular values are those of the dense SVD of the delta.

    Raises:
        ShapeMismatchError: the factors do not chain.
    """
    _check_pair(up, down)
    up, down = _f32(up), _f32(down)
    qu, ru = torch.linalg.qr(up)  # (out, r'), (r', r)
    qd, rd = torch.linalg.qr(down.T)  # (in, r''), (r'', r)
    core = scale * (ru @ rd.T)  # (r', r'')
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    k = choose_rank(s, rule, scale=scale)
    new_up, new_down = _split(qu @ u[:, :k], s, vh[:k] @ qd.T, k)  # only the kept directions are formed
    return Truncation(up=new_up, down=new_down, singular_values=s, rank=k)


def stack_factors(terms: Sequence[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """Concatenate factors so that ``up @ down == sum_i w_i * up_i @ down_i`` exactly.

    Args:
        terms: ``(up_i, down_i, w_i)`` with ``w_i`` the full multiplier of that term (module
            scale times merge weight). Every ``up_i`` has the same rows, every ``down_i`` the
            same columns.

    Returns:
        ``(up, down)`` of rank ``sum r_i``; the weights are folded into the up factors.

    Raises:
        ShapeMismatchError: the terms target different shapes.
    """
    if not terms:
        raise ValueError("stack_factors needs at least one term")
    out, inn = terms[0][0].shape[0], terms[0][1].shape[1]
    ups, downs = [], []
    for up, down, w in terms:
        _check_pair(up, down)
        if up.shape[0] != out or down.shape[1] != inn:
            raise ShapeMismatchError(
                f"cannot stack a ({up.shape[0]}, {down.shape[1]}) delta with a ({out}, {inn}) one"
            )
        ups.append(_f32(up) * float(w))
        downs.append(_f32(down))
    return torch.cat(ups, 1), torch.cat(downs, 0)


def flatten_conv(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """LoRA/LoCon factors as 2-D matrices, with the delta's weight shape.

    ``up`` ``(out, r[, 1, 1])``, ``down`` ``(r, in[, kh, kw])`` -> ``(out, r)``, ``(r, in*kh*kw)``
    and the weight shape ``(out, in[, kh, kw])``; the flattening is the row-major one conv
    weights use, so ``(up2 @ down2).reshape(shape)`` is the delta.
    """
    shape = (int(up.shape[0]),) + tuple(int(d) for d in down.shape[1:])
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1), shape


def tucker_to_pair(up: Tensor, mid: Tensor, down: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """A Tucker (LoCon ``mid``) conv as a plain pair, through its factors.

    ``up`` ``(out, r')``, ``mid`` ``(r', r, kh, kw)``, ``down`` ``(r, in[, 1, 1])``: the delta is
    ``up @ M`` with ``M[a, (i, k, l)] = sum_b mid[a, b, k, l] down[b, i]``, of shape
    ``(r', in*kh*kw)``; the dense ``(out, in*kh*kw)`` delta is never formed.
    """
    up2 = _f32(up).reshape(up.shape[0], -1)
    down2 = _f32(down).reshape(down.shape[0], -1)
    m = torch.einsum("abkl,bi->aikl", _f32(mid), down2)
    return up2, m.reshape(m.shape[0], -1), (int(up.shape[0]), int(down2.shape[1])) + tuple(mid.shape[2:])


class ModulePool(Generic[T, R]):
    """Per-module work fed one item at a time (e.g. while a model streams in), run on every core
    with one torch thread each; ``done(result)`` is called on the feeding thread, in the order
    the items came, and at most ``depth`` items wait or run at once (memory stays bounded).

    Example:
        >>> with ModulePool(factorise, results.append) as pool:
        ...     for x in stream():
        ...         pool.submit(x)
    """

    def __init__(self, fn: Callable[[T], R], done: Callable[[R], None], *, depth: int | None = None):
        self.fn, self.done, self.depth = fn, done, depth
        self._run = _one_thread(fn)
        self._pending: deque[Future[R]] = deque()

    def __enter__(self) -> ModulePool[T, R]:
        _share_heap()
        self._threads = module_threads()
        cores = self._threads.__enter__()
        self._pool = ThreadPoolExecutor(cores, thread_name_prefix="loratool-maths")
        self.depth = self.depth or cores + 1
        return self

    def submit(self, item: T) -> None:
        self._pending.append(self._pool.submit(self._run, item))
        while len(self._pending) > (self.depth or 1):
            self.done(self._pending.popleft().result())

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                while self._pending:
                    self.done(self._pending.popleft().result())
        finally:
            for f in self._pending:
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._threads.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------
# Dense matrices (extract)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DenseSvd:
    """A low-rank approximation of a dense matrix, with its error measured.

    Attributes:
        up: ``(out, rank)`` (``sqrt`` of the singular values folded in).
        down: ``(rank, in)``.
        rank: the kept rank.
        method: ``full`` (``torch.linalg.svd``) or ``randomized`` (``torch.svd_lowrank``).
        total_energy: ``||A||_F^2``.
        error: ``||A - up @ down||_F``, computed from the residual, not from singular values.
    """

    up: Tensor
    down: Tensor
    rank: int
    method: str
    total_energy: float
    error: float

    @property
    def retained_energy(self) -> float:
        """``1 - error^2 / ||A||_F^2`` (1.0 for a zero matrix)."""
        if self.total_energy == 0.0:
            return 1.0
        return max(0.0, 1.0 - self.error ** 2 / self.total_energy)

    @property
    def relative_error(self) -> float:
        t = math.sqrt(self.total_energy)
        return self.error / t if t > 0 else 0.0


def dense_svd(matrix: Tensor, rule: RankRule, *, method: str = "auto", oversample: int = 10,
              power_iters: int = 2, seed: int = 0) -> DenseSvd:
    """Low-rank approximation of a dense 2-D matrix (a weight difference).

    ``method="auto"`` uses the full SVD for small matrices and ``torch.svd_lowrank`` (randomized
    range finder with `oversample` extra columns and `power_iters` power iterations) for those
    over ``RANDOMIZED_MIN_ELEMENTS`` elements. With a dynamic rule (``energy``...) the
    randomized sketch is enlarged until the rule is met or the sketch reaches ``min(out, in)``
    (then the full SVD is used). The reported error is measured on the residual.

    Args:
        matrix: ``(out, in)``.
        rule: the rank rule.
        method: ``auto``, ``full`` or ``randomized``.
        oversample: extra sketch columns for the randomized SVD.
        power_iters: power iterations for the randomized SVD.
        seed: seed of the random sketch (results are reproducible).

    Returns:
        The factors and their measured error.
    """
    if matrix.ndim != 2:
        raise ShapeMismatchError(f"dense_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    a = _f32(matrix)
    total = float(torch.linalg.vector_norm(a, dtype=torch.float64)) ** 2  # fp64 sum, no fp64 copy
    small = min(a.shape)
    if method not in ("auto", "full", "randomized"):
        raise UsageError(f"unknown svd method {method!r}; expected auto, full or randomized")
    use_full = method == "full" or (method == "auto" and a.numel() <= RANDOMIZED_MIN_ELEMENTS)
    if not use_full:
        target = rule.rank if rule.rank is not None else max(8, small // 16)
        while True:
            q = min(small, target + oversample)
            if q >= small:
                use_full = True
                break
            u, s, v = randomized_svd(a, q, power_iters, seed)
            k = choose_rank(s, rule) if rule.rank is not None else _dynamic_rank_on_sketch(s, total, rule)
            if k is not None:
                k = min(k, q)
                up, down = _split(u, s, v.T, k)
                break
            target *= 2
    if use_full:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        k = choose_rank(s, rule)
        up, down = _split(u, s, vh, k)
        name = "full"
    else:
        name = "randomized"
    err = _residual_norm(a, up, down)
    assert k is not None  # the full SVD always chooses a rank; a sketch loop leaves only with one
    return DenseSvd(up=up, down=down, rank=k, method=name, total_energy=total, error=err)


#: Rows of the residual formed at once (``_residual_norm``): about 1 MiB of fp32, cache-sized.
_RESIDUAL_ELEMS = 256 * 1024


def _residual_norm(a: Tensor, up: Tensor, down: Tensor) -> float:
    """``||a - up @ down||_F``, measured (not inferred from singular values), a cache-sized row
    block at a time: no temporary the size of ``a``."""
    step = max(1, _RESIDUAL_ELEMS // max(1, a.shape[1]))
    total = 0.0
    for r0 in range(0, a.shape[0], step):
        block = torch.addmm(a[r0:r0 + step], up[r0:r0 + step], down, alpha=-1)
        total += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
    return math.sqrt(total)


def randomized_svd(a: Tensor, q: int, power_iters: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``q`` randomized SVD ``a ~ u diag(s) v^T`` (Halko, Martinsson and Tropp 2011,
    algorithms 4.4 and 5.1: a Gaussian sketch, ``power_iters`` subspace iterations with
    re-orthonormalisation, the exact SVD of the small projection).

    The sketch comes from a generator of its own seeded with ``seed``, so results are
    reproducible and the call is safe beside others on other threads (it neither reads nor
    moves torch's global random state). With the same seed the sketch is the one
    ``torch.manual_seed(seed); torch.svd_lowrank(a, q, power_iters)`` draws.

    Returns:
        ``u`` ``(m, q)``, ``s`` ``(q,)`` descending, ``v`` ``(n, q)``.
    """
    m, n = a.shape
    x = a.mH if m < n else a  # tall
    gen = torch.Generator().manual_seed(seed)
    sketch = torch.randn(x.shape[1], q, dtype=x.dtype, generator=gen)
    basis = torch.linalg.qr(x @ sketch).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(x.mH @ basis).Q
        basis = torch.linalg.qr(x @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mH @ x, full_matrices=False)
    left, right = basis @ u, vh.mH
    return (right, s, left) if m < n else (left, s, right)


def _dynamic_rank_on_sketch(s: Tensor, total: float, rule: RankRule) -> int | None:
    """Rank for a dynamic rule from a partial spectrum, or None if the sketch is too small."""
    if total == 0.0:
        return 1
    if rule.kohya:
        if float(s[0]) <= KOHYA_MIN_SV:
            return 1
        index = kohya_index(s, rule, total=total)
        if index is None or index + 1 >= s.numel():  # the count may go on beyond the sketch
            return None
        k = max(1, index) + 1
    else:
        cum = torch.cumsum(s.double() ** 2, 0) / total
        hit = (cum >= rule.energy - 1e-12).nonzero()  # type: ignore[operator]
        if hit.numel() == 0:
            return None
        k = int(hit[0]) + 1
    return min(k, rule.max_rank) if rule.max_rank is not None else k


# --------------------------------------------------------------------------------------------
# Inner products through factors (analyze)
# --------------------------------------------------------------------------------------------


def inner_product(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> float:
    """Frobenius inner product ``<ua @ da, ub @ db>`` through the factors.

    ``tr(da^T ua^T ub db) = sum((ua^T ub) * (da db^T))``: cost ``O((out + in) ra rb)``.
    """
    ua, da = (_f32(t) for t in a)
    ub, db = (_f32(t) for t in b)
    return float(((ua.T @ ub).double() * (da @ db.T).double()).sum())


def cosine_similarity(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> float:
    """Cosine similarity of two low-rank deltas (0.0 if either is zero)."""
    na, nb = inner_product(a, a), inner_product(b, b)
    if na <= 0.0 or nb <= 0.0:
        return 0.0
    return inner_product(a, b) / math.sqrt(na * nb)


def _col_basis(up: Tensor, down: Tensor, tol: float = 1e-6) -> Tensor:
    qu, ru = torch.linalg.qr(_f32(up))
    qd, rd = torch.linalg.qr(_f32(down).T)
    u, s, _ = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    keep = s > tol * (s[0] if s.numel() else 0)
    return (qu @ u)[:, keep]


def column_overlap(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> float:
    """Overlap of two deltas' column spaces, in [0, 1].

    The mean squared cosine of the principal angles: ``||Qa^T Qb||_F^2 / min(ra, rb)`` with
    ``Qa``, ``Qb`` orthonormal bases of the column spaces (the output directions the deltas
    write to). 1.0: one space contains the other; 0.0: orthogonal.
    """
    qa, qb = _col_basis(*a), _col_basis(*b)
    k = min(qa.shape[1], qb.shape[1])
    if k == 0:
        return 0.0
    return float((qa.T @ qb).double().pow(2).sum()) / k


class StrengthFit:
    """Least-squares fit of a difference onto one or more deltas, accumulated module by module.

    Solves ``min_s ||D - sum_j s_j L_j||_F^2`` over every module added (overall) and per group
    (for example per block). Add each module's Gram entries with :meth:`add`.

    Args:
        n: number of candidate deltas.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.gram = torch.zeros(n, n, dtype=torch.float64)
        self.rhs = torch.zeros(n, dtype=torch.float64)
        self.diff_energy = 0.0

    def add(self, gram: Tensor, rhs: Tensor, diff_energy: float) -> None:
        """Add one module: ``gram[j, k] = <L_j, L_k>``, ``rhs[j] = <L_j, D>``, ``||D||^2``."""
        self.gram += gram.double()
        self.rhs += rhs.double()
        self.diff_energy += float(diff_energy)

    def add_dense(self, diff: Tensor, deltas: Sequence[Tensor]) -> None:
        """Add one module from dense tensors (the difference and each candidate's delta)."""
        d = _f32(diff).double().reshape(-1)
        ls = [_f32(x).double().reshape(-1) for x in deltas]
        g = torch.tensor([[float(x @ y) for y in ls] for x in ls], dtype=torch.float64)
        r = torch.tensor([float(x @ d) for x in ls], dtype=torch.float64)
        self.add(g, r, float(d @ d))

    def solve(self) -> tuple[list[float], float]:
        """The strengths and the fraction of the difference's energy they explain.

        Returns:
            ``(strengths, explained)``; a candidate with a zero delta gets strength 0.0, and
            ``explained`` is ``1 - ||D - sum s_j L_j||^2 / ||D||^2`` (0.0 when D is zero).
        """
        active = torch.diag(self.gram) > 0
        s = torch.zeros(self.n, dtype=torch.float64)
        if bool(active.any()):
            g = self.gram[active][:, active]
            s[active] = torch.linalg.lstsq(g, self.rhs[active].unsqueeze(1)).solution.squeeze(1)
        if self.diff_energy <= 0.0:
            return s.tolist(), 0.0
        residual = self.diff_energy - 2 * float(s @ self.rhs) + float(s @ self.gram @ s)
        return s.tolist(), max(0.0, 1.0 - residual / self.diff_energy)
