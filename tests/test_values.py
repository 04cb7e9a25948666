"""One parser per kind of value (``lora_tools.values``), and the matrix of bad numbers over every flag
and every recipe key that takes one: each is one line naming the flag or key and the bad text, exit 1,
nothing written. Every case is refused while the arguments or the recipe are parsed (no model is read).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools import values
from lora_tools.cli import cli
from lora_tools.values import BadValue
from tests.fuse_helpers import listing

COUNTED = "bad_input_cases"  # counted in the test summary with the bad-input matrix


# ------------------------------------------------------------------------------------------- parsers
@pytest.mark.parametrize(("text", "expected"), [
    ("0.6", 0.6), ("-1", -1.0), (".25", 0.25), ("1e-3", 0.001), (" 2 ", 2.0), (3, 3.0), (0.5, 0.5),
])
def test_number_accepts(text: object, expected: float) -> None:
    assert values.number(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("nan", "expected a finite number, got 'nan'"),
    ("inf", "expected a finite number, got 'inf'"),
    ("-inf", "expected a finite number, got '-inf'"),
    ("1e400", "expected a finite number, got '1e400'"),
    (float("nan"), "expected a finite number, got 'nan'"),
    (10**400, "expected a finite number, got '1" + "0" * 400 + "'"),
    ("", "expected a number, got nothing"),
    ("0,6", "expected a number, got '0,6' (write the decimal point as '.': '0.6')"),
    ("abc", "expected a number, got 'abc'"),
    ("1_000", "expected a number, got '1_000'"),
    (True, "expected a number, got 'True'"),
])
def test_number_refuses(text: object, message: str) -> None:
    with pytest.raises(BadValue) as info:
        values.number(text)
    assert info.value.message == message


@pytest.mark.parametrize(("parse", "good", "bad"), [
    (values.rank, [("1", 1), (64, 64), ("65536", 65536)], ["0", "-1", "4.5", 4.5, "65537", "nan", "", "0,6"]),
    (values.fraction, [("1", 1.0), ("0.5", 0.5), (1e-9, 1e-9)], ["0", "-0.1", "1.01", "nan", "inf", ""]),
    (values.sv_ratio, [("1", 1.0), ("20", 20.0)], ["0.99", "nan", "inf", "1e400", ""]),
    (values.seed, [("0", 0), (4294967295, 4294967295)], ["-1", "4294967296", "1.5", "nan", ""]),
    (values.size, [("1024x1024", (1024, 1024)), ("32X64", (32, 64))],
     ["", "1024", "1024x", "33x32", "0x0", "-8x8", "8x16392", "nanxnan", "1e3x8", "8x8x8"]),
    (values.seeds, [("0,1,2", (0, 1, 2)), ([3, "4"], (3, 4)), (7, (7,))],
     ["", ",", "0,,1", [], "-1", "0,4294967296", "a", "0.5"]),
], ids=["rank", "fraction", "sv_ratio", "seed", "size", "seeds"])
def test_each_kind_accepts_and_refuses(parse, good, bad) -> None:  # type: ignore[no-untyped-def]
    for text, expected in good:
        assert parse(text) == expected
    for text in bad:
        with pytest.raises(BadValue, match="^(expected|must be) "):
            parse(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("x.safetensors:0.6", ("x.safetensors", 0.6)),
    ("x.safetensors", ("x.safetensors", 1.0)),
    ("owner/repo/file.safetensors", ("owner/repo/file.safetensors", 1.0)),
    ("owner/repo/file.safetensors:-0.5", ("owner/repo/file.safetensors", -0.5)),
    ("C:\\loras\\x.safetensors", ("C:\\loras\\x.safetensors", 1.0)),
    ("C:\\loras\\x.safetensors:0.8", ("C:\\loras\\x.safetensors", 0.8)),
    ("C:/loras/x.safetensors", ("C:/loras/x.safetensors", 1.0)),
    ("weird:name.safetensors", ("weird:name.safetensors", 1.0)),
])
def test_path_number_splits(text: str, expected: tuple[str, float]) -> None:
    assert values.path_number(text, values.strength, 1.0) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("style.safetensors:0,6", "'style.safetensors:0,6': the strength after ':': expected a number, got '0,6' "
                              "(write the decimal point as '.': '0.6')"),
    ("style.safetensors:abc", "'style.safetensors:abc': the strength after ':': expected a number, got 'abc'"),
    ("style.safetensors:nan", "'style.safetensors:nan': the strength after ':': expected a finite number, got 'nan'"),
    ("style.safetensors:1e400", "'style.safetensors:1e400': the strength after ':': expected a finite number, "
                                "got '1e400'"),
    ("style.safetensors=0.6", "'style.safetensors=0.6': write the strength after ':', not '=' "
                              "('style.safetensors:0.6')"),
    ("style.safetensors:", "'style.safetensors:' ends with ':' but gives no strength: write PATH or PATH:STRENGTH"),
    (":0.5", "':0.5' gives a strength but no file: write PATH:STRENGTH"),
    ("", "expected PATH or PATH:STRENGTH, got nothing"),
])
def test_path_number_refuses_a_bad_number_not_a_missing_file(text: str, message: str) -> None:
    with pytest.raises(BadValue) as info:
        values.path_number(text, values.strength, 1.0, name="strength")
    assert info.value.message == message


def test_an_existing_file_with_a_colon_is_a_path(tmp_path: Path) -> None:
    f = tmp_path / "odd:abc"
    f.write_bytes(b"x")
    assert values.path_number(str(f), values.strength, 1.0) == (str(f), 1.0)


# ------------------------------------------------------------------------------- the CLI matrix
BAD_NUMBERS = {"nan": "'nan'", "inf": "'inf'", "-inf": "'-inf'", "1e400": "'1e400'", "": "nothing", "0,6": "'0,6'"}
L, B = "lora.safetensors", "base.safetensors"

#: flag -> argv with ``{v}`` where the value goes; the flag as the message names it.
FLAGS: dict[str, tuple[str, list[str]]] = {
    "fuse --lora": ("--lora", ["fuse", B, "--lora", f"{L}:{{v}}", "-o", "o.safetensors"]),
    "fuse --strength": ("--strength", ["fuse", B, "--preset", "lightning-4step", "--strength", "{v}"]),
    "rescale --strength": ("--strength", ["rescale", L, "--strength", "{v}", "-o", "o.safetensors"]),
    "merge LORA:W": ("LORA[:W]", ["merge", L, f"{L}:{{v}}", "-o", "o.safetensors"]),
    "merge --rank": ("--rank", ["merge", L, L, "--method", "svd", "--rank", "{v}", "-o", "o.safetensors"]),
    "merge --energy": ("--energy", ["merge", L, L, "--method", "svd", "--energy", "{v}", "-o", "o.safetensors"]),
    "resize --rank": ("--rank", ["resize", L, "--rank", "{v}", "-o", "o.safetensors"]),
    "resize --energy": ("--energy", ["resize", L, "--energy", "{v}", "-o", "o.safetensors"]),
    "resize --sv-ratio": ("--sv-ratio", ["resize", L, "--sv-ratio", "{v}", "-o", "o.safetensors"]),
    "resize --sv-fro": ("--sv-fro", ["resize", L, "--sv-fro", "{v}", "-o", "o.safetensors"]),
    "resize --sv-cumulative": ("--sv-cumulative", ["resize", L, "--sv-cumulative", "{v}", "-o", "o.safetensors"]),
    "resize --max-rank": ("--max-rank", ["resize", L, "--sv-fro", "0.9", "--max-rank", "{v}", "-o", "o.safetensors"]),
    "resize --conv-rank": ("--conv-rank", ["resize", L, "--rank", "2", "--conv-rank", "{v}", "-o", "o.safetensors"]),
    "extract --rank": ("--rank", ["extract", B, B, "--rank", "{v}", "-o", "o.safetensors"]),
    "extract --energy": ("--energy", ["extract", B, B, "--energy", "{v}", "-o", "o.safetensors"]),
    "extract --conv-rank": ("--conv-rank", ["extract", B, B, "--rank", "2", "--conv-rank", "{v}",
                                            "-o", "o.safetensors"]),
    "verify --seeds": ("--seeds", ["verify", B, "--seeds", "{v}"]),
    "verify --size": ("--size", ["verify", B, "--size", "{v}"]),
    "verify --lora": ("--lora", ["verify", B, "--lora", f"{L}:{{v}}"]),
}
#: Out-of-range values, per flag kind, on top of :data:`BAD_NUMBERS`.
OUT_OF_RANGE = {
    "verify --seeds": ["-1", "4294967296", "0,-5", "1,,2"],
    "verify --size": ["33x32", "0x0", "1024"],
    "merge --rank": ["0", "-3", "2.5"], "resize --rank": ["0", "2.5"], "extract --rank": ["0"],
    "resize --conv-rank": ["0"], "extract --conv-rank": ["0"],
    "merge --energy": ["0", "1.5"], "resize --energy": ["0", "-0.5", "1.01"], "extract --energy": ["2"],
    "resize --sv-fro": ["0", "1.5"], "resize --sv-ratio": ["0.5"], "resize --sv-cumulative": ["0", "1.5"],
    "resize --max-rank": ["0", "2.5"],
}
#: ``0,6`` is a good seed list (seeds 0 and 6).
CLI_CASES = [(flag, v) for flag in FLAGS for v in [*BAD_NUMBERS, *OUT_OF_RANGE.get(flag, [])]
             if not (flag == "verify --seeds" and v == "0,6")]


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-in inputs (never opened: every value is refused first)."""
    folder = tmp_path_factory.mktemp("numbers")
    for name in (L, B):
        (folder / name).write_bytes(b"never read")
    return folder


@pytest.mark.bad_input_cases
@pytest.mark.parametrize(("flag", "value"), CLI_CASES, ids=[f"{f}={v or 'empty'}" for f, v in CLI_CASES])
def test_bad_number_on_the_command_line(flag: str, value: str, cli_folder: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(cli_folder)
    spelled, argv = FLAGS[flag]
    before = listing(cli_folder)
    result = CliRunner().invoke(cli, [a.replace("{v}", value) for a in argv])
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    if flag == "fuse --strength" and value in ("nan", "inf", "-inf"):  # the preset's own range rule says it
        assert lines[0] == f"Error: The preset strength {value} is out of range: use a number between -1000 and 1000."
        return
    assert lines[0].startswith((f"Error: {spelled}: ", f"Error: {spelled} must be ")), lines[0]
    shown = value.split(",")[1] if flag == "verify --seeds" and value in ("0,-5",) else value
    assert (f"'{shown}'" in lines[0]) if shown else ("nothing" in lines[0] or "ends with ':'" in lines[0]), lines[0]
    assert listing(cli_folder) == before


# ------------------------------------------------------------------------------- the recipe matrix
YAML_NUMBERS = {"nan": (".nan", "'nan'"), "inf": (".inf", "'inf'"), "-inf": ("-.inf", "'-inf'"),
                "1e400": ("1e400", "'1e400'"), "empty": ('""', "nothing"), "0,6": ('"0,6"', "'0,6'")}

#: recipe key -> (the job's YAML with ``{v}``, the dotted key in the message).
KEYS: dict[str, tuple[str, str]] = {
    "fuse.strength": ("fuse: {base: base, preset: lightning-4step, strength: {v}, output: o.safetensors}",
                      "jobs[0].fuse.strength"),
    "fuse.loras.strength": ("fuse: {base: base, loras: [{lora: style, strength: {v}}], output: o.safetensors}",
                            "jobs[0].fuse.loras[0].strength"),
    "rescale.strength": ("rescale: {lora: style, strength: {v}, output: o.safetensors}", "jobs[0].rescale.strength"),
    "merge.loras.weight": ("merge: {loras: [style, {lora: style, weight: {v}}], output: o.safetensors}",
                           "jobs[0].merge.loras[1].weight"),
    "merge.rank": ("merge: {loras: [style, style], method: svd, rank: {v}, output: o.safetensors}",
                   "jobs[0].merge.rank"),
    "merge.energy": ("merge: {loras: [style, style], method: svd, energy: {v}, output: o.safetensors}",
                     "jobs[0].merge.energy"),
    "resize.rank": ("resize: {lora: style, rank: {v}, output: o.safetensors}", "jobs[0].resize.rank"),
    "resize.energy": ("resize: {lora: style, energy: {v}, output: o.safetensors}", "jobs[0].resize.energy"),
    "resize.sv_ratio": ("resize: {lora: style, sv_ratio: {v}, output: o.safetensors}", "jobs[0].resize.sv_ratio"),
    "resize.sv_fro": ("resize: {lora: style, sv_fro: {v}, output: o.safetensors}", "jobs[0].resize.sv_fro"),
    "resize.sv_cumulative": ("resize: {lora: style, sv_cumulative: {v}, output: o.safetensors}",
                             "jobs[0].resize.sv_cumulative"),
    "resize.max_rank": ("resize: {lora: style, sv_fro: 0.9, max_rank: {v}, output: o.safetensors}",
                        "jobs[0].resize.max_rank"),
    "resize.conv_rank": ("resize: {lora: style, rank: 2, conv_rank: {v}, output: o.safetensors}",
                         "jobs[0].resize.conv_rank"),
    "extract.rank": ("extract: {tuned: base, original: base, rank: {v}, output: o.safetensors}",
                     "jobs[0].extract.rank"),
    "extract.energy": ("extract: {tuned: base, original: base, energy: {v}, output: o.safetensors}",
                       "jobs[0].extract.energy"),
    "extract.conv_rank": ("extract: {tuned: base, original: base, rank: 2, conv_rank: {v}, output: o.safetensors}",
                          "jobs[0].extract.conv_rank"),
    "verify.seeds": ("verify: {model: base, seeds: {v}, out: check}", "jobs[0].verify.seeds"),
    "verify.size": ("verify: {model: base, size: {v}, out: check}", "jobs[0].verify.size"),
    "verify.loras.strength": ("verify: {model: base, loras: [{lora: style, strength: {v}}], out: check}",
                              "jobs[0].verify.loras[0].strength"),
}
RECIPE_OUT_OF_RANGE = {
    "verify.seeds": [("[-1]", "'-1'"), ("[4294967296]", "'4294967296'"), ("[]", "nothing"), ('"0,,1"', "'0,,1'")],
    "verify.size": [("33x32", "'33x32'")],
    "resize.rank": [("0", "'0'"), ("2.5", "'2.5'")], "merge.rank": [("-1", "'-1'")], "extract.rank": [("0", "'0'")],
    "resize.energy": [("1.5", "'1.5'"), ("0", "'0'")], "resize.sv_ratio": [("0.5", "'0.5'")],
    "resize.sv_cumulative": [("1.5", "'1.5'")], "resize.max_rank": [("0", "'0'")],
}
RECIPE_CASES = [(key, text, shown) for key in KEYS
                for text, shown in [*YAML_NUMBERS.values(), *RECIPE_OUT_OF_RANGE.get(key, [])]
                if not (key == "verify.seeds" and text == '"0,6"')]


@pytest.mark.bad_input_cases
@pytest.mark.parametrize(("key", "text", "shown"), RECIPE_CASES,
                         ids=[f"{k}={t}" for k, t, _ in RECIPE_CASES])
def test_bad_number_in_a_recipe(key: str, text: str, shown: str, tmp_path: Path) -> None:
    (tmp_path / "base.safetensors").write_bytes(b"never read")
    (tmp_path / "style.safetensors").write_bytes(b"never read")
    job, dotted = KEYS[key]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""\
        version: 1
        output_dir: out
        inputs:
          base: base.safetensors
          style: style.safetensors
        jobs:
          - """) + job.replace("{v}", text) + "\n")
    before = listing(tmp_path)
    result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"Error: {recipe}:7:"), lines[0]
    assert (f": {dotted}: expected " in lines[0] or f": {dotted}: must be " in lines[0]), lines[0]
    assert f"got {shown}" in lines[0], lines[0]
    assert listing(tmp_path) == before
