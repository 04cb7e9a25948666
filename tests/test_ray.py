"""``loratool run --executor ray``: the same files as the local executor, retries, failures, bad addresses.

Ray binds its servers to every interface and to the node's own address, and tests here may talk to
loopback only. So Ray is started only inside a network namespace that holds nothing but loopback:
``test_ray_in_a_loopback_only_namespace`` re-runs this file there (``unshare --net``, then
``ip link set lo up``), where Ray falls back to 127.0.0.1. The tests that start Ray skip anywhere
else, and that outer test skips (saying why) where no such namespace can be made.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.recipes import LocalExecutor, plan_recipe, run_recipe
from lora_tools.safetensors_io import TensorFile, read_header
from tests.recipe_fixtures import REPO_RECIPES, Assets, assets  # noqa: F401  (fixture)

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
    cmd = (f"ip link set lo up && exec {sys.executable} -m pytest -q -p no:cacheprovider -x "
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
                 "test_ray_not_installed_names_the_extra"}


# -- without Ray running: bad addresses, Ray missing ------------------------------------------------------
def _invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


def _lightning_recipe(a: Assets, out: Path) -> list[str]:
    return [str(REPO_RECIPES / "lightning-4step.yaml"), "-q", "--set", f"base={a.base_a}",
            "--set", f"lightning={a.lightning}", "--set", f"output_dir={out}"]


@pytest.mark.skipif(INSIDE, reason="covered outside")
def test_unreachable_address_is_one_line_and_quick(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    start = time.monotonic()
    result = _invoke("run", *_lightning_recipe(assets, tmp_path / "out"), "--executor", "ray", "--address", "127.0.0.1:9")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: no Ray cluster reachable at '127.0.0.1:9' (Connection refused after at most 10 s)."]
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(INSIDE, reason="covered outside")
def test_ray_not_installed_names_the_extra(assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = _invoke("run", *_lightning_recipe(assets, tmp_path / "out"), "--executor", "ray")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("Error: the Ray executor needs Ray, which is not installed: "
                                     "pip install 'lora-tools[ray]'.")
    assert not (tmp_path / "out").exists()


# -- inside the namespace: one Ray instance for the module ------------------------------------------------
@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
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


def _tensors(path: Path) -> dict[str, bytes]:
    with TensorFile(path) as f:
        return {k: bytes(f.read_bytes(k)) for k in f.keys()}


def _record(path: Path) -> dict:
    record = json.loads(read_header(path).metadata["loratool"])
    record.pop("created")
    return record


def _batch(a: Assets, out: Path):  # type: ignore[no-untyped-def]
    # the batch's fuse jobs (its verify and publish jobs: tests/test_recipes_jobs.py)
    return plan_recipe(REPO_RECIPES / "publisher-batch.yaml", only=["base_*"],
                       sets=[f"base_a={a.base_a}", f"base_b={a.base_b}", f"lightning={a.lightning}", f"output_dir={out}"])


@inside_namespace
def test_worker_killed_mid_job_is_retried_and_leaves_nothing_partial(ray_session, assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    from lora_tools.recipes.ray_executor import RayExecutor

    out = tmp_path / "out"
    plan = plan_recipe(REPO_RECIPES / "lightning-4step.yaml",
                       sets=[f"base={assets.base_a}", f"lightning={assets.lightning}", f"output_dir={out}"])
    [result] = run_recipe(plan, executor=RayExecutor(retries=1))
    assert ray_session.exists(), "the test hook did not kill the first try"
    assert result.outcome == "done", result.message
    [made] = out.iterdir()  # the output, and no temp file of the killed try
    local = tmp_path / "local"
    run_recipe(plan_recipe(REPO_RECIPES / "lightning-4step.yaml",
                           sets=[f"base={assets.base_a}", f"lightning={assets.lightning}", f"output_dir={local}"]),
               executor=LocalExecutor())
    assert _tensors(made) == _tensors(local / made.name)
    assert _record(made) == _record(local / made.name)


@inside_namespace
def test_matrix_on_ray_gives_the_local_files_and_skips_on_rerun(ray_session, assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    from lora_tools.recipes.ray_executor import RayExecutor

    local, remote = tmp_path / "local", tmp_path / "ray"
    assert [r.outcome for r in run_recipe(_batch(assets, local), executor=LocalExecutor())] == ["done"] * 6
    plan = _batch(assets, remote)
    results = run_recipe(plan, executor=RayExecutor(max_in_flight=2,
                                                    peak_bytes={n: c.peak_bytes for n, c in plan.checks.items()}))
    assert [r.outcome for r in results] == ["done"] * 6, [r.message for r in results]
    names = sorted(p.name for p in local.iterdir())
    assert len(names) == 6 and sorted(p.name for p in remote.iterdir()) == names
    for name in names:
        assert _tensors(remote / name) == _tensors(local / name), name
        assert _record(remote / name) == _record(local / name), name
    before = {p.name: p.stat().st_mtime_ns for p in remote.iterdir()}
    again = run_recipe(_batch(assets, remote), executor=RayExecutor())
    assert [r.outcome for r in again] == ["skipped"] * 6
    assert {p.name: p.stat().st_mtime_ns for p in remote.iterdir()} == before


@inside_namespace
def test_a_failed_job_is_reported_and_the_others_finish(ray_session, assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    from lora_tools.recipes.ray_executor import RayExecutor

    broken = tmp_path / "broken.safetensors"
    shutil.copyfile(assets.base_b, broken)
    plan = plan_recipe(REPO_RECIPES / "publisher-batch.yaml", only=["base_*"],
                       sets=[f"base_a={assets.base_a}", f"base_b={broken}", f"lightning={assets.lightning}",
                             f"output_dir={tmp_path / 'out'}"])
    with open(broken, "r+b") as f:  # damaged after planning: the three base_b jobs fail when they run
        f.truncate(broken.stat().st_size // 2)
    results = run_recipe(plan, executor=RayExecutor())
    outcomes = {r.name: r.outcome for r in results}
    assert outcomes == {**{f"base_a-{s}step": "done" for s in (2, 4, 8)}, **{f"base_b-{s}step": "failed" for s in (2, 4, 8)}}
    assert all("broken.safetensors" in r.message for r in results if r.outcome == "failed")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"base_a-lightning-{s}step.safetensors" for s in (2, 4, 8))


@inside_namespace
def test_cli_ray_executor_summary(ray_session, assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    result = _invoke("run", *_lightning_recipe(assets, tmp_path / "out"), "--executor", "ray")
    assert result.exit_code == 0, result.stderr
    assert "1 done." in result.stdout
