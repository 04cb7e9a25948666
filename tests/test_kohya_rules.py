"""resize's kohya-named rules against kohya sd-scripts' documented definitions (``networks/resize_lora.py``).

kohya's rule, as its code documents it, reimplemented here from the definition (not imported): the module's
unscaled delta ``up @ down`` is formed and fully factorised (``S``, all ``min(out, in)`` singular values);
an index is counted from ``S`` (``sv_ratio``: how many ``S > S[0] / X``; ``sv_fro``: the position where the
cumulative sum of ``S^2`` over its total first reaches ``X^2``, plus one; ``sv_cumulative``: the same on ``S``
itself with ``X``), clamped to ``[1, len(S) - 1]``; the new rank is that index PLUS ONE, rank 1 for a module
whose ``S[0] <= 1e-6``, and at most ``--new_rank``; on a module whose ``lora_down`` is 4-D (every convolution, 1x1
included), at most ``--new_conv_rank`` instead (default ``--new_rank``), and with no dynamic method exactly that.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_tools.cli import cli
from lora_tools.testing.synthetic_lora import write_lora

RANK = 8


def kohya_new_rank(s: torch.Tensor, method: str, param: float, new_rank: int) -> int:
    """kohya's ``rank_resize`` count for one module, from the definition."""
    n = len(s)
    if method == "sv_ratio":
        index = int((s > s[0] / param).sum())
    elif method == "sv_fro":
        sq = s ** 2
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), param ** 2)) + 1
    else:
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), param)) + 1
    rank = max(1, min(index, n - 1)) + 1
    if float(s[0]) <= 1e-6:
        return 1
    return min(rank, new_rank)


def _spectral_lora(path: Path, seed: int, targets: str = "attn") -> Path:
    """A micro kohya LoRA (rank 8, alpha 4) whose modules have decaying spectra of their own (random rates), so that
    the dynamic rules keep different ranks on different modules (``targets="lightning"``: convolutions too)."""
    write_lora(path, "micro", fmt="kohya", rank=RANK, alpha=4.0, seed=seed, targets=targets)
    tensors = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
        up_key = key.replace("lora_down", "lora_up")
        down_shape = tensors[key].shape
        out, inn = tensors[up_key].shape[0], tensors[key][0].numel()
        rate = 0.1 + 0.9 * float(torch.rand((), generator=g))
        s = torch.exp(-rate * torch.arange(RANK, dtype=torch.float32)) * (1 + 0.2 * torch.rand(RANK, generator=g))
        s = s.sort(descending=True).values
        qo = torch.linalg.qr(torch.randn(out, RANK, generator=g)).Q
        qi = torch.linalg.qr(torch.randn(inn, RANK, generator=g)).Q
        tensors[up_key] = (qo * s.sqrt()).reshape(tensors[up_key].shape).contiguous()
        tensors[key] = (s.sqrt()[:, None] * qi.T).reshape(down_shape).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _kohya_ranks(path: Path, method: str | None, param: float, new_rank: int,
                 new_conv_rank: int | None = None) -> dict[str, int]:
    """kohya's rank per module; ``method=None``: no dynamic method (``new_rank``, ``new_conv_rank`` on convolutions)."""
    t = load_file(str(path))
    out = {}
    for key in (k for k in t if k.endswith(".lora_down.weight")):
        down, up = t[key].float(), t[key.replace("lora_down", "lora_up")].float()
        cap = new_conv_rank if down.ndim == 4 and new_conv_rank is not None else new_rank  # kohya: 4-D lora_down
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)  # unscaled, as kohya
        s = torch.linalg.svd(delta).S
        out[key.removesuffix(".lora_down.weight")] = cap if method is None else kohya_new_rank(s, method, param, cap)
    return out


def _our_ranks(path: Path) -> dict[str, int]:
    with safe_open(str(path), "pt") as f:
        return {k.removesuffix(".lora_down.weight"): f.get_slice(k).get_shape()[0]
                for k in f.keys() if k.endswith(".lora_down.weight")}


@pytest.fixture(scope="module")
def spectral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _spectral_lora(tmp_path_factory.mktemp("kohya") / "spectral.safetensors", seed=3)


@pytest.fixture(scope="module")
def spectral_conv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Attention, feed-forward, 3x3 and 1x1 convolution modules (LoCon), each with a spectrum of its own."""
    return _spectral_lora(tmp_path_factory.mktemp("kohya") / "conv.safetensors", seed=5, targets="lightning")


@pytest.mark.parametrize(("method", "param"), [("sv_ratio", 4.0), ("sv_ratio", 20.0), ("sv_fro", 0.9),
                                               ("sv_fro", 0.99), ("sv_cumulative", 0.5), ("sv_cumulative", 0.9)])
@pytest.mark.parametrize("new_rank", [RANK, 4])
def test_resize_keeps_kohyas_rank_on_every_module(spectral: Path, tmp_path: Path, method: str, param: float,
                                                  new_rank: int) -> None:
    """``loratool resize --<method> X --max-rank N`` keeps, module by module, the rank kohya's ``--dynamic_method
    <method> --dynamic_param X --new_rank N`` keeps."""
    out = tmp_path / "out.safetensors"
    flag = "--" + method.replace("_", "-")
    run = CliRunner().invoke(cli, ["resize", str(spectral), flag, str(param), "--max-rank", str(new_rank),
                                   "-o", str(out)])
    assert run.exit_code == 0, run.output
    want = _kohya_ranks(spectral, method, param, new_rank)
    got = _our_ranks(out)
    assert got == want
    assert new_rank < RANK or len(set(want.values())) > 1  # the rule really varies over the modules


def test_default_cap_is_each_modules_rank(spectral: Path, tmp_path: Path) -> None:
    """Without --max-rank the cap is each module's own rank: kohya's count with ``--new_rank`` = the input rank."""
    out = tmp_path / "out.safetensors"
    run = CliRunner().invoke(cli, ["resize", str(spectral), "--sv-ratio", "6", "-o", str(out)])
    assert run.exit_code == 0, run.output
    assert _our_ranks(out) == _kohya_ranks(spectral, "sv_ratio", 6.0, RANK)


def test_kohya_keeps_one_rank_more_than_its_count_and_energy_is_ours(spectral: Path, tmp_path: Path) -> None:
    """The issue's sanity figures, on this LoRA: under kohya's names the mean rank is kohya's (one more than the
    count on every module its cap allows); ``--energy`` is our own rule, the bare count of ``sv_fro`` squared."""
    fro = tmp_path / "fro.safetensors"
    energy = tmp_path / "energy.safetensors"
    assert CliRunner().invoke(cli, ["resize", str(spectral), "--sv-fro", "0.9", "-o", str(fro)]).exit_code == 0
    assert CliRunner().invoke(cli, ["resize", str(spectral), "--energy", "0.81", "-o", str(energy)]).exit_code == 0
    kohya, ours_fro, ours_energy = _kohya_ranks(spectral, "sv_fro", 0.9, RANK), _our_ranks(fro), _our_ranks(energy)
    assert ours_fro == kohya
    for name, k in ours_energy.items():
        assert kohya[name] == min(k + 1, RANK) or (k == 1 and kohya[name] == 2)
    assert statistics.mean(kohya.values()) > statistics.mean(ours_energy.values()) + 0.5


def test_max_rank_with_a_fixed_rank_is_refused(spectral: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    run = CliRunner().invoke(cli, ["resize", str(spectral), "--rank", "4", "--max-rank", "4", "-o", str(out)])
    assert run.exit_code != 0 and "max_rank" not in run.stderr and "--max-rank" in run.stderr
    assert not out.exists()


def test_help_says_whose_rule_each_is() -> None:
    text = " ".join(CliRunner().invoke(cli, ["resize", "--help"]).output.split())
    assert "--energy FRACTION Ours (not kohya's)" in text
    for flag in ("sv-ratio RATIO", "sv-fro FRACTION", "sv-cumulative FRACTION"):
        assert f"--{flag} kohya's {flag.split()[0].replace('-', '_')}, exactly" in text


def test_a_recipe_takes_sv_cumulative_and_max_rank_as_the_command_does(spectral: Path, tmp_path: Path) -> None:
    """The new options come from the one declaration: a recipe's ``resize`` job takes them too, with the same result."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\noutput_dir: {tmp_path / 'out'}\njobs:\n"
                      f"  - resize: {{lora: {spectral}, sv_cumulative: 0.7, max_rank: 6, output: c.safetensors}}\n")
    run = CliRunner().invoke(cli, ["run", str(recipe), "-q"])
    assert run.exit_code == 0, run.output
    assert _our_ranks(tmp_path / "out" / "c.safetensors") == _kohya_ranks(spectral, "sv_cumulative", 0.7, 6)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "param", "new_rank", "new_conv_rank"), [
    pytest.param("sv_ratio", 4.0, RANK, 3, marks=pytest.mark.smoke), ("sv_fro", 0.95, 3, 6),
    ("sv_cumulative", 0.9, 4, None), ("sv_fro", 0.9, RANK, 2), ("sv_ratio", 20.0, 2, 5)])
def test_conv_rank_caps_the_dynamic_rule_on_convolutions_as_kohyas_new_conv_rank(
        spectral_conv: Path, tmp_path: Path, method: str, param: float, new_rank: int, new_conv_rank: int | None
) -> None:
    """``--<method> X --max-rank N --conv-rank C`` keeps kohya's ``--dynamic_method <method> --dynamic_param X
    --new_rank N --new_conv_rank C`` rank on every module: the rule capped at C on convolutions (1x1 included, even
    above N), at N elsewhere; without C, N everywhere."""
    out = tmp_path / "out.safetensors"
    args = ["resize", str(spectral_conv), "--" + method.replace("_", "-"), str(param), "--max-rank", str(new_rank),
            *(["--conv-rank", str(new_conv_rank)] if new_conv_rank else []), "-o", str(out)]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    want = _kohya_ranks(spectral_conv, method, param, new_rank, new_conv_rank)
    assert _our_ranks(out) == want
    conv = {k.removesuffix(".lora_down.weight") for k, v in load_file(str(spectral_conv)).items()
            if k.endswith(".lora_down.weight") and v.ndim == 4}
    assert any(k.endswith("skip_connection") for k in conv) and len(conv) < len(want)  # 1x1, 3x3 and linear modules
    if new_conv_rank:  # the cap really binds on the convolutions and differs from the linear modules' cap
        assert max(want[k] for k in conv) == new_conv_rank
        assert max(v for k, v in want.items() if k not in conv) <= new_rank


@pytest.mark.slow
def test_conv_rank_beside_a_fixed_rank_is_the_convolutions_fixed_rank(spectral_conv: Path, tmp_path: Path) -> None:
    """Without a dynamic rule, kohya's ``--new_rank 6 --new_conv_rank 2``: rank 2 on every convolution, 6 elsewhere."""
    out = tmp_path / "out.safetensors"
    run = CliRunner().invoke(cli, ["resize", str(spectral_conv), "--rank", "6", "--conv-rank", "2", "-o", str(out)])
    assert run.exit_code == 0, run.output
    assert _our_ranks(out) == _kohya_ranks(spectral_conv, None, 0.0, 6, 2)


@pytest.mark.slow
def test_a_recipe_takes_conv_rank_beside_a_dynamic_rule(spectral_conv: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\noutput_dir: {tmp_path / 'out'}\njobs:\n"
                      f"  - resize: {{lora: {spectral_conv}, sv_fro: 0.95, max_rank: 3, conv_rank: 5, "
                      f"output: c.safetensors}}\n")
    run = CliRunner().invoke(cli, ["run", str(recipe), "-q"])
    assert run.exit_code == 0, run.output
    assert _our_ranks(tmp_path / "out" / "c.safetensors") == _kohya_ranks(spectral_conv, "sv_fro", 0.95, 3, 5)
