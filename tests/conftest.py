"""The suite's shared fixtures and its speed buckets.

Fixtures: models built once per session (never downloaded), in the sizes of ``lora_tools.testing``:
``micro`` for anything that runs diffusers (verify), ``tiny`` for the rest, and the files the fuse,
LoRA-op, recipe and reliability tests share, one ``loratool demo`` run (``demo_run``), and ``forked_cli``: the CLI as a
process of its own, forked from a server that imported torch once per session (tests/fork_server.py), for the tests
about signals and exit statuses that need a real process but not a fresh interpreter. Test modules take them
from here, never from another module. At the end of a session ``_leave_little_behind`` empties pytest's
temporary folder but for the failed tests' own ``tmp_path`` (the fixtures' inputs are gigabytes).

Speed buckets (markers declared in pyproject.toml, ``--strict-markers``): the default selection is
``smoke or not (slow or subprocess or diffusers or ray or fs or large)``; ``-m ""`` runs everything.
:func:`pytest_collection_modifyitems` marks tests by file and by the fixtures they use, and the
``_speed_guard`` fixture fails a test that starts a Python interpreter or loads diffusers' models
without its marker, so a new test cannot slip into the fast bucket by mistake; a default test that takes over
``CPU_BUDGET_S`` of CPU is listed at the end of the run. Under pytest-xdist (``-n 2 --dist loadgroup``) the
kinds, files and fixtures of ``XDIST_GROUP_BY_KIND`` / ``_BY_FILE`` / ``_BY_FIXTURE`` each run on one worker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the helpers import torch and lora_tools: fixtures import them when first used
    from tests.fork_server import ForkedRun
    from tests.fuse_helpers import FuseAssets
    from tests.recipe_helpers import Assets
    from tests.reliability_helpers import RunAs, Tmpfs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ----------------------------------------------------------------------------------------- speed buckets

#: Whole files of one kind.
BY_FILE: dict[str, tuple[str, ...]] = {
    "test_ray.py": ("ray", "slow", "diffusers"),  # verify jobs, local and on Ray
    "test_faults.py": ("subprocess",),
    "test_s3.py": ("slow",),  # a moto S3 server on 127.0.0.1
    "test_demo.py": ("subprocess", "diffusers"),
    "test_examples.py": ("subprocess",),
    "test_output_examples.py": ("subprocess",),
    "test_lora_convert_oracle.py": ("diffusers",),
    "test_merge_oracle.py": ("diffusers",),
    "test_sampling.py": ("diffusers",),
}
#: Fixtures that make a test one kind, wherever it is.
BY_FIXTURE: dict[str, tuple[str, ...]] = {
    "run_as": ("fs",),  # a forked child as another user
    "tmpfs": ("fs",),  # a real mount
    "read_only_fs": ("fs",),
    "medium_model": ("large",),  # ~370 MB on disk
    "demo_run": ("subprocess", "diffusers"),  # `loratool demo` in a fresh interpreter, verify steps included
    "forked_cli": ("subprocess",),  # the CLI as a process of its own (forked by a server started per session)
}


#: Under pytest-xdist (``--dist loadgroup``) the tests of one group run on one worker, one after the other: the
#: kinds that must not run beside each other (Ray clusters; real mounts and other users), the files and the tests
#: that share a session fixture's subprocess runs (``example_run``: each example script once; ``demo_run``).
XDIST_GROUP_BY_KIND: dict[str, str] = {"ray": "ray", "fs": "fs"}
XDIST_GROUP_BY_FILE: dict[str, str] = {"test_examples.py": "examples", "test_output_examples.py": "examples"}
XDIST_GROUP_BY_FIXTURE: dict[str, str] = {"demo_run": "demo"}


@pytest.hookimpl(tryfirst=True)  # before pytest's -m deselection and xdist's grouping read the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        kinds = set(BY_FILE.get(item.path.name, ()))
        fixtures = getattr(item, "fixturenames", ())
        for name in fixtures:
            kinds.update(BY_FIXTURE.get(name, ()))
        for kind in sorted(kinds):
            item.add_marker(kind)
        groups = {XDIST_GROUP_BY_KIND[m.name] for m in item.iter_markers() if m.name in XDIST_GROUP_BY_KIND}
        groups.update([XDIST_GROUP_BY_FILE[item.path.name]] if item.path.name in XDIST_GROUP_BY_FILE else [])
        groups.update(XDIST_GROUP_BY_FIXTURE[name] for name in fixtures if name in XDIST_GROUP_BY_FIXTURE)
        if groups and not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(min(groups)))
        if getattr(config.option, "loadgroup", False):
            _name_the_group(item)
    if getattr(config.option, "loadgroup", False):
        items.sort(key=_long_groups_first)


#: Under ``--dist loadgroup`` the groups start first, the longest first (the Ray cluster ~90 s, the demo ~60 s): each
#: runs on one worker from end to end, and started last it left the other worker idle for its whole length.
GROUP_ORDER = {"ray": 0, "demo": 1, "examples": 2, "fs": 3}


def _long_groups_first(item: pytest.Item) -> int:
    names = [str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")]
    return min((GROUP_ORDER.get(n, len(GROUP_ORDER)) for n in names), default=len(GROUP_ORDER) + 1)


def _name_the_group(item: pytest.Item) -> None:
    """``--dist loadgroup`` sends the tests whose id ends in ``@<group>`` to one worker. pytest-xdist 3.8 appends it by
    setting ``item._nodeid``, which pytest 9.2 no longer reads (the id is ``item._id``, a ``NodeId``): without this,
    each group's tests were spread over both workers (the example scripts and the demo ran once per worker, the real
    mounts ran beside each other). Harmless where xdist does it itself: the scheduler reads the last ``@``."""
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                    for m in item.iter_markers("xdist_group")})
    node_id, suffix = getattr(item, "_id", None), "@" + "_".join(names)
    if names and node_id is not None and not item.nodeid.endswith(suffix):
        item._id = type(node_id).parse(item.nodeid + suffix)


_PYTHON = ("python", "loratool")
_DIFFUSERS_MODELS = "diffusers.models.modeling_utils"
_MARK_DIFFUSERS = "mark it @pytest.mark.diffusers (or add its file to conftest.BY_FILE)"


def _starts_python(args: object) -> bool:
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)  # type: ignore[call-overload]
    if not argv:
        return False
    exe = os.fsdecode(argv[0])
    return exe == sys.executable or os.path.basename(exe).startswith(_PYTHON)


@pytest.fixture(autouse=True)
def _speed_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fails a test that does what its markers say it does not: start a Python interpreter without
    ``subprocess`` (or ``ray``), load diffusers' model code without ``diffusers``."""
    marks = {m.name for m in request.node.iter_markers()}
    if not marks & {"subprocess", "ray"}:
        real = subprocess.Popen.__init__

        def guarded(self: subprocess.Popen[bytes], args: object, *rest: object, **kwargs: object) -> None:
            if _starts_python(args):
                raise AssertionError(f"{request.node.nodeid} starts a Python interpreter: mark it "
                                     "@pytest.mark.subprocess (or add its file to conftest.BY_FILE)")
            real(self, args, *rest, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    models = sys.modules.get(_DIFFUSERS_MODELS)
    if "diffusers" not in marks and models is not None:  # loaded by an earlier test: no model may be built

        def refused(self: object, *args: object, **kwargs: object) -> None:
            raise AssertionError(f"{request.node.nodeid} builds a diffusers model: {_MARK_DIFFUSERS}")

        monkeypatch.setattr(models.ModelMixin, "__init__", refused)
    yield
    if "diffusers" not in marks and models is None and _DIFFUSERS_MODELS in sys.modules:
        pytest.fail(f"{request.node.nodeid} loads diffusers' models: {_MARK_DIFFUSERS}")


# ----------------------------------------------------------------------------------------- disk

#: What a failing run may keep of its failed tests' ``tmp_path`` folders, per process (two xdist workers: twice this).
KEEP_FAILED_BYTES = 400 * 2**20
_FAILED_TMP: list[Path] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report = yield
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(tmp, Path) and tmp not in _FAILED_TMP:
        _FAILED_TMP.append(tmp)
    return report


@pytest.fixture(autouse=True, scope="session")
def _leave_little_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the session (of each xdist worker), empties this process's temporary folder but for the failed
    tests' own ``tmp_path`` folders, up to ``KEEP_FAILED_BYTES``: pytest keeps a failing run's folders
    (``tmp_path_retention_policy = "failed"``), and the session and module fixtures' inputs (full-size LoRAs, fused
    checkpoints) are gigabytes. What was removed (and its size) is listed in ``removed.txt`` there."""
    yield
    base = tmp_path_factory.getbasetemp()
    keep, kept = set(), 0
    for folder in _FAILED_TMP:
        size = _bytes_under(folder)
        if folder.parent == base and kept + size <= KEEP_FAILED_BYTES:
            keep.add(folder.name)
            kept += size
    removed = [(p.name, _bytes_under(p)) for p in sorted(base.iterdir())
               if p.name not in keep and p.is_dir() and not p.is_symlink()]
    for name, _ in removed:
        shutil.rmtree(base / name, ignore_errors=True)
    if removed and _FAILED_TMP:
        (base / "removed.txt").write_text("".join(f"{name} {size / 2**20:.0f} MiB\n" for name, size in removed))


def _bytes_under(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


# ----------------------------------------------------------------------------------------- models


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread() -> Iterator[None]:
    """Tiny matmuls on a busy 2-core box are much faster single-threaded."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_tools.testing import synthetic

    return synthetic.write_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-sdxl.safetensors", "tiny", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_diffusers_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_tools.testing import synthetic

    return synthetic.write_diffusers_folder(tmp_path_factory.mktemp("tiny-diffusers") / "tiny-sdxl", "tiny",
                                            dtype="fp32")


@pytest.fixture(scope="session")
def tiny_unet_inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny UNet-only fp16 base (seed 0) and a rank-2 LoRA that fits it: the inputs of the bad-input,
    output-path and fault matrices. Tests read them and must leave them as they are."""
    from lora_tools.testing.synthetic import write_checkpoint
    from lora_tools.testing.synthetic_lora import write_lora

    root = tmp_path_factory.mktemp("tiny-unet-inputs")
    return SimpleNamespace(base=write_checkpoint(root / "base.safetensors", "tiny", dtype="fp16", components=("unet",)),
                           lora=write_lora(root / "lora.safetensors", "tiny", rank=2))


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> FuseAssets:
    """The fuse tests' files (tiny fp32 base, its diffusers folder, Lightning and style LoRAs), each built on
    first use."""
    from tests.fuse_helpers import FuseAssets

    return FuseAssets(tmp_path_factory.mktemp("fuse_assets"))


@pytest.fixture(scope="session")
def recipe_assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """The recipe tests' inputs: two tiny bases, a Lightning folder (2/4/8 steps), a style LoRA."""
    from tests.recipe_helpers import build_assets

    return build_assets(tmp_path_factory.mktemp("recipe-assets"))


@pytest.fixture(scope="session")
def micro_verify(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What the verify tests run on, in the micro size (a verify run costs seconds): an fp32 base (seed 1),
    a Lightning 4-step LoRA, the tokenizers a ``--config`` folder holds, the base fused with the LoRA at
    1.0 and at 0.5, and ``dir``, where tests may add files of their own (each under its own name)."""
    from lora_tools.io.diffusers_folder import write_byte_tokenizer
    from lora_tools.ops.fuse import fuse
    from lora_tools.testing.synthetic import MICRO, write_checkpoint
    from lora_tools.testing.synthetic_lora import write_lightning_lora

    d = tmp_path_factory.mktemp("verify")
    base = write_checkpoint(d / "base.safetensors", "micro", dtype="fp32", seed=1)
    lora = write_lightning_lora(d / "L" / "sdxl_lightning_4step_lora.safetensors", "micro")
    config = d / "config"  # what a user's --config DIR holds: the tokenizers
    for name, te in (("tokenizer", MICRO.te1), ("tokenizer_2", MICRO.te2)):
        write_byte_tokenizer(config / name, te.vocab, te.positions)
    full = fuse(base, lightning=4, lightning_dir=d / "L", saves=("checkpoint",), output=d / "fused.safetensors")
    half = fuse(base, lightning=4, lightning_dir=d / "L", lightning_strength=0.5, saves=("checkpoint",),
                output=d / "half.safetensors")
    return {"base": base, "lora": lora, "config": config, "fused": full.files[0].path, "half": half.files[0].path,
            "dir": d}


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """An SDXL-topology model twice as wide as tiny (~370 MB in fp32) and a Lightning-shaped LoRA for it,
    deleted when the module is done.

    The values do not matter here, so the base is written from constants (fast), not from random numbers.
    """
    import dataclasses

    import torch

    from lora_tools.io.safetensors import StreamingWriter, TensorPlan, torch_dtype
    from lora_tools.layouts import TINY
    from lora_tools.testing.synthetic import ALL_COMPONENTS, checkpoint_plan
    from lora_tools.testing.synthetic_lora import write_lora

    d = tmp_path_factory.mktemp("medium")
    cfg = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, model_channels=64))
    entries = checkpoint_plan(cfg, ALL_COMPONENTS, "F32")
    base = d / "medium.safetensors"
    with StreamingWriter(base, [TensorPlan(k, dt, s) for k, s, dt in entries], {"format": "pt"}) as w:
        for key, shape, dt in entries:
            w.write(key, torch.full(shape, 0.01, dtype=torch_dtype(dt)) if dt == "F32"
                    else torch.zeros(shape, dtype=torch.int64))
        w.finalize()
    lora = write_lora(d / "medium-lora.safetensors", cfg, fmt="kohya-diffusers", targets="lightning", rank=4, alpha=4.0)
    yield SimpleNamespace(base=base, lora=lora)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], SimpleNamespace]:
    """``example_run(name)``: ``examples/<name>`` run once per session in a fresh interpreter with its own empty
    TMPDIR: its ``returncode``, ``stdout``, ``stderr`` and ``left`` (what it left in TMPDIR). Two test files read
    the same run (what it prints, what it leaves behind)."""
    runs: dict[str, SimpleNamespace] = {}

    def run(name: str) -> SimpleNamespace:
        if name not in runs:
            tmp = tmp_path_factory.mktemp("example-tmp")
            # torch's compile cache goes where TORCHINDUCTOR_CACHE_DIR says, else under TMPDIR (diffusers' import makes
            # it); set here, as torch sets it in this process once something imported torch._dynamo: runs the same
            # whatever ran before.
            inductor = tmp_path_factory.getbasetemp() / "torchinductor"
            proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300,
                                  env=dict(os.environ, TMPDIR=str(tmp), TORCHINDUCTOR_CACHE_DIR=str(inductor)))
            runs[name] = SimpleNamespace(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr,
                                         left=sorted(p.name for p in tmp.iterdir()))
        return runs[name]

    return run


@pytest.fixture(scope="session")
def forked_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ForkedRun]]:
    """``forked_cli(argv, env=None, cwd=None)``: ``loratool ARGV`` as a process of its own, answering as
    ``subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True)`` does, forked from a server that imported torch and
    the commands once per session (``tests/fork_server.py``): for the signal and concurrency tests, a fraction of a
    fresh interpreter's cost. A test about the interpreter's start or import-time behaviour starts its own."""
    from tests.fork_server import ForkServer

    server = ForkServer(tmp_path_factory.mktemp("fork-server") / "server.log")
    yield server.start
    server.close()


#: The folder ``loratool demo`` writes by default, relative to where it runs (what it prints, what the README shows).
DEMO_DIR = Path("demo-output")


def _demo_subprocess(cwd: Path, *extra: str) -> SimpleNamespace:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", "from lora_tools.cli import main; main()", "demo", *extra],
                          cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    run = SimpleNamespace(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, cwd=cwd,
                          folder=cwd / DEMO_DIR, shown=DEMO_DIR)
    run.copy_to = lambda to: _copy_demo(run, to)
    return run


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``loratool demo`` (both verify steps) run once per session as users run it: a fresh interpreter, offline, in a
    folder of its own with the default ``--dir`` (``DEMO_DIR``, so it prints what the README shows). Its
    ``returncode``, ``stdout``, ``stderr``, ``cwd``, ``folder`` (``cwd / DEMO_DIR``), ``shown`` (``DEMO_DIR``, the folder
    as the demo prints it) and ``copy_to(cwd)``. Tests read it
    and leave it as it is: one that runs commands in it works on a copy (``copy_to``)."""
    return _demo_subprocess(tmp_path_factory.mktemp("demo-run"))


@pytest.fixture(scope="session")
def demo_rerun_no_render(demo_run: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``loratool demo --no-render`` run once per session (as ``demo_run``) over a copy of ``demo_run``'s folder,
    which it empties and rebuilds: the same fields."""
    cwd = tmp_path_factory.mktemp("demo-rerun")
    demo_run.copy_to(cwd)
    return _demo_subprocess(cwd, "--no-render")


def _copy_demo(run: SimpleNamespace, cwd: Path) -> Path:
    """Copies a demo run's folder into ``cwd`` (under the same name, so its printed commands run there)."""
    assert run.returncode == 0, run.stderr
    return Path(shutil.copytree(run.folder, cwd / DEMO_DIR, symlinks=True))


# ----------------------------------------------------------------------------------------- environments


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache with the hub offline: tests fill it, nothing is downloaded."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return cache


@pytest.fixture
def run_as() -> RunAs:
    """``run_as(uid, gid, argv)``: the CLI in a forked child as that user; its exit code, stdout and stderr."""
    from tests.reliability_helpers import run_as

    return run_as


@pytest.fixture
def tmpfs() -> Tmpfs:
    """``with tmpfs(at, options) as folder``: an empty tmpfs mounted at ``at`` (the test is skipped, with the
    reason, where it cannot be mounted), unmounted afterwards."""
    return _tmpfs


@contextlib.contextmanager
def _tmpfs(at: Path, options: str) -> Iterator[Path]:
    at.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("this test mounts a small tmpfs, which needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(at)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield at
    finally:
        if subprocess.run(["umount", str(at)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(at)], capture_output=True)


@pytest.fixture
def read_only_fs(tmp_path: Path, tmpfs: Tmpfs) -> Iterator[Path]:
    """An empty tmpfs mounted read-only at ``tmp_path / "ro"``."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        yield ro


# ----------------------------------------------------------------------------------------- the CPU watch

#: A test of the default selection (no slow-kind marker) that takes more CPU than this is listed at the end of the
#: run: mark it ``slow`` (or a kind) so the default stays fast. CPU, not wall time: a busy machine does not move it.
CPU_BUDGET_S = 2.0
_OVER_BUDGET: list[tuple[float, str]] = []
_SLOW_KINDS = ("slow", "subprocess", "diffusers", "ray", "fs", "large")


def _cpu_seconds() -> float:
    import resource

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    start = _cpu_seconds()
    try:
        return (yield)
    finally:  # a user property travels with the report, so pytest-xdist's workers count too
        used = _cpu_seconds() - start
        if used > CPU_BUDGET_S and not any(item.get_closest_marker(k) for k in _SLOW_KINDS):
            item.user_properties.append(("cpu_over_budget_s", round(used, 1)))


# ----------------------------------------------------------------------------------------- the bad-input summary

_BAD_INPUT_OUTCOMES: dict[str, int] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _OVER_BUDGET.extend((float(v), report.nodeid) for k, v in report.user_properties if k == "cpu_over_budget_s")
    if report.when == "call" or (report.when == "setup" and report.skipped):
        if "bad_input_cases" in report.keywords:
            outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
            _BAD_INPUT_OUTCOMES[outcome] = _BAD_INPUT_OUTCOMES.get(outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for used, nodeid in sorted(_OVER_BUDGET, reverse=True):
        terminalreporter.write_line(f"default-selection test over {CPU_BUDGET_S:g} s of CPU ({used:.1f} s): {nodeid} "
                                    "(mark it slow, or its kind)")
    if _BAD_INPUT_OUTCOMES:
        total = sum(_BAD_INPUT_OUTCOMES.values())
        parts = ", ".join(f"{n} {k}" for k, n in sorted(_BAD_INPUT_OUTCOMES.items()))
        terminalreporter.write_line(f"bad-input matrix: {total} cases ({parts})")
