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

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port: its endpoint URL."""
    from moto.server import ThreadedMotoServer

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


@pytest.mark.smoke
def test_a_url_of_another_scheme_is_one_line() -> None:
    """The one path parser takes s3:// URLs and names what it does not take."""
    line = one_error(invoke("inspect", "gs://bucket/model.safetensors", code=1))
    assert "gs://bucket/model.safetensors" in line and "s3://BUCKET/KEY" in line, line
    line = one_error(invoke("rescale", "s3://bucket-only", "--strength", "0.5", "-o", "x.safetensors", code=1))
    assert "'s3://bucket-only' names no object" in line, line


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
