"""Recipes end to end on tiny synthetic models: the shipped examples, matrix runs, skips and redos,
``recipe show`` round trips (bit for bit), hub inputs from a pre-filled cache, the executor.

The oracle for every recipe output is the same operation run through ``loratool fuse``: the
tensors must be identical, byte for byte.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lora_tools.cli import cli
from lora_tools.io.safetensors import TensorFile, read_header
from lora_tools.recipes import LocalExecutor, ResolvedJob, plan_recipe, run_recipe
from lora_tools.recipes.jobs import JobResult
from tests.fuse_helpers import fill_hub_cache, listing, sha256_of
from tests.recipe_helpers import REPO_RECIPES, Assets

pytestmark = pytest.mark.slow  # every test here fuses tiny models (a few seconds each on a busy box)


def invoke(*args: object) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def record_of(path: Path) -> dict:
    return json.loads(read_header(path).metadata["loratool"])


def tensor_bytes(path: Path) -> dict[str, bytes]:
    with TensorFile(path) as f:
        return {k: bytes(f.read_bytes(k)) for k in f.keys()}


def sets(a: Assets, **extra: Path | str) -> list[str]:
    out = ["--set", f"lightning={a.lightning}"]
    for k, v in extra.items():
        out += ["--set", f"{k}={v}"]
    return out


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.safetensors"))}


def test_lightning_4step_example_matches_loratool_fuse(recipe_assets: Assets, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dry = invoke("run", REPO_RECIPES / "lightning-4step.yaml", "--dry-run", *sets(recipe_assets, base=recipe_assets.base_a, output_dir=out))
    lines = dry.stdout.splitlines()
    assert lines[0] == f"Recipe: {REPO_RECIPES / 'lightning-4step.yaml'} (1 jobs, outputs in {out})"
    assert re.fullmatch(r"juggernaut-lightning-4step \(fuse\): run, peak memory about \d+\.\d MiB", lines[1])
    assert re.fullmatch(rf"  -> {re.escape(str(out))}/juggernaut-lightning-4step.safetensors \(about \d+\.\d MiB\)",
                        lines[2])
    assert lines[-1] == "Dry run: nothing was written." and not out.exists()
    invoke("run", REPO_RECIPES / "lightning-4step.yaml", *sets(recipe_assets, base=recipe_assets.base_a, output_dir=out))
    made = out / "juggernaut-lightning-4step.safetensors"
    oracle = tmp_path / "oracle.safetensors"
    invoke("fuse", recipe_assets.base_a, "--lightning", "4", "--lightning-dir", recipe_assets.lightning, "-o", oracle, "-q")
    assert tensor_bytes(made) == tensor_bytes(oracle)
    rec, want = record_of(made), record_of(oracle)
    assert {k: v for k, v in rec.items() if k != "created"} == {k: v for k, v in want.items() if k != "created"}
    assert rec["lightning_steps"] == 4 and rec["sources"][0]["sha256"] == sha256_of(recipe_assets.base_a)


def test_publisher_batch_matrix_skips_and_redos(recipe_assets: Assets, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", REPO_RECIPES / "publisher-batch.yaml", "--only", "base_*",  # the fuse jobs
            *sets(recipe_assets, base_a=recipe_assets.base_a, base_b=recipe_assets.base_b, output_dir=out)]
    dry = invoke(*args, "--dry-run", "--json")
    plan = json.loads(dry.stdout)
    assert [j["name"] for j in plan["jobs"]] == [f"base_{b}-{s}step" for b in "ab" for s in (2, 4, 8)]
    assert all(j["state"] == "run" and j["peak_bytes"] > 0 and j["outputs"][0]["bytes"] > 0 for j in plan["jobs"])
    assert not out.exists(), "a dry run wrote something"

    first = invoke(*args)
    names = {f"base_{b}-lightning-{s}step.safetensors" for b in "ab" for s in (2, 4, 8)}
    assert set(mtimes(out)) == names
    assert "6 done." in first.stdout
    for b, base in (("a", recipe_assets.base_a), ("b", recipe_assets.base_b)):
        for s in (2, 4, 8):
            rec = record_of(out / f"base_{b}-lightning-{s}step.safetensors")
            assert rec["lightning_steps"] == s and rec["output_dtype"] == "F16"
            assert rec["sources"][0] == {**rec["sources"][0], "name": base.name, "sha256": sha256_of(base)}
            assert rec["sources"][1]["name"] == f"sdxl_lightning_{s}step_lora.safetensors"
            assert rec["sampler"]["steps"] == s
    before = mtimes(out)

    # each output is what `loratool fuse` writes for the same job (here base_b at 8 steps)
    oracle = tmp_path / "oracle" / "base_b-lightning-8step.safetensors"
    invoke("fuse", recipe_assets.base_b, "--lightning", "8", "--lightning-dir", recipe_assets.lightning, "--dtype", "fp16",
           "-o", oracle, "-q")
    made = out / oracle.name
    assert tensor_bytes(made) == tensor_bytes(oracle)
    assert {k: v for k, v in record_of(made).items() if k != "created"} == \
        {k: v for k, v in record_of(oracle).items() if k != "created"}

    second = invoke(*args)
    assert "6 skipped." in second.stdout
    assert mtimes(out) == before, "a skipped job rewrote its output"


def test_changing_one_strength_redoes_exactly_the_affected_jobs(recipe_assets: Assets, tmp_path: Path) -> None:
    recipe = tmp_path / "batch.yaml"
    recipe.write_text(textwrap.dedent(f"""
        version: 1
        output_dir: out
        vars: {{strength_a: 1.0}}
        inputs: {{a: {recipe_assets.base_a}, b: {recipe_assets.base_b}, lightning: {recipe_assets.lightning}}}
        matrix: {{steps: [2, 4, 8]}}
        jobs:
          - name: a-${{steps}}
            fuse: {{base: a, lightning: "${{steps}}", strength: "${{strength_a}}", lightning_dir: lightning,
                    output: "a-${{steps}}.safetensors"}}
          - name: b-${{steps}}
            fuse: {{base: b, lightning: "${{steps}}", lightning_dir: lightning, output: "b-${{steps}}.safetensors"}}
        """))
    invoke("run", recipe)
    out = tmp_path / "out"
    before = mtimes(out)
    assert len(before) == 6
    dry = json.loads(invoke("run", recipe, "--set", "strength_a=0.5", "--dry-run", "--json").stdout)
    states = {j["name"]: j["state"] for j in dry["jobs"]}
    assert states == {"a-2": "redo", "a-4": "redo", "a-8": "redo", "b-2": "skip", "b-4": "skip", "b-8": "skip"}
    reason = next(j["reason"] for j in dry["jobs"] if j["name"] == "a-4")
    assert reason == "a-4.safetensors: sources[1].strength: 1.0 -> 0.5"
    result = invoke("run", recipe, "--set", "strength_a=0.5")
    after = mtimes(out)
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {"a-2.safetensors", "a-4.safetensors", "a-8.safetensors"}
    assert "3 done, 3 skipped." in result.stdout
    assert record_of(out / "a-4.safetensors")["sources"][1]["strength"] == 0.5


def test_style_merge_example_matches_loratool_fuse(recipe_assets: Assets, tmp_path: Path) -> None:
    out = tmp_path / "out"
    invoke("run", REPO_RECIPES / "lightning-style-merge.yaml", "--only", "base-lightning-style",
           *sets(recipe_assets, base=recipe_assets.base_a, style=recipe_assets.style, output_dir=out, style_strength="0.8"))
    oracle = tmp_path / "oracle.safetensors"
    invoke("fuse", recipe_assets.base_a, "--lightning", "4", "--lightning-dir", recipe_assets.lightning,
           "--lora", f"{recipe_assets.style}:0.8", "-o", oracle, "-q")
    made = out / "base-lightning-4step-style.safetensors"
    assert tensor_bytes(made) == tensor_bytes(oracle)
    assert record_of(made)["sources"][2]["strength"] == 0.8


@pytest.mark.smoke  # the default selection's Ray-free recipe chain
def test_distribution_example_chains_jobs(recipe_assets: Assets, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    recipe = ["run", REPO_RECIPES / "distribution.yaml",
              *sets(recipe_assets, base=recipe_assets.base_b, style=recipe_assets.style, output_dir=out)]
    args = [*recipe, "--only", "lightning-4step", "--only", "styled"]  # the fuse jobs (test_recipes_jobs: the others)
    dry = json.loads(invoke(*args, "--dry-run", "--json").stdout)
    assert [(j["name"], j["state"], j["depends_on"]) for j in dry["jobs"]] == [
        ("lightning-4step", "run", []), ("styled", "pending", ["lightning-4step"])]
    invoke(*args)
    assert set(mtimes(out)) == {"model-lightning-4step.safetensors", "model-lightning-4step-unet.safetensors",
                                "model-lightning-4step-style.safetensors"}
    oracle_dir = tmp_path / "oracle"
    invoke("fuse", recipe_assets.base_b, "--lightning", "4", "--lightning-dir", recipe_assets.lightning, "--dtype", "fp16",
           "--save", "checkpoint", "--save", "unet", "-o", oracle_dir / "m.safetensors", "-q")
    assert tensor_bytes(out / "model-lightning-4step.safetensors") == tensor_bytes(oracle_dir / "m.safetensors")
    assert tensor_bytes(out / "model-lightning-4step-unet.safetensors") == tensor_bytes(oracle_dir / "m-unet.safetensors")
    invoke("fuse", oracle_dir / "m.safetensors", "--lora", f"{recipe_assets.style}:0.8", "--dtype", "fp16",
           "-o", oracle_dir / "styled.safetensors", "-q")
    assert tensor_bytes(out / "model-lightning-4step-style.safetensors") == tensor_bytes(oracle_dir / "styled.safetensors")
    before = listing(out)
    again = invoke(*args)
    assert "2 skipped." in again.stdout and listing(out) == before
    only = json.loads(invoke(*recipe, "--only", "sty*", "--dry-run", "--json").stdout)
    assert [(j["name"], j["state"]) for j in only["jobs"]] == [("styled", "skip")]


def test_recipe_show_of_a_fuse_output_rebuilds_it_bit_for_bit(recipe_assets: Assets, tmp_path: Path) -> None:
    made = tmp_path / "fused.safetensors"
    invoke("fuse", recipe_assets.base_a, "--lightning", "4", "--lightning-dir", recipe_assets.lightning,
           "--lora", f"{recipe_assets.style}:0.7", "--dtype", "fp16", "-o", made, "-q")
    shown = invoke("recipe", "show", made).stdout
    recipe = tmp_path / "rebuild.yaml"
    recipe.write_text(shown)
    assert "created:" in shown and sha256_of(recipe_assets.style) in shown
    # the recipe names each input after its option: base, preset_dir (the Lightning folder), lora1 (the style)
    invoke("run", recipe, "-q", "--set", f"base={recipe_assets.base_a}", "--set", f"preset_dir={recipe_assets.lightning}",
           "--set", f"lora1={recipe_assets.style}", "--set", f"output_dir={tmp_path / 'again'}")
    rebuilt = tmp_path / "again" / "fused.safetensors"
    assert rebuilt.read_bytes() == made.read_bytes()

    # and the recipe of that run's output rebuilds it again, elsewhere
    recipe2 = tmp_path / "again.yaml"
    recipe2.write_text(invoke("recipe", "show", rebuilt).stdout)
    invoke("run", recipe2, "-q", "--set", f"base={recipe_assets.base_a}", "--set", f"preset_dir={recipe_assets.lightning}",
           "--set", f"lora1={recipe_assets.style}", "--set", f"output_dir={tmp_path / 'third'}")
    assert (tmp_path / "third" / "fused.safetensors").read_bytes() == made.read_bytes()


def test_recipe_show_pins_refuse_a_changed_input(recipe_assets: Assets, tmp_path: Path) -> None:
    made = tmp_path / "fused.safetensors"
    invoke("fuse", recipe_assets.base_a, "--lora", f"{recipe_assets.style}:0.5", "-o", made, "-q")
    recipe = tmp_path / "rebuild.yaml"
    recipe.write_text(invoke("recipe", "show", made).stdout)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--set", f"base={recipe_assets.base_b}",
                                      "--set", f"lora1={recipe_assets.style}", "--set", f"output_dir={tmp_path / 'x'}"])
    assert result.exit_code == 1
    assert "--set base: inputs.base: sha256 mismatch" in result.stderr
    assert not (tmp_path / "x").exists()


def test_hub_input_from_a_prefilled_cache(recipe_assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants as hf_constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    commit = "0123456789abcdef0123456789abcdef01234567"
    content = recipe_assets.style.read_bytes()
    fill_hub_cache(home / "hub", "someone/style-lora", "style.safetensors", content, commit=commit)
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(textwrap.dedent(f"""
        version: 1
        inputs:
          base: {recipe_assets.base_a}
          style: {{hub: someone/style-lora/style.safetensors, revision: {commit}, sha256: "{sha256_of(recipe_assets.style)}"}}
        jobs:
          - fuse: {{base: base, loras: [{{lora: style, strength: 0.5}}], output: hub-style.safetensors}}
        """))
    invoke("run", recipe, "-q")
    oracle = tmp_path / "oracle.safetensors"
    invoke("fuse", recipe_assets.base_a, "--lora", f"{recipe_assets.style}:0.5", "-o", oracle, "-q")
    assert tensor_bytes(tmp_path / "hub-style.safetensors") == tensor_bytes(oracle)

    bad = recipe.read_text().replace(sha256_of(recipe_assets.style), "f" * 64)
    recipe.write_text(bad)
    result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 1 and "inputs.style: sha256 mismatch" in result.stderr
    missing = bad.replace(commit, "fedcba9876543210fedcba9876543210fedcba98")
    recipe.write_text(missing)
    result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 1 and f"{recipe}:5:10: inputs.style: Cannot get 'style.safetensors'" in result.stderr


def test_a_failed_job_does_not_stop_the_others(recipe_assets: Assets, tmp_path: Path) -> None:
    """A job that fails while running fails alone; --fail-fast stops. (An output whose folder is a file
    is refused while planning, before any job runs; a job's own LoRA damaged after planning is not.)"""
    import shutil

    style = tmp_path / "style.safetensors"
    shutil.copyfile(recipe_assets.style, style)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        version: 1
        inputs: {{a: {recipe_assets.base_a}, style: {style}, good: {recipe_assets.style}}}
        jobs:
          - {{name: one, fuse: {{base: a, loras: [style], output: one.safetensors}}}}
          - {{name: two, fuse: {{base: a, loras: [{{lora: good, strength: 0.3}}], output: two.safetensors}}}}
        """))
    from lora_tools.recipes import LocalExecutor, plan_recipe, run_recipe

    plan = plan_recipe(recipe)
    with open(style, "r+b") as f:  # damaged after planning: job one fails when it runs
        f.truncate(style.stat().st_size // 2)
    results = run_recipe(plan, executor=LocalExecutor())
    assert [r.outcome for r in results] == ["failed", "done"] and "style.safetensors" in results[0].message
    (tmp_path / "two.safetensors").unlink()
    results = run_recipe(plan, executor=LocalExecutor(), fail_fast=True)
    assert [r.outcome for r in results] == ["failed", "not run"]
    assert not (tmp_path / "two.safetensors").exists()
    result = CliRunner().invoke(cli, ["run", str(recipe), "-q"])  # planned anew: refused before any job runs
    assert result.exit_code == 1 and "style.safetensors" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "one.safetensors").exists() and not (tmp_path / "two.safetensors").exists()


class RecordingExecutor:
    """An executor of our own: proves the interface is all run_recipe needs (as a Ray one would be)."""

    def __init__(self) -> None:
        self.seen: list[ResolvedJob] = []

    def execute(self, jobs, *, fail_fast=False, on_event=None) -> list[JobResult]:  # type: ignore[no-untyped-def]
        import pickle

        self.seen = [pickle.loads(pickle.dumps(j)) for j in jobs]  # jobs travel as plain data
        return LocalExecutor().execute(self.seen, fail_fast=fail_fast, on_event=on_event)


def test_library_api_and_a_custom_executor(recipe_assets: Assets, tmp_path: Path) -> None:
    plan = plan_recipe(REPO_RECIPES / "lightning-4step.yaml",
                       sets=[f"base={recipe_assets.base_b}", f"lightning={recipe_assets.lightning}", f"output_dir={tmp_path}"])
    assert plan.checks["juggernaut-lightning-4step"].state == "run"
    executor = RecordingExecutor()
    results = run_recipe(plan, executor=executor)
    assert [r.outcome for r in results] == ["done"] and [j.name for j in executor.seen] == ["juggernaut-lightning-4step"]
    assert record_of(tmp_path / "juggernaut-lightning-4step.safetensors")["sources"][0]["name"] == recipe_assets.base_b.name
