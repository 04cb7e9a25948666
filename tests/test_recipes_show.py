"""``loratool recipe show`` on the output of every LoRA-writing command (rescale, resize, merge,
convert, extract) and of the same jobs run by ``loratool run``: the recipe it prints, run again into
another folder, writes the very same file, byte for byte (tensors, metadata, the record's ``created``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lora_tools.cli import cli
from lora_tools.io.safetensors import read_header
from tests.recipe_helpers import Assets

pytestmark = pytest.mark.slow  # each test runs its command and two recipe rebuilds on tiny models


def invoke(*args: object) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def tuned(recipe_assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``base_a`` with three weights changed (one UNet linear, one conv, one te1 projection): extract
    factorises only what differs, so this stays quick."""
    import torch
    from safetensors.torch import save_file

    from lora_tools.io.safetensors import TensorFile

    with TensorFile(recipe_assets.base_a) as f:
        tensors = {k: f.tensor(k).clone() for k in f.keys()}
    meta = dict(read_header(recipe_assets.base_a).metadata)
    changed = [k for k in tensors if k.endswith("attn1.to_q.weight") and k.startswith("model.diffusion_model.")][:1]
    changed += [k for k in tensors if k.endswith("in_layers.2.weight") and k.startswith("model.diffusion_model.")][:1]
    changed += [k for k in tensors if k.endswith("self_attn.q_proj.weight") and "conditioner.embedders.0" in k][:1]
    assert len(changed) == 3, changed
    g = torch.Generator().manual_seed(3)
    for k in changed:
        t = tensors[k]
        tensors[k] = (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(t.dtype)
    path = tmp_path_factory.mktemp("tuned") / "tuned.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def commands(a: Assets, tuned: Path) -> dict[str, tuple[list[object], dict[str, Path]]]:
    """Per command: its arguments before ``-o``, and the input name -> file the shown recipe will name."""
    lightning = a.lightning / "sdxl_lightning_4step_lora.safetensors"
    return {
        "rescale": (["rescale", a.style, "--strength", "0.6", "--components", "unet", "--dtype", "bf16"],
                    {"lora": a.style}),
        "resize": (["resize", a.style, "--rank", "2", "--conv-rank", "1", "--dtype", "fp16"], {"lora": a.style}),
        "merge": (["merge", lightning, f"{a.style}:0.4", "--method", "svd", "--rank", "3"],
                  {"lora1": lightning, "lora2": a.style}),
        "convert": (["convert", a.style, "--to", "comfy"], {"lora": a.style}),
        "extract": (["extract", tuned, a.base_a, "--rank", "2", "--components", "unet,te1", "--format", "comfy"],
                    {"tuned": tuned, "original": a.base_a}),
    }


def rebuild(shown: str, folder: Path, inputs: dict[str, Path]) -> None:
    """Save a shown recipe in ``folder`` and run it there (inputs given with ``--set``)."""
    folder.mkdir()
    recipe = folder / "rebuild.yaml"
    recipe.write_text(shown)
    sets = [x for name, path in inputs.items() for x in ("--set", f"{name}={path}")]
    invoke("run", recipe, "-q", *sets)


@pytest.mark.parametrize("command", ["rescale", "resize", "merge", "convert", "extract"])
def test_recipe_show_of_a_command_output_rebuilds_it_bit_for_bit(recipe_assets: Assets, tuned: Path,
                                                                 tmp_path: Path, command: str) -> None:
    args, inputs = commands(recipe_assets, tuned)[command]
    made = tmp_path / f"{command}-out.safetensors"
    report = json.loads(invoke(*args, "-o", made, "--json").stdout)
    if command == "extract":  # what differs, and only that, was extracted (te1 included)
        assert len(report["modules"]) == 3
    shown = invoke("recipe", "show", made).stdout
    record = json.loads(read_header(made).metadata["loratool"])
    assert record["operation"] == command and record["recipe"]["kind"] == command
    assert f"created: '{record['created']}'" in shown
    for name, path in inputs.items():  # every input named and pinned by its sha256
        sha = next(e["sha256"] for e in record["recipe"]["inputs"] if e["name"] == path.name)
        assert f"{name}:\n    path: {path.name}\n    sha256: {sha}" in shown
    rebuild(shown, tmp_path / "again", inputs)
    again = tmp_path / "again" / made.name
    assert again.read_bytes() == made.read_bytes()

    # the run's own output shows the same recipe, and that rebuilds it once more, elsewhere
    assert invoke("recipe", "show", again).stdout == shown
    rebuild(shown, tmp_path / "third", inputs)
    assert (tmp_path / "third" / made.name).read_bytes() == made.read_bytes()


def test_a_run_job_output_equals_the_command_output_but_for_created(recipe_assets: Assets, tmp_path: Path) -> None:
    """A job and its command write one record (the op's, with the job's recipe entry): only the time differs."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\ninputs: {{style: {recipe_assets.style}}}\n"
                      "jobs:\n  - {name: half, rescale: {lora: style, strength: 0.5, output: half.safetensors}}\n")
    invoke("run", recipe, "-q")
    invoke("rescale", recipe_assets.style, "--strength", "0.5", "-o", tmp_path / "cli" / "half.safetensors")
    job, cmd = (json.loads(read_header(p).metadata["loratool"])
                for p in (tmp_path / "half.safetensors", tmp_path / "cli" / "half.safetensors"))
    assert {k: v for k, v in job.items() if k != "created"} == {k: v for k, v in cmd.items() if k != "created"}
    # and a re-run of the recipe takes the command's file as up to date (same entry)
    (tmp_path / "half.safetensors").unlink()
    (tmp_path / "cli" / "half.safetensors").rename(tmp_path / "half.safetensors")
    assert "1 skipped." in invoke("run", recipe).stdout


def test_recipe_show_of_a_lora_op_record_without_options(tmp_path: Path) -> None:
    """A record of an op without the recipe entry (an older loratool) is one clear line, exit 1."""
    from safetensors.torch import save_file

    from lora_tools.io.safetensors import TensorFile
    from lora_tools.provenance import build_record, with_record
    from lora_tools.testing.synthetic_lora import write_lora

    plain = write_lora(tmp_path / "plain.safetensors", "micro", rank=2)
    with TensorFile(plain) as f:
        tensors = {k: f.tensor(k) for k in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=with_record({}, build_record("rescale", sources=[], params={"strength": 1})))
    result = CliRunner().invoke(cli, ["recipe", "show", str(old)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == (f"Error: {old}: made by 'rescale' without its options in the loratool record "
                                     "(an older loratool): no recipe can rebuild it")
