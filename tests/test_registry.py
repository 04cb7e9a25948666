"""The operation registry is the one declaration: every operation has a command, a recipe kind, a job
adapter and a record entry, all derived from it; a fuse's record rebuilds it byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lora_tools.cli import cli
from lora_tools.cli._generate import generated_fields
from lora_tools.ops.registry import OPS, cli_spec
from lora_tools.recipes.registry import ADAPTERS
from lora_tools.recipes.schema import JOB_KINDS, OUTPUT_KEYS, Job

_FLAG = re.compile(r"^  (?:(-\w), )?(--[\w-]+)(?:, (--[\w-]+))?", re.M)


def help_flags(name: str) -> set[str]:
    """The long flags ``loratool NAME --help`` lists (aliases included)."""
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    return {f for m in _FLAG.finditer(result.stdout) for f in m.groups()[1:] if f}


def declared_flags(name: str) -> set[str]:
    """The long flags the operation's options model declares for its command."""
    op = OPS[name]
    flags: set[str] = set()
    for field, info in op.options_model.model_fields.items():
        spec = cli_spec(info)
        if spec["argument"] or not spec["command"]:
            continue
        flags |= {f for f in (spec["flags"] or ["--" + field.replace("_", "-")]) if f.startswith("--")}
    return flags


def test_every_operation_has_a_command_a_recipe_kind_and_an_adapter() -> None:
    assert list(JOB_KINDS) == list(OPS)
    for name, op in OPS.items():
        assert name in cli.commands, f"no command for {name}"
        assert name in Job.model_fields, f"no recipe kind for {name}"
        assert ADAPTERS[name].kind == name
        assert OUTPUT_KEYS[name] == op.output_keys[0]
        assert set(op.input_keys) <= set(op.options_model.model_fields)


@pytest.mark.parametrize("name", list(OPS))
def test_help_options_and_recipe_keys_come_from_one_declaration(name: str) -> None:
    op = OPS[name]
    command = cli.commands[name]
    generated = {f.name for f in generated_fields(op)}
    run_controls = {str(p.name) for p in command.params} - generated
    control_flags = {f for p in command.params if p.name in run_controls for f in (*p.opts, *p.secondary_opts)
                     if f.startswith("--")}
    # --help shows the declared options, plus the command's own run controls (not recorded), and nothing else
    assert help_flags(name) - control_flags - {"--help"} == declared_flags(name)
    assert run_controls <= {"overwrite", "as_json", "dry_run", "quiet", "prompts_file", "compile_"}
    # the recipe job takes exactly the declared options, under the same names
    recipe_model = Job.model_fields[name].annotation.__args__[0]
    assert list(recipe_model.model_fields) == list(op.options_model.model_fields)
    assert generated <= set(recipe_model.model_fields)
    # and the record entry names every option but the output
    entry_keys = set(op.options_model.model_fields) - set(op.output_keys)
    assert generated - set(op.output_keys) <= entry_keys


def test_a_recipe_fuse_takes_every_option_of_the_command() -> None:
    """The drift the registry ended: preset_dir, saves diffusers, verify_output, workflow, hash_base, variant..."""
    job = Job.model_validate({"fuse": {"base": "b", "preset": "lightning-4step", "preset_dir": "d",
                                       "saves": ["checkpoint", "diffusers"], "verify_output": True, "workflow": True,
                                       "hash_base": True, "variant": "fp16", "revision": "main",
                                       "allow_unmatched": True, "output": "o.safetensors"}})
    assert job.kind == "fuse" and job.options.saves == ["checkpoint", "diffusers"]
    old = Job.model_validate({"fuse": {"base": "b", "lightning": 4, "lightning_dir": "d", "output": "o.safetensors"}})
    assert old.options.preset_dir == "d" and old.options.preset_name == "lightning-4step"


def test_fuse_outputs_are_named_once() -> None:
    from lora_tools.ops.fuse_plan import output_paths

    opts = {"saves": ["checkpoint", "unet", "diffusers"], "output": "/o/m.safetensors"}
    assert OPS["fuse"].output_paths(opts) == ("/o/m.safetensors", "/o/m-unet.safetensors", "/o/m-diffusers")
    assert [str(p) for _, p in output_paths(["unet"], "/o/u.safetensors")] == ["/o/u.safetensors"]


def invoke(*args: object) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.mark.slow
def test_recipe_show_of_a_fuse_with_every_option_rebuilds_it_byte_for_byte(tmp_path: Path) -> None:
    """A fuse of a diffusers-folder base (a variant) with a preset dir, a revision and --allow-unmatched:
    ``recipe show`` gives a recipe that ``loratool run`` turns into the very same file."""
    from safetensors.torch import save_file

    from lora_tools.io.safetensors import TensorFile, read_header
    from lora_tools.testing.synthetic import write_diffusers_folder
    from lora_tools.testing.synthetic_lora import write_lightning_lora, write_lora

    src = tmp_path / "inputs"
    base = write_diffusers_folder(src / "pipe", "tiny", dtype="fp32", variant="fp16")
    lightning = src / "lightning"
    lightning.mkdir()
    write_lightning_lora(lightning / "sdxl_lightning_4step_lora.safetensors", "tiny", seed=14, rank=4)
    style = write_lora(tmp_path / "style.safetensors", "tiny", targets="attn", rank=4, seed=7)
    with TensorFile(style) as f:  # one module with no target in the base: needs --allow-unmatched
        tensors = {k: f.tensor(k) for k in f.keys()}  # noqa: SIM118
    down = next(k for k in tensors if k.endswith(".lora_down.weight"))
    tensors["lora_unet_no_such_block.lora_down.weight"] = tensors[down].clone()
    tensors["lora_unet_no_such_block.lora_up.weight"] = tensors[down.replace("lora_down", "lora_up")].clone()
    odd = src / "odd.safetensors"
    save_file(tensors, str(odd), dict(read_header(style).metadata))

    made = tmp_path / "made" / "fused.safetensors"
    made.parent.mkdir()
    invoke("fuse", base, "--variant", "fp16", "--lightning", "4", "--preset-dir", lightning, "--revision", "main",
           "--allow-unmatched", "--lora", f"{odd}:0.5", "--dtype", "fp16", "-o", made, "-q")
    record = json.loads(read_header(made).metadata["loratool"])
    entry = record["recipe"]
    assert entry["kind"] == "fuse" and record["operation"] == "fuse"
    assert {k: entry["options"][k] for k in ("variant", "revision", "allow_unmatched", "preset_dir", "preset")} == {
        "variant": "fp16", "revision": "main", "allow_unmatched": True, "preset_dir": "lightning",
        "preset": "lightning-4step"}  # --lightning 4 is recorded as the preset it names
    assert record["preset"] == "lightning-4step"
    assert [(e["option"], e["name"]) for e in entry["inputs"]] == [("base", "pipe"), ("loras", "odd.safetensors"),
                                                                   ("preset_dir", "lightning")]

    shown = invoke("recipe", "show", made).stdout
    assert "variant: fp16" in shown and "revision: main" in shown and "allow_unmatched: true" in shown
    recipe = src / "rebuild.yaml"  # beside the inputs: their names resolve there
    recipe.write_text(shown)
    invoke("run", recipe, "-q", "--set", f"output_dir={tmp_path / 'again'}")
    assert (tmp_path / "again" / "fused.safetensors").read_bytes() == made.read_bytes()


def test_the_public_verbs_are_the_operations_the_commands_run(tmp_path: Path) -> None:
    """``lora_tools.rescale(...)`` (keywords or the options model) writes what ``loratool rescale`` writes."""
    import lora_tools
    from lora_tools.io.safetensors import TensorFile, read_header
    from lora_tools.testing.synthetic_lora import write_lora

    style = write_lora(tmp_path / "style.safetensors", "tiny", targets="attn", rank=2, seed=3)
    (tmp_path / "cli").mkdir()
    invoke("rescale", style, "--strength", "0.5", "--components", "unet", "-o", tmp_path / "cli" / "half.safetensors")
    result = lora_tools.rescale(lora=str(style), strength=0.5, components="unet",
                                output=str(tmp_path / "half.safetensors"))
    assert result.files == [tmp_path / "half.safetensors"] and result.adapter is not None
    assert result.report.scaled > 0
    again = lora_tools.rescale(lora_tools.RescaleOptions(lora=str(style), strength=0.5, components="unet",
                                                         output=str(tmp_path / "half.safetensors")), overwrite=True)
    assert again.files == result.files

    def content(path: Path) -> tuple[dict[str, bytes], dict[str, object]]:
        with TensorFile(path) as f:
            tensors = {k: bytes(f.read_bytes(k)) for k in f.keys()}  # noqa: SIM118
        record = json.loads(read_header(path).metadata["loratool"])
        return tensors, {k: v for k, v in record.items() if k != "created"}

    assert content(tmp_path / "half.safetensors") == content(tmp_path / "cli" / "half.safetensors")


@pytest.mark.subprocess
def test_import_lora_tools_stays_light() -> None:
    import subprocess
    import sys

    probe = ("import sys, lora_tools; lora_tools.rescale; lora_tools.RescaleOptions\n"
             "print(sorted(m for m in ('torch', 'huggingface_hub', 'numpy') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert p.stdout.strip() == "[]", p.stderr[-500:]


@pytest.mark.parametrize("record, label", [
    ({"operation": "fuse", "preset": "dmd2-4step"}, None),
    ({"operation": "fuse", "lightning_steps": 4}, "SDXL-Lightning 4-step"),  # a file of an earlier loratool
    ({"operation": "fuse", "preset": "lightning-8step", "lightning_steps": 8}, "SDXL-Lightning 8-step"),
])
def test_inspect_names_the_fused_preset_from_its_row(tmp_path: Path, record: dict[str, object],
                                                     label: str | None) -> None:
    import lora_tools
    from lora_tools.presets import get_preset
    from lora_tools.testing.synthetic import write_checkpoint

    path = write_checkpoint(tmp_path / "fused.safetensors", "tiny", components=("unet",),
                            metadata={"loratool": json.dumps(record)})
    warnings = lora_tools.inspect_path(path).checkpoint.warnings
    want = label or get_preset(str(record["preset"])).label
    assert f"{want} is already fused into this file." in warnings


def test_release_licenses_come_from_the_preset_rows() -> None:
    from lora_tools.presets import PRESETS

    assert {p.license for p in PRESETS.values() if p.family == "lightning"} == {"openrail++"}
    import lora_tools.publish as publish

    assert not hasattr(publish, "PRESET_LICENSES")
    assert publish._licensed_row("lightning-4step").repo_id == "ByteDance/SDXL-Lightning"
    assert publish._licensed_row("no-such-preset") is None


# ------------------------------------------------------------------ what adding a verb takes: one module, one line


def _note_operation():  # type: ignore[no-untyped-def]
    """A toy verb, declared as a verb module declares one (``lora_tools/ops/verbs/note.py`` would hold this)."""
    from dataclasses import dataclass
    from functools import cached_property

    from pydantic import Field

    from lora_tools.ops.operation import Operation, OpResult, Options, cli

    class NoteOptions(Options):
        lora: str = Field(json_schema_extra=cli(argument=True))
        text: str = Field(description="What to write about LORA.")
        output: str = Field(description="The JSON note to write.", json_schema_extra=cli("-o", "--output"))

    @dataclass
    class Planned:
        options: NoteOptions

        @cached_property
        def entry(self) -> dict[str, object]:
            return NOTE.entry(self.options)

    def plan(o: NoteOptions, *, overwrite: bool = False) -> Planned:
        return Planned(o)

    def run(planned: Planned, *, created: str | None = None, progress: object = None) -> OpResult:
        out = Path(planned.options.output)
        out.write_text(json.dumps({"text": planned.options.text, "loratool": {"recipe": planned.entry}}))
        return OpResult([out], {"chars": len(planned.options.text)})

    NOTE = Operation("note", NoteOptions, ("lora",), ("output",), "json", plan, run, summary="write a note",
                     example="loratool note style.safetensors --text 'a style' -o note.json")
    return NOTE


def test_a_new_verb_gets_its_command_recipe_job_and_record_from_its_declaration(tmp_path: Path) -> None:
    from lora_tools.cli._generate import generic_command
    from lora_tools.recipes.jobs import ResolvedJob
    from lora_tools.recipes.registry import adapter_for
    from lora_tools.recipes.schema import recipe_options_model

    note = _note_operation()
    command = generic_command(note)  # what cli/__init__ adds for a registered verb without its own module
    helped = CliRunner().invoke(command, ["--help"]).stdout
    assert "--text TEXT" in helped and "Example:" in helped and "loratool note style.safetensors" in helped
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"not read")
    out = tmp_path / "note.json"
    result = CliRunner().invoke(command, [str(lora), "--text", "a style", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"files": [str(out)], "report": {"chars": 7}}
    entry = json.loads(out.read_text())["loratool"]["recipe"]
    assert entry["options"] == {"lora": "style.safetensors", "text": "a style"}
    assert entry["inputs"][0]["option"] == "lora" and len(entry["inputs"][0]["sha256"]) == 64

    assert list(recipe_options_model(note).model_fields) == ["lora", "text", "output"]
    job = ResolvedJob("n", "note", {"lora": str(lora), "text": "a style", "output": str(out)}, (str(out),))
    adapter = adapter_for(note)
    assert adapter.check(job).state == "skip"  # the command's file is the job's (same entry)
    job2 = ResolvedJob("n", "note", {"lora": str(lora), "text": "another", "output": str(out)}, (str(out),))
    assert adapter.check(job2).state == "redo" and adapter.run(job2).outcome == "done"
    assert json.loads(out.read_text())["text"] == "another"


def test_a_fuse_record_of_an_earlier_loratool_still_gives_its_recipe() -> None:
    """Records written before fuses recorded their entry: the recipe from their sources (lossy, as before)."""
    from lora_tools.provenance import recipe_from_record

    old = {"operation": "fuse", "lightning_steps": 4, "method": "unet", "output_dtype": "F16",
           "created": "2026-11-25T23:59:00Z",
           "sources": [{"role": "base", "name": "juggernaut.safetensors", "sha256": "a" * 64},
                       {"role": "lora", "name": "style.safetensors", "sha256": "b" * 64, "strength": 0.6},
                       {"role": "unet-difference", "tuned": "u.safetensors", "original": "o.safetensors",
                        "strength": 1.0, "preset": "lightning-4step"}]}
    recipe = recipe_from_record(old, "out/j.safetensors")
    assert recipe["created"] == "2026-11-25T23:59:00Z"
    assert recipe["inputs"]["base"] == {"path": "juggernaut.safetensors", "sha256": "a" * 64}
    (job,) = recipe["jobs"]
    assert job["fuse"]["preset"] == "lightning-4step" and job["fuse"]["method"] == "unet"
    assert job["fuse"]["loras"] == [{"lora": "lora1", "strength": 0.6}] and job["fuse"]["dtype"] == "fp16"
    assert job["fuse"]["output"] == "j.safetensors" and Job.model_validate(job).kind == "fuse"
