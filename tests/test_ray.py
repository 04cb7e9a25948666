"""``loratool run --executor ray``: the same files and verify reports as the local executor, re-runs that
skip, retries of killed workers, failures that stay alone, bad addresses, Ray missing.

Ray binds its servers to every interface and to the node's own address, and tests here may talk to
loopback only. So Ray is started only inside a network namespace that holds nothing but loopback:
``test_ray_in_a_loopback_only_namespace`` re-runs this file there (``unshare --net``, then
``ip link set lo up``), where Ray falls back to 127.0.0.1. The tests that start Ray skip anywhere
else, and that outer test skips (saying why) where no such namespace can be made. All of them share
one Ray instance (the module fixture ``ray_session``), so Ray starts once.

The models are the smallest SDXL topology our tables and diffusers build (``MICRO``: one transformer
block per attention level, two-layer text encoders): a verify job on them costs seconds, where the
``tiny`` models' take most of a minute on a busy 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import TensorFile, read_header
from lora_tools.recipes import LocalExecutor, plan_recipe, run_recipe
from lora_tools.testing.synthetic import MICRO
from tests.recipe_helpers import REPO_RECIPES, tokenizer_config

HAVE_RAY = importlib.util.find_spec("ray") is not None
INSIDE = os.environ.get("LORATOOL_RAY_NETNS") == "1"


def _only_loopback() -> bool:
    """This process's network namespace has no interface but loopback (asked of the kernel:
    /sys/class/net shows the namespace sysfs was mounted in, not ours)."""
    import socket

    try:
        return [name for _, name in socket.if_nameindex()] == ["lo"]
    except OSError:
        return False


inside_namespace = pytest.mark.skipif(
    not (INSIDE and HAVE_RAY and _only_loopback()),
    reason="starts Ray: runs only inside the loopback-only namespace made by test_ray_in_a_loopback_only_namespace")


# -- the outer test: re-run this file in a loopback-only network namespace -----------------------------
@pytest.mark.slow  # Ray's start-up and the two batches: about 2-3 min on a busy 2-core machine
@pytest.mark.skipif(INSIDE, reason="this is the run inside the namespace")
def test_ray_in_a_loopback_only_namespace(tmp_path: Path) -> None:
    if not HAVE_RAY:
        pytest.skip("ray is not installed (pip install 'lora-tools[ray]')")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare/ip not found: cannot make a loopback-only network namespace, and Ray is never started outside one")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here ({probe.stderr.strip() or 'unshare failed'}); "
                    "Ray is never started outside one")
    env = {**os.environ, "LORATOOL_RAY_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = (f"ip link set lo up && exec {sys.executable} -m pytest -q -m '' -p no:cacheprovider -x "
           f"--basetemp={tmp_path / 'inner'} {Path(__file__).resolve()}")
    run = subprocess.run(["unshare", "--net", "sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).resolve().parents[1])
    tail = run.stdout[-6000:] + "\n" + run.stderr[-3000:]
    assert run.returncode == 0, tail
    summary = run.stdout.strip().splitlines()[-1]
    ran = sum(1 for name in dir(sys.modules[__name__]) if name.startswith("test_") and name not in _OUTSIDE_ONLY)
    assert f"{ran} passed" in summary and "failed" not in summary and "error" not in summary, tail


#: Tests that run outside the namespace only (they skip inside it).
_OUTSIDE_ONLY = {"test_ray_in_a_loopback_only_namespace", "test_unreachable_address_is_one_line_and_quick",
                 "test_an_address_that_is_not_ray_is_one_line_and_bounded", "test_ray_not_installed_names_the_extra",
                 "test_task_resources_follow_the_job_kind_and_plan"}


# -- the models: the smallest SDXL topology (lora_tools.testing's "micro" size) ----------------------------


@dataclass(frozen=True)
class Micro:
    base_a: Path
    base_b: Path
    lightning: Path
    config: Path  # verify's tokenizers


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Micro:
    from lora_tools.testing.synthetic import write_checkpoint
    from lora_tools.testing.synthetic_lora import write_lightning_lora

    root = tmp_path_factory.mktemp("micro")
    bases = [write_checkpoint(root / f"base-{x}.safetensors", MICRO, seed=i, dtype="fp16", metadata={"format": "pt"})
             for i, x in enumerate("ab")]
    lightning = root / "lightning"
    lightning.mkdir()
    for steps in (2, 4, 8):
        write_lightning_lora(lightning / f"sdxl_lightning_{steps}step_lora.safetensors", MICRO, seed=10 + steps, rank=4)
    return Micro(bases[0], bases[1], lightning, tokenizer_config(root))


#: A recipe's ``created``: both executors record the same time, so their files are the same bytes.
CREATED = "2026-11-25T23:59:00Z"


def _batch_sets(m: Micro, out: Path, base_b: Path | None = None, created: str | None = CREATED) -> list[str]:
    """The publisher batch's sets for fuse + verify jobs, verify made cheap (32x32, one prompt and seed, CPU)."""
    return ([f"created='{created}'"] if created else []) + [
            f"base_a={m.base_a}", f"base_b={base_b or m.base_b}", f"lightning={m.lightning}", f"output_dir={out}",
            "verify_size=32x32", "verify_device=cpu", f"jobs.1.verify.config={m.config}",
            "jobs.1.verify.prompts=[a cat]", "jobs.1.verify.seeds=[0]", "jobs.1.verify.dtype=fp32"]


def _batch(m: Micro, out: Path, *only: str, base_b: Path | None = None,  # type: ignore[no-untyped-def]
           created: str | None = CREATED):
    """2 bases x 3 step counts: 6 fuse jobs and the 6 verify jobs that follow them (not the publish jobs)."""
    return plan_recipe(REPO_RECIPES / "publisher-batch.yaml", only=list(only) or ["base_*", "verify-*"],
                       sets=_batch_sets(m, out, base_b, created))


def _lightning_recipe(m: Micro, out: Path) -> list[str]:
    return [str(REPO_RECIPES / "lightning-4step.yaml"), "--set", f"base={m.base_a}",
            "--set", f"lightning={m.lightning}", "--set", f"output_dir={out}"]


def _invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


# -- without Ray running: bad addresses, Ray missing, what each task asks for ----------------------------
@pytest.mark.skipif(INSIDE, reason="covered outside")
def test_unreachable_address_is_one_line_and_quick(micro: Micro, tmp_path: Path) -> None:
    start = time.monotonic()
    result = _invoke("run", *_lightning_recipe(micro, tmp_path / "out"), "--executor", "ray",
                     "--address", "127.0.0.1:9")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: no Ray cluster reachable at '127.0.0.1:9' (Connection refused after at most 10 s)."]
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


@pytest.fixture
def not_ray() -> Iterator[int]:
    """A port on loopback where something accepts connections and never says a word (not Ray)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        try:
            while True:
                accepted.append(server.accept()[0])
        except OSError:
            return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in accepted:
        conn.close()


@pytest.mark.skipif(INSIDE, reason="covered outside")
def test_an_address_that_is_not_ray_is_one_line_and_bounded(micro: Micro, tmp_path: Path, not_ray: int) -> None:
    """Joining such a port hangs in Ray for minutes (measured: over 4 min); the probe refuses it in the timeout."""
    if not HAVE_RAY:
        pytest.skip("ray is not installed (pip install 'lora-tools[ray]')")
    import ray

    from lora_tools.recipes.ray_executor import RayExecutor

    address = f"127.0.0.1:{not_ray}"
    start = time.monotonic()
    with pytest.raises(Exception) as caught:  # the library: ClusterError, before ray.init
        RayExecutor(address=address, connect_timeout=1.0).execute([])
    assert type(caught.value).__name__ == "ClusterError" and not ray.is_initialized()
    assert str(caught.value) == (f"no Ray cluster at '{address}': something listens there but does not answer "
                                 "as Ray does (gRPC) within 1 s.")
    result = _invoke("run", *_lightning_recipe(micro, tmp_path / "out"), "--executor", "ray", "--address", address)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: no Ray cluster at '{address}': something listens there but does not answer as Ray does (gRPC) "
        "within 10 s."]
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


@pytest.mark.skipif(INSIDE, reason="covered outside")
def test_ray_not_installed_names_the_extra(micro: Micro, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = _invoke("run", *_lightning_recipe(micro, tmp_path / "out"), "--executor", "ray")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("Error: the Ray executor needs Ray, which is not installed: "
                                     "pip install 'lora-tools[ray]'.")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(INSIDE, reason="covered outside")
def test_task_resources_follow_the_job_kind_and_plan(micro: Micro, tmp_path: Path) -> None:
    """Fuse tasks ask for 2 CPUs (1 on a 1-CPU cluster) and the plan's peak memory; verify tasks for a GPU."""
    from lora_tools.recipes.ray_executor import RayExecutor

    plan = _batch(micro, tmp_path / "out", "base_a-4step", "verify-base_a-4step")
    fuse, verify = plan.jobs
    peak = plan.checks[fuse.name].peak_bytes
    assert list(verify.depends_on) == [fuse.name]
    assert isinstance(peak, int) and peak > 0
    executor = RayExecutor(peak_bytes={n: c.peak_bytes for n, c in plan.checks.items()}, retries=2)
    node = {"CPU": 2.0, "GPU": 1.0, "memory": 8e9}
    assert executor._options(None, fuse, node) == {"max_retries": 2, "retry_exceptions": False, "num_cpus": 2,
                                                   "memory": peak}
    assert executor._options(None, fuse, {"CPU": 1.0}) == {"max_retries": 2, "retry_exceptions": False, "num_cpus": 1.0}
    assert executor._options(None, verify, node) == {"max_retries": 2, "retry_exceptions": False, "num_cpus": 1,
                                                     "num_gpus": 1}


# -- inside the namespace: one Ray instance for the module ------------------------------------------------
@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local instance with 2 CPUs and one (fake) GPU, for verify tasks; yields the kill-once marker."""
    import ray

    marker = tmp_path_factory.mktemp("kill") / "killed-once"
    os.environ["LORATOOL_TEST_KILL_ONCE"] = str(marker)  # inherited by the workers Ray starts
    start = time.monotonic()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    print(f"ray start {time.monotonic() - start:.1f} s")
    yield marker
    ray.shutdown()
    os.environ.pop("LORATOOL_TEST_KILL_ONCE", None)


@pytest.fixture(scope="module")
def local_batch(micro: Micro, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The batch's 12 jobs run by the local executor: the files Ray's run must equal."""
    from tests.fuse_helpers import torch_threads

    out = tmp_path_factory.mktemp("local") / "out"
    with torch_threads(1):  # tiny models on a busy 2-core box: far faster single-threaded
        results = run_recipe(_batch(micro, out), executor=LocalExecutor())
    assert [r.outcome for r in results] == ["done"] * 12, [r.message for r in results]
    return out


def _tensors(path: Path) -> dict[str, bytes]:
    with TensorFile(path) as f:
        return {k: bytes(f.read_bytes(k)) for k in f.keys()}


def _record(path: Path) -> dict:
    record = json.loads(read_header(path).metadata["loratool"])
    record.pop("created")
    return record


def _stamps(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# this one first: the first task that reports progress in this Ray session is the one the hook kills
@inside_namespace
def test_worker_killed_mid_job_is_retried_and_leaves_nothing_partial(ray_session: Path, micro: Micro,
                                                                     local_batch: Path, tmp_path: Path) -> None:
    from lora_tools.recipes.ray_executor import RayExecutor

    assert not ray_session.exists(), "another task took the kill: this test must run first"
    out = tmp_path / "out"
    [result] = run_recipe(_batch(micro, out, "base_a-4step", created=None), executor=RayExecutor(retries=1))
    assert ray_session.exists(), "the test hook did not kill the first try"
    assert result.outcome == "done", result.message
    [made] = out.iterdir()  # the output, and no temp file of the killed try
    assert made.name == "base_a-lightning-4step.safetensors"
    assert _tensors(made) == _tensors(local_batch / made.name)
    assert _record(made) == _record(local_batch / made.name)  # apart from the time it was made


@inside_namespace
def test_matrix_with_verify_on_ray_gives_the_local_files_and_skips_on_rerun(ray_session: Path, micro: Micro,
                                                                            local_batch: Path, tmp_path: Path) -> None:
    import hashlib

    from lora_tools.recipes.ray_executor import RayExecutor

    remote = tmp_path / "ray"
    plan = _batch(micro, remote)
    assert sorted(j.kind for j in plan.jobs) == ["fuse"] * 6 + ["verify"] * 6
    finished: list[str] = []
    results = run_recipe(plan, executor=RayExecutor(max_in_flight=2,
                                                    peak_bytes={n: c.peak_bytes for n, c in plan.checks.items()}),
                         on_event=lambda job, what, result: finished.append(job.name) if what == "end" else None)
    assert [r.outcome for r in results] == ["done"] * 12, [r.message for r in results]
    for job in plan.jobs:  # the driver reported each verify after the fuse it depends on
        assert all(finished.index(d) < finished.index(job.name) for d in job.depends_on), finished
    names = sorted(p.name for p in local_batch.glob("*.safetensors"))
    assert len(names) == 6 and sorted(p.name for p in remote.glob("*.safetensors")) == names
    for name in names:  # the same bytes: tensors, header, record (the recipe pins the time)
        assert (remote / name).read_bytes() == (local_batch / name).read_bytes(), name
    reports = sorted(p.name for p in (local_batch / "verify").iterdir())
    assert len(reports) == 6 and sorted(p.name for p in (remote / "verify").iterdir()) == reports
    for name in reports:
        mine, theirs = (json.loads((d / "verify" / name / "report.json").read_text()) for d in (remote, local_batch))
        fused = remote / f"{name.replace('-', '-lightning-', 1)}.safetensors"
        assert mine["model"]["sha256"] == hashlib.sha256(fused.read_bytes()).hexdigest(), name  # it saw the whole file
        assert mine["model"]["sha256"] == theirs["model"]["sha256"], name
        assert mine["verdict"] == theirs["verdict"] == "pass", name
        assert mine["loratool"]["recipe"] == theirs["loratool"]["recipe"] and mine["loratool"]["passed"], name
        for key in ("settings", "against", "threshold", "preset", "device", "dtype"):
            assert mine[key] == theirs[key], (name, key)
        assert [(i["prompt"], i["seed"]) for i in mine["images"]] == [
            (i["prompt"], i["seed"]) for i in theirs["images"]], name
        for a, b in zip(mine["images"], theirs["images"], strict=True):
            assert a["psnr_db"] == pytest.approx(b["psnr_db"], rel=1e-3), name
    before = _stamps(remote)
    again = run_recipe(_batch(micro, remote), executor=RayExecutor())
    assert [r.outcome for r in again] == ["skipped"] * 12, [r.message for r in again]
    assert _stamps(remote) == before


@inside_namespace
def test_a_failed_job_is_reported_and_the_others_finish(ray_session: Path, micro: Micro, tmp_path: Path) -> None:
    from lora_tools.recipes.ray_executor import RayExecutor

    broken = tmp_path / "broken.safetensors"
    shutil.copyfile(micro.base_b, broken)
    out = tmp_path / "out"
    plan = _batch(micro, out, "base_*", "verify-base_b-*", base_b=broken)
    with open(broken, "r+b") as f:  # damaged after planning: the three base_b jobs fail when they run
        f.truncate(broken.stat().st_size // 2)
    results = run_recipe(plan, executor=RayExecutor())
    outcomes = {r.name: r.outcome for r in results}
    assert outcomes == {**{f"base_a-{s}step": "done" for s in (2, 4, 8)},
                        **{f"base_b-{s}step": "failed" for s in (2, 4, 8)},
                        **{f"verify-base_b-{s}step": "not run" for s in (2, 4, 8)}}
    assert all("broken.safetensors" in r.message for r in results if r.outcome == "failed")
    assert all(r.message == f"needs '{r.name[len('verify-'):]}', which did not finish"
               for r in results if r.outcome == "not run")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"base_a-lightning-{s}step.safetensors" for s in (2, 4, 8))


@inside_namespace
def test_a_running_cluster_passes_the_address_probe(ray_session: Path) -> None:
    """The probe that refuses a port that is not Ray's accepts a real Ray GCS."""
    import ray

    from lora_tools.recipes.ray_executor import _probe

    _probe(ray.get_runtime_context().gcs_address, 5.0)


@inside_namespace
def test_cli_ray_executor_summary(ray_session: Path, micro: Micro, tmp_path: Path) -> None:
    result = _invoke("run", *_lightning_recipe(micro, tmp_path / "out"), "--executor", "ray")
    assert result.exit_code == 0, result.stderr
    assert "1 done." in result.stdout


S3_RECIPE = """\
version: 1
created: '{created}'
output_dir: {out}
inputs:
  base_a: {base_a}
  base_b: {base_b}
  lightning: {lightning}
jobs:
  - name: a-4step
    fuse: {{base: base_a, loras: [lightning], output: base_a-4step.safetensors}}
  - name: b-4step
    fuse: {{base: base_b, loras: [lightning], output: base_b-4step.safetensors}}
  - name: half
    rescale: {{lora: lightning, strength: 0.5, output: loras/half.safetensors}}
"""


@inside_namespace
def test_s3_inputs_and_outputs_on_ray_give_the_local_objects_and_skip_on_rerun(
        ray_session: Path, micro: Micro, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers that share nothing but the object store (a moto S3 server on 127.0.0.1, in this namespace; the
    AWS environment reaches the workers through the executor) write the local executor's objects, byte for byte."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    from lora_tools.recipes.ray_executor import RayExecutor

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
        fs.mkdir("ray")
        inputs = {"base_a": micro.base_a, "base_b": micro.base_b,
                  "lightning": micro.lightning / "sdxl_lightning_4step_lora.safetensors"}
        for path in inputs.values():
            fs.put_file(str(path), f"ray/in/{path.name}")

        def plan(prefix: str):  # type: ignore[no-untyped-def]
            recipe = tmp_path / f"{prefix}.yaml"
            recipe.write_text(S3_RECIPE.format(created=CREATED, out=f"s3://ray/{prefix}",
                                               **{k: f"s3://ray/in/{p.name}" for k, p in inputs.items()}))
            return plan_recipe(recipe)

        local = run_recipe(plan("local"), executor=LocalExecutor())
        assert [r.outcome for r in local] == ["done"] * 3, [r.message for r in local]
        remote = run_recipe(plan("ray"), executor=RayExecutor())
        assert [r.outcome for r in remote] == ["done"] * 3, [r.message for r in remote]
        names = ["base_a-4step.safetensors", "base_b-4step.safetensors", "loras/half.safetensors"]
        for name in names:
            assert fs.cat_file(f"ray/ray/{name}") == fs.cat_file(f"ray/local/{name}"), name
        etags = {n: fs.info(f"ray/ray/{n}", refresh=True)["ETag"] for n in names}
        again = run_recipe(plan("ray"), executor=RayExecutor())
        assert [r.outcome for r in again] == ["skipped"] * 3, [r.message for r in again]
        assert {n: fs.info(f"ray/ray/{n}", refresh=True)["ETag"] for n in names} == etags
    finally:
        server.stop()
