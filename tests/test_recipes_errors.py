"""Broken recipes: each gives one exact ``Error: file:line:column: ...`` line, exit 1, nothing written.

These never fuse: every one is refused while the recipe is validated, before any job runs.
"""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.errors import RecipeError
from lora_tools.recipes.loader import load_text
from tests.fuse_helpers import listing


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder with two small stand-in input files and a lightning folder (never opened by these tests)."""
    (tmp_path / "base.safetensors").write_bytes(b"base bytes")
    (tmp_path / "lightning").mkdir()
    return tmp_path


def refused(work: Path, text: str, *extra: str) -> str:
    """Write ``text`` as ``recipe.yaml`` in ``work``, run it, and return its one error line (after ``Error: ``)."""
    recipe = work / "recipe.yaml"
    recipe.write_text(textwrap.dedent(text).lstrip("\n"))
    before = listing(work)
    result = CliRunner().invoke(cli, ["run", str(recipe), *extra])
    assert result.exit_code == 1, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert isinstance(result.exception, SystemExit), f"crashed instead of a clean error: {result.exception!r}"
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert listing(work) == before, "a refused recipe changed the folder"
    assert not (work / "out").exists()
    return lines[0][len("Error: "):].replace(str(recipe), "recipe.yaml")


HEAD = """
version: 1
output_dir: out
inputs:
  base: base.safetensors
  lightning: lightning
"""


def test_wrong_type_names_the_place(work: Path) -> None:
    msg = refused(work, HEAD + """
jobs:
  - fuse:
      base: base
      lightning: 4
      lightning_dir: lightning
      output: a.safetensors
  - fuse:
      base: base
      lightning: 4
      strength: high
      output: b.safetensors
""")
    assert msg == "recipe.yaml:16:17: jobs[1].fuse.strength: expected a number, got 'high'"


def test_unknown_key_suggests_the_nearest(work: Path) -> None:
    msg = refused(work, HEAD + """
jobs:
  - fuse:
      base: base
      lightning: 4
      strenght: 0.5
      output: a.safetensors
""")
    assert msg == "recipe.yaml:11:7: jobs[0].fuse: unknown key 'strenght' (did you mean 'strength'?)"


def test_unknown_top_level_key(work: Path) -> None:
    msg = refused(work, "version: 1\ninptus: {}\njobs: []\n")
    assert msg == "recipe.yaml:2:1: unknown key 'inptus' (did you mean 'inputs'?)"


def test_bad_choice(work: Path) -> None:
    msg = refused(work, HEAD + """
jobs:
  - fuse: {base: base, lightning: 5, output: a.safetensors}
""")
    assert msg == "recipe.yaml:8:35: jobs[0].fuse.lightning: expected 1, 2, 4 or 8, got 5"


def test_missing_file(work: Path) -> None:
    msg = refused(work, """
version: 1
inputs:
  base: nowhere.safetensors
jobs:
  - fuse: {base: base, lightning: 4, output: a.safetensors}
""")
    assert msg == "recipe.yaml:3:9: inputs.base: 'nowhere.safetensors' does not exist"


def test_missing_path_in_job(work: Path) -> None:
    msg = refused(work, HEAD + """
jobs:
  - fuse: {base: other.safetensors, lightning: 4, output: a.safetensors}
""")
    assert msg == ("recipe.yaml:8:18: jobs[0].fuse.base: 'other.safetensors' is not an input, a job or an existing "
                   "file (inputs and jobs: base, lightning, fuse0)")


def test_bad_hub_id(work: Path) -> None:
    msg = refused(work, """
version: 1
inputs:
  style: {hub: "not a/ref", revision: main}
jobs:
  - fuse: {base: base.safetensors, loras: [style], output: a.safetensors}
""")
    assert msg == "recipe.yaml:3:16: inputs.style.hub: expected owner/repo/path/to/file, got 'not a/ref'"


def test_hub_ref_needs_a_revision(work: Path) -> None:
    msg = refused(work, """
version: 1
inputs:
  style: {hub: owner/repo/style.safetensors}
jobs:
  - fuse: {base: base.safetensors, loras: [style], output: a.safetensors}
""")
    assert msg == "recipe.yaml:3:10: inputs.style: missing required key 'revision'"


def test_hash_mismatch(work: Path) -> None:
    actual = hashlib.sha256(b"base bytes").hexdigest()
    msg = refused(work, f"""
version: 1
inputs:
  base: {{path: base.safetensors, sha256: "{'0' * 64}"}}
jobs:
  - fuse: {{base: base, lightning: 4, output: a.safetensors}}
""")
    assert msg == (f"recipe.yaml:3:9: inputs.base: sha256 mismatch: the recipe pins {'0' * 16}..., "
                   f"'base.safetensors' has {actual[:16]}...")


def test_malformed_hash(work: Path) -> None:
    msg = refused(work, """
version: 1
inputs:
  base: {path: base.safetensors, sha256: abc}
jobs:
  - fuse: {base: base, lightning: 4, output: a.safetensors}
""")
    assert msg == "recipe.yaml:3:42: inputs.base.sha256: expected 64 hex characters, got 'abc'"


def test_empty_matrix(work: Path) -> None:
    msg = refused(work, HEAD + """
matrix: {}
jobs:
  - fuse: {base: base, lightning: 4, output: a.safetensors}
""")
    assert msg == "recipe.yaml:7:9: matrix: empty: give at least one variable with a list of values, or drop 'matrix'"


def test_empty_matrix_variable(work: Path) -> None:
    msg = refused(work, HEAD + """
matrix:
  steps: []
jobs:
  - fuse: {base: base, lightning: "${steps}", output: a.safetensors}
""")
    assert msg == "recipe.yaml:8:10: matrix.steps: empty list: a matrix variable needs at least one value"


def test_undefined_name(work: Path) -> None:
    msg = refused(work, HEAD + """
matrix:
  steps: [2, 4]
jobs:
  - fuse:
      base: base
      lightning: ${steps}
      output: out-${step}.safetensors
""")
    assert msg == "recipe.yaml:13:15: jobs[0].fuse.output: undefined ${step} (defined: steps)"


def test_two_jobs_one_output(work: Path) -> None:
    msg = refused(work, HEAD + """
matrix:
  steps: [2, 4]
jobs:
  - fuse:
      base: base
      lightning: ${steps}
      output: same.safetensors
""")
    assert msg == "recipe.yaml:13:15: jobs[0].fuse.output: 'same.safetensors' is also written by job 'fuse0-2'"


def test_python_tag_refused(work: Path) -> None:
    msg = refused(work, """
version: 1
jobs:
  - fuse: !!python/object/apply:os.system ["touch pwned"]
""")
    assert msg == ("recipe.yaml:3:11: tag '!!python/object/apply:os.system' is not allowed: recipes are plain YAML "
                   "(mappings, lists, strings, numbers)")
    assert not (work / "pwned").exists()


def test_alias_bomb_refused(work: Path) -> None:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    msg = refused(work, "\n".join(["version: 1", *lines, "jobs: []"]) + "\n")
    assert msg.startswith("recipe.yaml:")
    assert "aliases" in msg and "refusing" in msg


def test_alias_bomb_messages_are_exact(work: Path) -> None:
    """The two bounds, each with its place: the 9^9 bomb trips the value bound where expansion passes
    20000 values (a node of line 2, inside the aliased list); 250 uses of one alias trip the alias bound
    at the 201st (``b: [`` is 4 columns, each ``*a, `` 4 more: 4 + 200 * 4 + 1 = 805)."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    msg = refused(work, "\n".join(["version: 1", *lines, "jobs: []"]) + "\n")
    assert msg == "recipe.yaml:2:22: the document expands to more than 20000 values (aliases nested too deep?): refusing it"
    many = "\n".join(["version: 1", "a: &a [1]", "b: [" + ", ".join(["*a"] * 250) + "]", "jobs: []"]) + "\n"
    assert refused(work, many) == "recipe.yaml:3:805: more than 200 aliases: refusing the document (a 'billion laughs' file?)"


def test_alias_bomb_refused_quickly() -> None:
    """Even a bomb under the alias limit is refused by the node bound, without expanding it."""
    lines = ['a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]']
    for prev, name in zip("abcde", "bcdef", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    with pytest.raises(RecipeError) as e:
        load_text("\n".join(lines) + "\n", "bomb.yaml")
    assert "expands to more than 20000 values" in str(e.value)
    assert str(e.value).startswith("bomb.yaml:")


def test_templated_name_escaping_the_output_folder(work: Path) -> None:
    msg = refused(work, HEAD + """
matrix:
  name: [ok, ../../evil]
jobs:
  - fuse:
      base: base
      lightning: 4
      output: ${name}.safetensors
""")
    assert msg == (f"recipe.yaml:13:15: jobs[0].fuse.output: '../../evil.safetensors' leaves the output folder "
                   f"'{work / 'out'}' (job 'fuse0-.._.._evil')")


def test_set_with_unknown_key(work: Path) -> None:
    msg = refused(work, HEAD + """
jobs:
  - fuse: {base: base, lightning: 4, output: a.safetensors}
""", "--set", "bsae=x.safetensors")
    assert msg == "--set bsae: 'bsae' is not an input, a var or a settable key (did you mean 'base'?)"


def test_not_yaml(work: Path) -> None:
    msg = refused(work, "version: 1\njobs: [\n")
    assert msg == "recipe.yaml:3:1: not valid YAML: expected the node content, but found '<stream end>'"


def test_empty_jobs(work: Path) -> None:
    msg = refused(work, "version: 1\njobs: []\n")
    assert msg == "recipe.yaml:2:7: jobs: empty: a recipe needs at least one job"


def test_wrong_version(work: Path) -> None:
    msg = refused(work, "version: 2\njobs: []\n")
    assert msg == "recipe.yaml:1:10: version: expected 1, got 2"


def test_only_matching_nothing(work: Path) -> None:
    msg = refused(work, HEAD + """
jobs:
  - fuse: {base: base, lightning: 4, output: a.safetensors}
""", "--only", "nope*")
    assert msg == "--only: no job matches nope* (jobs: fuse0)"


def test_recipe_show_of_a_file_without_a_record(work: Path) -> None:
    from lora_tools.testing.synthetic_lora import write_lora

    lora = write_lora(work / "plain.safetensors", "tiny", rank=2)
    result = CliRunner().invoke(cli, ["recipe", "show", str(lora)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == f"Error: {lora}: no loratool record: it was not made by loratool"


def test_every_shipped_recipe_is_run_by_the_tests() -> None:
    from tests.recipe_helpers import REPO_RECIPES

    tests_text = (Path(__file__).parent / "test_recipes.py").read_text()
    shipped = sorted(p.name for p in REPO_RECIPES.glob("*.yaml"))
    assert len(shipped) == 4
    assert [n for n in shipped if f'"{n}"' not in tests_text] == []


def test_shipped_recipes_validate(tmp_path: Path) -> None:
    """Every example passes the schema and templating (no files needed for that part)."""
    from lora_tools.recipes.expand import expand_jobs
    from lora_tools.recipes.loader import load_file
    from lora_tools.recipes.run import _validate_job
    from lora_tools.recipes.schema import RecipeHead
    from tests.recipe_helpers import REPO_RECIPES

    kinds_of: dict[str, set[str]] = {}
    for p in sorted(REPO_RECIPES.glob("*.yaml")):
        doc, marks = load_file(p)
        head = RecipeHead.model_validate(doc)
        jobs = expand_jobs(head.jobs, head.matrix, head.vars, marks)
        kinds = [_validate_job(j, marks).kind for j in jobs]  # every job validates, with exactly one kind
        assert jobs and "fuse" in kinds, p.name
        kinds_of[p.name] = set(kinds)
    # the round-2 examples use the other job kinds as the issue describes
    assert kinds_of["publisher-batch.yaml"] == {"fuse", "verify", "publish"}
    assert kinds_of["lightning-style-merge.yaml"] == {"fuse", "merge"}
    assert kinds_of["distribution.yaml"] == {"fuse", "resize", "convert"}
