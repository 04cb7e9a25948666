"""Inputs and outputs on S3-compatible object storage (``s3://bucket/key``), against a real HTTP server.

A moto server (the S3 API over HTTP, what s3fs's own tests use) runs on 127.0.0.1 for the session; each
test talks to it through the standard AWS environment (``AWS_ENDPOINT_URL`` and keys), never through a
patched client. Every case drives the real CLI and compares bytes with the same run on local files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner, Result

from lora_tools.cli import cli
from tests.recipe_helpers import Assets


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port: its endpoint URL (imported here: the default selection's one
    case needs no server)."""
    import logging

    pytest.importorskip("s3fs", reason="the s3 extra is not installed")
    ThreadedMotoServer = pytest.importorskip("moto.server", reason="moto[server] is not installed").ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A fresh bucket on the server, with the AWS environment that reaches it: ``.url(key)``, ``.put(path, key)``,
    ``.get(key)``, ``.keys()``, ``.uploads()``, ``.env``."""
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, client_kwargs={"endpoint_url": s3_server})
    bucket = "b-" + uuid.uuid4().hex[:12]
    fs.mkdir(bucket)

    def url(key: str) -> str:
        return f"s3://{bucket}/{key}"

    def put(path: Path, key: str) -> str:
        fs.put_file(str(path), f"{bucket}/{key}")
        return url(key)

    def get(key: str) -> bytes:
        return bytes(fs.cat_file(f"{bucket}/{key}"))

    def keys() -> list[str]:
        return sorted(p.split("/", 1)[1] for p in fs.find(bucket, refresh=True))

    def uploads(key: str) -> list[str]:
        listed = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        return [u["UploadId"] for u in listed.get("Uploads", []) if u["Key"] == key]

    return SimpleNamespace(url=url, put=put, get=get, keys=keys, uploads=uploads, env=env, fs=fs, bucket=bucket)


def invoke(*args: object, code: int = 0) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def one_error(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def without_created(data: bytes) -> bytes:
    """A safetensors file's bytes with its record's ``created`` time blanked (the only field a rerun changes)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__", {})
    if "loratool" in meta:
        record = json.loads(meta["loratool"])
        record.pop("created", None)
        if isinstance(record.get("recipe"), dict):
            record["recipe"].pop("created", None)
        meta["loratool"] = json.dumps(record, sort_keys=True)
    return json.dumps(header, sort_keys=True).encode() + data[8 + n:]


def tensor_data(data: bytes) -> bytes:
    """A safetensors file's data section."""
    return data[8 + int.from_bytes(data[:8], "little"):]


@pytest.mark.smoke
def test_a_url_of_another_scheme_is_one_line(tmp_path: Path) -> None:
    """The one path parser takes s3:// URLs and names what it does not take."""
    line = one_error(invoke("inspect", "gs://bucket/model.safetensors", code=1))
    assert "gs://bucket/model.safetensors" in line and "s3://BUCKET/KEY" in line, line
    line = one_error(invoke("rescale", "s3://bucket-only", "--strength", "0.5", "-o", "x.safetensors", code=1))
    assert "'s3://bucket-only' names no object" in line, line
    recipe = tmp_path / "r.yaml"  # a recipe's paths go through the same parser
    recipe.write_text("version: 1\noutput_dir: gs://b/out\ninputs:\n  style: s3://b\njobs:\n"
                      "  - {name: half, rescale: {lora: style, strength: 0.5, output: half.safetensors}}\n")
    line = one_error(invoke("run", recipe, "--dry-run", code=1))
    assert line.startswith(f"Error: {recipe}:2:13: output_dir: 'gs://b/out': gs:// is not read"), line


def test_a_folder_output_at_a_url_is_refused_with_one_line(recipe_assets: Assets) -> None:
    """Diffusers folders are written locally only: one line naming the output flag, before anything is written."""
    result = invoke("fuse", recipe_assets.base_a, "--lora", recipe_assets.style, "--save", "diffusers",
                    "-o", "s3://bucket/out-diffusers", code=1)
    line = one_error(result)
    assert "s3://bucket/out-diffusers" in line and "-o PATH" in line, line


def test_fuse_from_and_to_s3_is_the_local_run(s3: Any, recipe_assets: Assets, tmp_path: Path) -> None:
    base = s3.put(recipe_assets.base_a, "in/base-a.safetensors")
    lora = s3.put(recipe_assets.lightning / "sdxl_lightning_4step_lora.safetensors",
                  "in/sdxl_lightning_4step_lora.safetensors")
    local = tmp_path / "local.safetensors"
    invoke("fuse", recipe_assets.base_a, "--lora", recipe_assets.lightning / "sdxl_lightning_4step_lora.safetensors",
           "-o", local, "-q")
    invoke("fuse", base, "--lora", lora, "-o", s3.url("out/fused.safetensors"), "-q")
    remote = s3.get("out/fused.safetensors")
    assert without_created(remote) == without_created(local.read_bytes())
    assert s3.uploads("out/fused.safetensors") == []


def test_a_lora_op_from_and_to_s3_is_the_local_run(s3: Any, recipe_assets: Assets, tmp_path: Path) -> None:
    style = s3.put(recipe_assets.style, "loras/style.safetensors")
    local = tmp_path / "half.safetensors"
    invoke("rescale", recipe_assets.style, "--strength", "0.5", "-o", local)
    invoke("rescale", style, "--strength", "0.5", "-o", s3.url("loras/half.safetensors"))
    assert without_created(s3.get("loras/half.safetensors")) == without_created(local.read_bytes())
    # an object written by loratool reads back as a local file does: a merge of it and the input
    merged = tmp_path / "merged.safetensors"
    invoke("merge", f"{s3.url('loras/half.safetensors')}:1", f"{style}:0.5", "-o", merged)
    invoke("merge", f"{local}:1", f"{recipe_assets.style}:0.5", "-o", tmp_path / "merged-local.safetensors")
    # (the records differ in the sha256 of the two rescaled inputs, whose own records differ in their times)
    assert tensor_data(merged.read_bytes()) == tensor_data((tmp_path / "merged-local.safetensors").read_bytes())


RECIPE = """\
version: 1
output_dir: {out}
inputs:
  base: {base}
  style: {style}
jobs:
  - name: styled
    fuse:
      base: base
      loras: [{{lora: style, strength: 0.8}}]
      output: styled.safetensors
  - name: half
    rescale:
      lora: style
      strength: 0.5
      output: loras/half.safetensors
"""


def test_a_recipe_with_s3_inputs_and_outputs_skips_on_rerun(s3: Any, recipe_assets: Assets, tmp_path: Path) -> None:
    base = s3.put(recipe_assets.base_a, "in/base-a.safetensors")
    style = s3.put(recipe_assets.style, "in/style.safetensors")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(out=s3.url("out"), base=base, style=style))
    first = invoke("run", recipe)
    assert "2 done." in first.stdout, first.stdout
    assert s3.keys() == ["in/base-a.safetensors", "in/style.safetensors", "out/loras/half.safetensors",
                         "out/styled.safetensors"]
    etags = {k: s3.fs.info(f"{s3.bucket}/{k}", refresh=True)["ETag"] for k in s3.keys()}
    # the same recipe on local files writes the same bytes
    local = tmp_path / "local.yaml"
    local.write_text(RECIPE.format(out=tmp_path / "out", base=recipe_assets.base_a, style=recipe_assets.style))
    invoke("run", local, "-q")
    for key in ("styled.safetensors", "loras/half.safetensors"):
        assert without_created(s3.get(f"out/{key}")) == without_created((tmp_path / "out" / key).read_bytes()), key
    # rerun: both jobs up to date from their headers alone, nothing rewritten
    second = invoke("run", recipe)
    assert "2 skipped." in second.stdout, second.stdout
    assert {k: s3.fs.info(f"{s3.bucket}/{k}", refresh=True)["ETag"] for k in s3.keys()} == etags
    # one changed option redoes only its job
    recipe.write_text(RECIPE.format(out=s3.url("out"), base=base, style=style).replace("strength: 0.5", "strength: 0.25"))
    third = invoke("run", recipe)
    assert "1 done, 1 skipped." in third.stdout, third.stdout


def test_an_existing_object_is_replaced_only_when_it_is_ours(s3: Any, recipe_assets: Assets) -> None:
    style = s3.put(recipe_assets.style, "in/style.safetensors")
    foreign = s3.put(recipe_assets.style, "out/taken.safetensors")  # a trainer's file: no loratool record
    before = s3.get("out/taken.safetensors")
    line = one_error(invoke("rescale", style, "--strength", "0.5", "-o", foreign, code=1))
    assert f"'{foreign}' already exists" in line and "--overwrite" in line, line
    line = one_error(invoke("rescale", style, "--strength", "0.5", "-o", foreign, "--overwrite", code=1))
    assert f"'{foreign}' already exists and is not an earlier loratool output" in line, line
    assert s3.get("out/taken.safetensors") == before and s3.uploads("out/taken.safetensors") == []
    # our own earlier output is replaced with --overwrite
    ours = s3.url("out/ours.safetensors")
    invoke("rescale", style, "--strength", "0.5", "-o", ours)
    first = s3.get("out/ours.safetensors")
    invoke("rescale", style, "--strength", "0.25", "-o", ours, "--overwrite")
    assert s3.get("out/ours.safetensors") != first


def test_an_input_object_is_never_an_output(s3: Any, recipe_assets: Assets) -> None:
    style = s3.put(recipe_assets.style, "in/style.safetensors")
    before = s3.get("in/style.safetensors")
    line = one_error(invoke("rescale", style, "--strength", "0.5", "-o", style, "--overwrite", code=1))
    assert style in line and "input" in line, line
    base = s3.put(recipe_assets.base_a, "in/base-a.safetensors")
    line = one_error(invoke("fuse", base, "--lora", style, "-o", style, "--overwrite", "-q", code=1))
    assert style in line and "input" in line, line
    assert s3.get("in/style.safetensors") == before
    assert s3.keys() == ["in/base-a.safetensors", "in/style.safetensors"]


def test_inspect_of_an_object_reads_only_its_header(s3: Any, recipe_assets: Assets) -> None:
    base = s3.put(recipe_assets.base_a, "in/base-a.safetensors")
    result = invoke("--debug", "inspect", base)
    local = invoke("inspect", recipe_assets.base_a)
    assert result.stdout.replace(base, str(recipe_assets.base_a)).splitlines()[1:] == local.stdout.splitlines()[1:] \
        or "tensors" in result.stdout
    counts = result.stderr.strip().splitlines()[-1]
    assert counts == "debug: 2 object-store requests (GET 1, HEAD 1)", counts


@pytest.mark.subprocess
def test_a_killed_upload_leaves_no_object_and_the_next_run_cleans_it(s3: Any, recipe_assets: Assets,
                                                                     tmp_path: Path) -> None:
    base = s3.put(recipe_assets.base_a, "in/base-a.safetensors")
    style = s3.put(recipe_assets.style, "in/style.safetensors")
    out = s3.url("out/fused.safetensors")
    ready = tmp_path / "ready"
    env = {**os.environ, **s3.env, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "LORATOOL_TEST_PAUSE_AT": "mid-stream", "LORATOOL_TEST_READY": str(ready)}
    cmd = [sys.executable, "-c", "from lora_tools.cli import main; main()", "fuse", base, "--lora", style, "-o", out, "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.communicate(timeout=5)
        assert s3.uploads("out/fused.safetensors"), "the run paused mid-stream has an upload under way"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert "out/fused.safetensors" not in s3.keys(), "a killed upload left an object under the output key"
    assert len(s3.uploads("out/fused.safetensors")) == 1  # the killed run's incomplete upload, until the next run
    invoke("fuse", base, "--lora", style, "-o", out, "-q")
    assert s3.uploads("out/fused.safetensors") == [], "the next run aborted the killed run's upload"
    assert "out/fused.safetensors" in s3.keys()


def test_a_failed_upload_is_aborted(s3: Any, recipe_assets: Assets, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails mid-stream (here: interrupted at the pause point) aborts its upload at once."""
    base = s3.put(recipe_assets.base_a, "in/base-a.safetensors")
    style = s3.put(recipe_assets.style, "in/style.safetensors")
    from lora_tools.testing import hooks

    def interrupt(point: str) -> None:
        if point == "mid-stream":
            raise KeyboardInterrupt

    monkeypatch.setattr(hooks, "pause_point", interrupt)
    result = CliRunner().invoke(cli, ["fuse", base, "--lora", style, "-o", s3.url("out/f.safetensors"), "-q"])
    assert result.exit_code != 0
    assert s3.keys() == ["in/base-a.safetensors", "in/style.safetensors"]
    assert s3.uploads("out/f.safetensors") == []


@pytest.mark.parametrize("op", ["resize", "convert", "extract"])
def test_the_other_lora_ops_read_and_write_objects(s3: Any, recipe_assets: Assets, tmp_path: Path, op: str) -> None:
    style = s3.put(recipe_assets.style, "in/style.safetensors")
    args = {"resize": lambda lora: [lora, "--rank", "2"], "convert": lambda lora: [lora, "--to", "peft"],
            "extract": lambda base: [base, recipe_assets.base_b, "--rank", "2"]}[op]
    local_in = recipe_assets.base_a if op == "extract" else recipe_assets.style
    remote_in = s3.put(recipe_assets.base_a, "in/base-a.safetensors") if op == "extract" else style
    invoke(op, *args(local_in), "-o", tmp_path / f"{op}.safetensors")  # the same name: the title is the file's stem
    invoke(op, *args(remote_in), "-o", s3.url(f"out/{op}.safetensors"))
    assert without_created(s3.get(f"out/{op}.safetensors")) == without_created((tmp_path / f"{op}.safetensors").read_bytes())


def test_a_big_read_is_one_get_copied_in_pieces(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read of at least a window (a big tensor) is one ranged GET whose body lands in the tensor piece by piece;
    a read past the object's end is one line saying it is truncated."""
    from lora_tools.errors import InvalidFileError
    from lora_tools.io import remote

    monkeypatch.setattr(remote, "WINDOW_BYTES", 1 << 20)
    monkeypatch.setattr(remote, "BODY_PIECE", 100_000)
    data = os.urandom(3 << 20)
    s3.fs.pipe_file(f"{s3.bucket}/big.bin", data)
    reader = remote.RangeReader(s3.url("big.bin"), len(data))
    before = remote.request_counts().get("GET", 0)
    out = bytearray(2_500_000)
    reader.read_into(123_457, memoryview(out))
    assert bytes(out) == data[123_457:123_457 + len(out)]
    assert remote.request_counts().get("GET", 0) - before == 1
    with pytest.raises(InvalidFileError, match="truncated"):
        reader.read_into(len(data) - 1000, memoryview(bytearray(1 << 20)))
