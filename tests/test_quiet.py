"""``-q`` on every command, with one meaning (README "Quiet output"): stdout carries only what was written, one
path per line (``recipe show``: the recipe itself); a command that writes nothing prints nothing; errors still print.

The table below has one row per command; a command added without a row fails
:func:`test_every_command_has_a_row`, so a new command cannot miss ``-q`` (nor ``--json``, parsed for each)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.cli._options import QUIET_HELP


def _leaves(group: click.Group, prefix: tuple[str, ...] = ()) -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out.update(_leaves(command, (*prefix, name)))
        else:
            out[" ".join((*prefix, name))] = command
    return out


COMMANDS = _leaves(cli)

Inputs = dict[str, Path]
#: Command -> (its argv, given the inputs and a fresh output folder; what ``-q`` prints: the paths written,
#: nothing, or the same as without ``-q``).
Row = tuple[Callable[[Inputs, Path], list[str]], str]
ROWS: dict[str, Row] = {
    "inspect": (lambda i, o: ["inspect", str(i["lora"])], "nothing"),
    "check": (lambda i, o: ["check", str(i["fused"])], "nothing"),
    "fuse": (lambda i, o: ["fuse", str(i["base"]), "--lightning", "4", "--preset-dir", str(i["lora"].parent),
                           "--save", "checkpoint", "--save", "unet", "-o", str(o / "f.safetensors")], "paths"),
    "presets": (lambda i, o: ["presets", "lightning-4step"], "nothing"),
    "verify": (lambda i, o: ["verify", str(i["fused"]), "--against", str(i["base"]), "--lora", f"{i['lora']}:1",
                             "--config", str(i["config"]), "--size", "32x32", "--prompt", "a cat", "--seeds", "0",
                             "--device", "cpu", "--dtype", "fp32", "--out", str(o / "check")], "paths"),
    "rescale": (lambda i, o: ["rescale", str(i["style"]), "--strength", "0.5", "-o", str(o / "r.safetensors")],
                "paths"),
    "resize": (lambda i, o: ["resize", str(i["style"]), "--rank", "2", "-o", str(o / "r.safetensors")], "paths"),
    "merge": (lambda i, o: ["merge", str(i["style"]), f"{i['lora']}:0.5", "-o", str(o / "m.safetensors")], "paths"),
    "convert": (lambda i, o: ["convert", str(i["style"]), "--to", "comfy", "-o", str(o / "c.safetensors")], "paths"),
    "extract": (lambda i, o: ["extract", str(i["fused"]), str(i["base"]), "--rank", "2", "-o",
                              str(o / "x.safetensors")], "paths"),
    "analyze": (lambda i, o: ["analyze", str(i["fused"]), "--base", str(i["base"]), "--lora", str(i["lora"])],
                "nothing"),
    "run": (lambda i, o: ["run", str(i["recipe"]), "--set", f"output_dir={o / 'out'}"], "paths"),
    "recipe show": (lambda i, o: ["recipe", "show", str(i["fused"])], "same"),
    "publish": (lambda i, o: ["publish", str(i["fused"]), "--license", "openrail++", "--release-dir",
                              str(o / "release")], "paths"),
    "demo": (lambda i, o: ["demo", "--dir", str(o / "demo"), "--no-render"], "paths"),
}
#: Rows that render or load diffusers' models, or take over a second: the full selection.
HEAVY = {"verify": (pytest.mark.diffusers, pytest.mark.slow), "demo": (pytest.mark.diffusers, pytest.mark.slow),
         "extract": (pytest.mark.slow,), "merge": (pytest.mark.slow,), "fuse": (pytest.mark.slow,),
         "analyze": (pytest.mark.slow,)}


def test_every_command_has_a_row() -> None:
    assert sorted(ROWS) == sorted(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_takes_q_with_one_meaning(name: str) -> None:
    options = [p for p in COMMANDS[name].params if isinstance(p, click.Option) and "-q" in p.opts]
    assert len(options) == 1, f"loratool {name} has no -q"
    assert options[0].opts == ["-q", "--quiet"] and options[0].help == QUIET_HELP


@pytest.fixture(scope="module")
def inputs(micro_verify: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    from lora_tools.testing.synthetic_lora import write_lora

    d = tmp_path_factory.mktemp("quiet")
    style = write_lora(d / "style.safetensors", "micro", fmt="kohya", rank=4, alpha=2.0, dtype="fp16", seed=3)
    recipe = d / "recipe.yaml"
    recipe.write_text(f"version: 1\ninputs:\n  style: {style}\njobs:\n  - name: half\n    rescale:\n"
                      "      lora: style\n      strength: 0.5\n      output: half.safetensors\n")
    return {**micro_verify, "style": style, "recipe": recipe}


@pytest.fixture(scope="module")
def diffusers_check_once() -> Iterator[None]:
    """The demo's step 4 (``compare_with_runtime_lora``: diffusers' own fusion of the LoRAs on the base, 2/3 of a
    ``demo --no-render`` run) computed once for the module's four demo runs. Its result depends only on the files'
    names and bytes (the fused file's ``__metadata__`` aside: it reads the tensors), which the demo writes the same on
    every run (fixed seeds): each call is keyed by them, and a run whose files differ computes its own."""
    from lora_tools.verify import weights

    real = weights.compare_with_runtime_lora
    results: dict[tuple[object, ...], object] = {}

    def once(base: Path, fused: Path, loras: list[tuple[Path, float]], **kwargs: object) -> object:
        key = (_content(base), _content(fused, metadata=False), tuple((_content(p), s) for p, s in loras),
               tuple(sorted(kwargs.items())))
        if key not in results:
            results[key] = real(base, fused, loras, **kwargs)  # type: ignore[arg-type]
        return results[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weights, "compare_with_runtime_lora", once)
        yield


@pytest.fixture(scope="module")
def demo_builds_once(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The demo's step 1 (the synthetic base and LoRAs, a third of a ``demo --no-render`` run once step 4 is shared)
    built once for the module's four demo runs: the builders are deterministic (fixed seeds, one generator per
    tensor), so each later call with the same arguments gets a copy of the first call's file at its own path."""
    from lora_tools.testing import synthetic, synthetic_lora

    store = tmp_path_factory.mktemp("demo-builds")
    built: dict[str, Path] = {}

    def once(real: Callable[..., Path]) -> Callable[..., Path]:
        def build(path: str | Path, *args: object, **kwargs: object) -> Path:
            key = repr((real.__name__, Path(path).name, args, sorted(kwargs.items())))
            if key not in built:
                built[key] = real(store / str(len(built)) / Path(path).name, *args, **kwargs)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return Path(shutil.copyfile(built[key], path))

        return build

    with pytest.MonkeyPatch.context() as patch:  # write_lightning_lora calls write_lora: one file, copied once
        patch.setattr(synthetic, "write_checkpoint", once(synthetic.write_checkpoint))
        patch.setattr(synthetic_lora, "write_lora", once(synthetic_lora.write_lora))
        yield


def _content(path: Path, metadata: bool = True) -> tuple[str, str]:
    """A safetensors file's name and a digest of its bytes (without its ``__metadata__`` when ``metadata`` is false)."""
    digest = hashlib.blake2b()
    with open(path, "rb") as f:
        size = f.read(8)
        header = json.loads(f.read(int.from_bytes(size, "little")))
        if not metadata:
            header.pop("__metadata__", None)
        digest.update(json.dumps(header, sort_keys=True).encode())
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return Path(path).name, digest.hexdigest()


def _invoke(argv: list[str]) -> tuple[str, str]:
    run = CliRunner().invoke(cli, argv)
    assert run.exit_code == 0, f"loratool {' '.join(argv)}\n{run.output}"
    return run.stdout, run.stderr


@pytest.mark.parametrize("name", [pytest.param(n, marks=HEAVY.get(n, ())) for n in sorted(ROWS)])
def test_quiet_prints_only_what_was_written(name: str, inputs: Inputs, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    monkeypatch.chdir(tmp_path)
    if name == "demo":
        request.getfixturevalue("diffusers_check_once")
        request.getfixturevalue("demo_builds_once")
    argv, rule = ROWS[name]
    loud_dir, quiet_dir = tmp_path / "loud", tmp_path / "quiet"
    loud_dir.mkdir()
    quiet_dir.mkdir()
    loud, _ = _invoke(argv(inputs, loud_dir))
    quiet, stderr = _invoke([*argv(inputs, quiet_dir), "-q"])
    assert loud.strip(), f"loratool {name} prints nothing without -q"
    if rule == "nothing":
        assert quiet == "" and stderr == ""
    elif rule == "same":
        assert quiet == loud
    else:
        lines = quiet.splitlines()
        assert lines and all(Path(p).exists() and Path(p).is_relative_to(quiet_dir) for p in lines), quiet
        named = {Path(p).relative_to(quiet_dir).parts[0] for p in lines}
        made = {p.name for p in quiet_dir.iterdir()}
        assert named == made, f"-q names {named}, the run made {made}"
        for p in lines:  # what -q prints, the summary names too (run's table: by file name)
            assert str(loud_dir / Path(p).relative_to(quiet_dir)) in loud or (name == "run" and Path(p).name in loud), p


@pytest.mark.parametrize("name", [pytest.param(n, marks=HEAVY.get(n, ())) for n in sorted(ROWS)])
def test_json_parses_on_every_command(name: str, inputs: Inputs, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    monkeypatch.chdir(tmp_path)
    if name == "demo":
        request.getfixturevalue("diffusers_check_once")
        request.getfixturevalue("demo_builds_once")
    argv, _ = ROWS[name]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    report = json.loads(_invoke([*argv(inputs, tmp_path / "a"), "--json"])[0])
    assert report, f"loratool {name} --json printed an empty report"
    quiet = json.loads(_invoke([*argv(inputs, tmp_path / "b"), "--json", "-q"])[0])  # -q leaves --json as it is
    assert (sorted(quiet) if isinstance(quiet, dict) else len(quiet)) == (
        sorted(report) if isinstance(report, dict) else len(report))
