"""Tests for lora_tools.hub and lora_tools.presets. Offline: nothing here may reach the network."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from lora_tools import hub
from lora_tools.cli import error_message
from lora_tools.errors import Hint, HubError, UsageError
from lora_tools.hub import parse_source, resolve_file, resolve_source
from lora_tools.io.hashing import autov2_hash, sha256_file
from lora_tools.presets import (
    LIGHTNING,
    PRESETS,
    SDXL_BASE_REPO,
    SDXL_BASE_UNET_FILE,
    AccelerationPreset,
    SamplerSettings,
    get_preset,
    identify_file,
    lightning_preset,
)

REPO = "ByteDance/SDXL-Lightning"
LORA = "sdxl_lightning_4step_lora.safetensors"
COMMIT = "c9a24f48e1c025556787b0c58dd67a091ece2e44"
CONTENT = b"not really a LoRA, but bytes in the cache"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs offline, whatever the environment: env var and huggingface_hub's own flag."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF_HOME in tmp_path; returns its hub cache folder."""
    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    return home / "hub"


def fill_cache(cache: Path, repo_id: str, filename: str, content: bytes, commit: str = COMMIT) -> Path:
    """Write one file into a hub cache the way huggingface_hub lays it out; return the snapshot path."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo_dir / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)  # no newline: huggingface_hub reads it verbatim
    pointer = repo_dir / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:  # no symlinks (Windows without developer mode): huggingface_hub copies too
        pointer.write_bytes(content)
    return pointer


def _bare(cls: type[BaseException], msg: str = "boom") -> BaseException:
    """An instance of a huggingface_hub error without the HTTP response its __init__ wants."""
    err = cls.__new__(cls)
    Exception.__init__(err, msg)
    return err


# ------------------------------------------------------------------------------ resolve_file


class TestResolveFile:
    def test_finds_cached_file_through_hf_home(self, hf_home: Path) -> None:
        pointer = fill_cache(hf_home, REPO, LORA, CONTENT)
        path = resolve_file(REPO, LORA)
        assert path.read_bytes() == CONTENT
        assert path == pointer
        assert path.name == LORA

    def test_hf_hub_cache_wins_over_hf_home(
        self, hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        other = tmp_path / "other_cache"
        fill_cache(other, REPO, LORA, b"from HF_HUB_CACHE")
        monkeypatch.setenv("HF_HUB_CACHE", str(other))
        assert resolve_file(REPO, LORA).read_bytes() == b"from HF_HUB_CACHE"

    def test_explicit_cache_dir_and_commit_revision(self, tmp_path: Path) -> None:
        cache = tmp_path / "cache"
        fill_cache(cache, REPO, LORA, CONTENT)
        path = resolve_file(REPO, LORA, revision=COMMIT, cache_dir=cache)
        assert path.read_bytes() == CONTENT
        assert COMMIT in path.parts

    def test_file_in_subfolder(self, hf_home: Path) -> None:
        fill_cache(hf_home, SDXL_BASE_REPO, SDXL_BASE_UNET_FILE, b"unet")
        assert resolve_file(SDXL_BASE_REPO, SDXL_BASE_UNET_FILE).read_bytes() == b"unet"

    def test_offline_and_not_cached_names_file_and_suggests_lora(self, hf_home: Path) -> None:
        with pytest.raises(HubError) as info:
            resolve_file(REPO, LORA)
        msg = str(info.value)
        assert "\n" not in msg
        assert msg.startswith(f"Cannot get '{LORA}' from {REPO}: not in the Hugging Face cache")
        assert "HF_HUB_OFFLINE=1" in msg
        assert f"download {REPO} {LORA}" in msg
        assert msg.endswith("; pass lora=PATH with the downloaded file.") and "--lora" not in msg
        assert error_message(info.value).endswith("; pass --lora PATH with the downloaded file.")
        assert isinstance(info.value.__cause__, LocalEntryNotFoundError)
        assert isinstance(info.value, OSError)  # HubError mixes in OSError

    def test_other_file_of_cached_repo_is_still_missing(self, hf_home: Path) -> None:
        fill_cache(hf_home, REPO, LORA, CONTENT)
        other = "sdxl_lightning_8step_lora.safetensors"
        with pytest.raises(HubError, match=f"Cannot get '{other}'"):
            resolve_file(REPO, other)

    def test_pass_with_and_revision_appear_in_message(self, hf_home: Path) -> None:
        with pytest.raises(HubError) as info:
            resolve_file(SDXL_BASE_REPO, SDXL_BASE_UNET_FILE, revision="v1",
                         hint=Hint("original_unet", "with the downloaded file", "PATH"))
        msg = error_message(info.value)
        assert "(revision v1)" in msg and "--revision v1" in msg and msg.endswith("--original-unet PATH with the downloaded file.")

    def test_files_without_a_local_option_suggest_an_alternative(self, hf_home: Path) -> None:
        with pytest.raises(HubError) as info:
            resolve_file(SDXL_BASE_REPO, "tokenizer/vocab.json", instead="--save unet needs no tokenizer.")
        msg = str(info.value)
        assert "into the Hugging Face cache (" in msg and "tokenizer/vocab.json)" in msg
        assert msg.endswith("; --save unet needs no tokenizer.") and "pass " not in msg

    def test_missing_tokenizers_suggest_saving_without_a_diffusers_folder(self, hf_home: Path) -> None:
        from lora_tools.hub import tokenizer_files

        with pytest.raises(HubError) as info:
            tokenizer_files(SDXL_BASE_REPO)
        msg = error_message(info.value)
        assert "into the Hugging Face cache (" in msg and "tokenizer/vocab.json)" in msg
        assert msg.endswith("; pass --save checkpoint or unet instead of diffusers: they need no tokenizer.")
        assert str(info.value).endswith("; pass saves=checkpoint or unet instead of diffusers: they need no tokenizer.")

    def test_offline_env_read_at_call_time(self, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        # huggingface_hub read HF_HUB_OFFLINE at import; our flag must follow the environment now.
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        seen: dict[str, object] = {}

        def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
            seen.update(kwargs)
            raise LocalEntryNotFoundError("not cached")

        monkeypatch.setattr(hub, "hf_hub_download", fake_download)
        with pytest.raises(HubError, match="HF_HUB_OFFLINE=1"):
            resolve_file(REPO, LORA)
        assert seen["local_files_only"] is True
        assert seen["cache_dir"] == str(hf_home)

    def test_explicit_local_files_only(self, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(HubError, match="only local files were allowed.*lora=PATH") as info:
            resolve_file(REPO, LORA, local_files_only=True)
        assert "--lora PATH" in error_message(info.value)

    @pytest.mark.parametrize(
        ("make_error", "expected"),
        [
            (lambda: _bare(GatedRepoError), f"gated; accept its terms at https://huggingface.co/{REPO}"),
            (lambda: _bare(RepositoryNotFoundError), "repository not found on the hub"),
            (lambda: EntryNotFoundError("404"), "no such file in the repository"),
            (lambda: PermissionError("denied"), "PermissionError: denied"),
        ],
    )
    def test_hub_errors_are_mapped(
        self, make_error: Callable[[], BaseException], expected: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
            raise make_error()

        monkeypatch.setattr(hub, "hf_hub_download", fake_download)
        with pytest.raises(HubError) as info:
            resolve_file(REPO, LORA)
        msg = str(info.value)
        assert expected in msg and f"'{LORA}'" in msg and "\n" not in msg

    def test_network_failure_when_online(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "hub_unreachable", lambda endpoint=None: None)  # a TCP connect works, the download fails

        def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
            assert kwargs["local_files_only"] is False
            try:
                raise ConnectionError("Name or service not known")
            except ConnectionError as cause:
                raise LocalEntryNotFoundError("An error happened") from cause

        monkeypatch.setattr(hub, "hf_hub_download", fake_download)
        with pytest.raises(HubError) as info:
            resolve_file(REPO, LORA)
        msg = str(info.value)
        assert "could not be reached" in msg and "ConnectionError" in msg and "--lora PATH" in error_message(info.value)

    def test_malformed_repo_id_is_usage_error(self, hf_home: Path) -> None:
        with pytest.raises(UsageError):
            resolve_file("not a repo!!", LORA)


# ------------------------------------------------------------------------------ sources


class TestParseSource:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("path/to/x.safetensors:0.6", ("path/to/x.safetensors", 0.6)),
            ("path/to/x.safetensors", ("path/to/x.safetensors", 1.0)),
            ("x.safetensors:-0.5", ("x.safetensors", -0.5)),
            ("x.safetensors:1", ("x.safetensors", 1.0)),
            ("x.safetensors:.25", ("x.safetensors", 0.25)),
            ("C:\\loras\\x.safetensors", ("C:\\loras\\x.safetensors", 1.0)),
            ("C:\\loras\\x.safetensors:0.8", ("C:\\loras\\x.safetensors", 0.8)),
            ("C:/loras/x.safetensors", ("C:/loras/x.safetensors", 1.0)),
            (f"{REPO}/{LORA}:0.9", (f"{REPO}/{LORA}", 0.9)),
            ("weird:name.safetensors", ("weird:name.safetensors", 1.0)),
            ("  x.safetensors:0.5  ", ("x.safetensors", 0.5)),
        ],
    )
    def test_parse(self, text: str, expected: tuple[str, float]) -> None:
        assert parse_source(text) == expected

    @pytest.mark.parametrize("text", ["", "   ", ":0.5", "x.safetensors:", "x.safetensors:inf", "x.safetensors:nan"])
    def test_rejects(self, text: str) -> None:
        with pytest.raises(UsageError):
            parse_source(text)

    def test_existing_file_with_colon_wins(self, tmp_path: Path) -> None:
        f = tmp_path / "odd:0.5"
        try:
            f.write_bytes(b"x")
        except OSError:
            pytest.skip("file system does not allow ':' in names")
        assert parse_source(str(f)) == (str(f), 1.0)


class TestResolveSource:
    def test_local_file(self, tmp_path: Path) -> None:
        f = tmp_path / "x.safetensors"
        f.write_bytes(b"x")
        assert resolve_source(str(f)) == f

    def test_hub_reference_from_cache(self, hf_home: Path) -> None:
        fill_cache(hf_home, REPO, LORA, CONTENT)
        assert resolve_source(f"{REPO}/{LORA}").read_bytes() == CONTENT

    def test_hub_reference_not_cached(self, hf_home: Path) -> None:
        with pytest.raises(HubError) as info:
            resolve_source(f"{REPO}/{LORA}")
        msg = str(info.value)
        assert msg.startswith(f"No local file '{REPO}/{LORA}', and cannot get '{LORA}' from {REPO}")
        assert "--lora PATH" in error_message(info.value) and "--lora" not in msg

    @pytest.mark.parametrize("src", ["missing.safetensors", "./a/b/c.safetensors", "/nope/a/b.safetensors", "a//b"])
    def test_neither_file_nor_hub_reference(self, src: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(UsageError, match="is not a file and not a hub reference"):
            resolve_source(src)

    def test_directory(self, tmp_path: Path) -> None:
        with pytest.raises(UsageError, match="is a directory"):
            resolve_source(str(tmp_path))


# ------------------------------------------------------------------------------ an unreachable hub

_PROBE_SCRIPT = """
import sys, time
from click.testing import CliRunner
from lora_tools.cli import cli
start = time.perf_counter()
result = CliRunner().invoke(cli, sys.argv[1:])
print(f"{time.perf_counter() - start:.3f}")
sys.stderr.write(result.stderr)
sys.exit(result.exit_code)
"""


@pytest.mark.subprocess
def test_unreachable_hub_is_one_line_in_seconds(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """No HF_HUB_OFFLINE and a hub endpoint on a closed loopback port: huggingface_hub would retry
    for about 23 s; one short connect says it is unreachable and the fuse stops at once."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(var, None)
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT, "fuse", str(tiny_checkpoint), "--lora",
                           "owner/repo/style.safetensors", "-o", str(out), "-q"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        "Error: No local file 'owner/repo/style.safetensors', and cannot get 'style.safetensors' from owner/repo: "
        "the hub (http://127.0.0.1:9) could not be reached (ConnectionRefusedError: [Errno 111] Connection refused) "
        "and the file is not in the Hugging Face cache. Check the network, or download it on a machine with network "
        "(hf download owner/repo style.safetensors); pass --lora PATH with the downloaded file."]
    assert float(proc.stdout.strip()) < 5.0, "the command (imports excluded) took too long"
    assert not out.exists()


class TestProbe:
    @pytest.fixture(autouse=True)
    def fresh(self, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
        """A process that has not probed yet, online, whose connects are recorded (and refused)."""
        monkeypatch.setattr(hub, "_probed", {})
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(var, raising=False)
        calls: list[tuple[str, int]] = []

        def refuse(address: tuple[str, int], timeout: float | None = None) -> object:
            calls.append(address)
            raise ConnectionRefusedError(111, "Connection refused")

        monkeypatch.setattr(hub.socket, "create_connection", refuse)
        return calls

    def test_probed_once_per_process(self, fresh: list[tuple[str, int]], hf_home: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
        def no_download(*args: object, **kwargs: object) -> str:
            raise AssertionError("hf_hub_download must not run when the hub is unreachable")

        monkeypatch.setattr(hub, "hf_hub_download", no_download)
        for _ in range(3):
            with pytest.raises(HubError, match=r"could not be reached \(ConnectionRefusedError"):
                resolve_file(REPO, LORA)
        assert fresh == [("huggingface.co", 443)]

    def test_a_cached_file_needs_no_probe(self, fresh: list[tuple[str, int]], hf_home: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        pointer = fill_cache(hf_home, REPO, LORA, CONTENT)
        monkeypatch.setattr(hub, "hf_hub_download", lambda repo_id, filename, **kw: str(pointer))
        assert resolve_file(REPO, LORA).read_bytes() == CONTENT
        assert fresh == []

    def test_the_proxy_is_probed(self, fresh: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
        assert hub._probe_target("https://huggingface.co") == ("proxy.example", 3128)
        assert hub.hub_unreachable("https://huggingface.co") == "ConnectionRefusedError: [Errno 111] Connection refused"
        assert fresh == [("proxy.example", 3128)]
        assert hub._probe_target("http://127.0.0.1:9") == ("127.0.0.1", 9)  # http: no https proxy


def test_a_listening_port_is_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setattr(hub, "_probed", {})
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert hub.hub_unreachable(f"http://127.0.0.1:{server.getsockname()[1]}") is None


# ------------------------------------------------------------------------------ hashes


def test_sha256_file_small_chunks(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    data = bytes(range(256)) * 41
    f.write_bytes(data)
    assert sha256_file(f, chunk=1000) == hashlib.sha256(data).hexdigest()
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_autov2_hash() -> None:
    sha = LIGHTNING[4].known_sha256[LORA]
    assert autov2_hash(sha) == "bf56cf2657"
    assert autov2_hash(sha.upper()) == "bf56cf2657"
    with pytest.raises(UsageError):
        autov2_hash("bf56cf2657")


# ------------------------------------------------------------------------------ presets


class TestPresets:
    def test_table(self) -> None:
        assert sorted(LIGHTNING) == [1, 2, 4, 8]
        for steps, p in LIGHTNING.items():
            assert p.steps == p.sampler.steps == steps
            assert p.repo_id == REPO and p.family == "lightning"
            assert p.sampler.scheduler == "EulerDiscreteScheduler"
            assert p.sampler.timestep_spacing == "trailing"
            assert p.sampler.guidance_scale == 0.0
            comfy = (p.sampler.comfy_sampler, p.sampler.comfy_scheduler, p.sampler.comfy_cfg)
            assert comfy == ("euler", "sgm_uniform", 1.0)
            assert PRESETS[p.name] is p
        assert LIGHTNING[8].lora_file == "sdxl_lightning_8step_lora.safetensors"
        assert LIGHTNING[2].unet_file == "sdxl_lightning_2step_unet.safetensors"
        assert LIGHTNING[4].checkpoint_file == "sdxl_lightning_4step.safetensors"
        assert LIGHTNING[4].sampler.prediction_type == "epsilon"
        assert SDXL_BASE_REPO == "stabilityai/stable-diffusion-xl-base-1.0"

    def test_one_step_is_x0_without_lora(self) -> None:
        p = lightning_preset(1)
        assert p.sampler.prediction_type == "sample"
        assert p.lora_file is None
        assert p.unet_file == "sdxl_lightning_1step_unet_x0.safetensors"
        assert p.checkpoint_file == "sdxl_lightning_1step_x0.safetensors"
        assert p.sampler.comfy_model_sampling == "x0"
        assert "prediction_type=sample" in p.sampler.describe()

    @pytest.mark.parametrize("steps", [3, 0, 16])
    def test_bad_step_count(self, steps: int) -> None:
        with pytest.raises(UsageError) as info:
            lightning_preset(steps)
        assert str(info.value).startswith(f"SDXL-Lightning has no {steps}-step model: choose 1, 2, 4 or 8 steps")

    def test_get_preset(self) -> None:
        assert get_preset("Lightning-4step") is LIGHTNING[4]
        with pytest.raises(UsageError, match="Did you mean 'lightning-4step'"):
            get_preset("lightning-4steps")

    def test_known_hashes_frozen(self) -> None:
        p = LIGHTNING[4]
        assert len(p.known_sha256) == 2
        with pytest.raises(TypeError):
            p.known_sha256["x"] = "y"  # type: ignore[index]
        assert hash(p) == hash(LIGHTNING[4])
        assert dict(LIGHTNING[1].known_sha256) == {
            "sdxl_lightning_1step_unet_x0.safetensors": (
                "14d53ad5b440a37fc0f429d595d96bf144c5dd842aa5747383e6098c9dbfa644"
            )
        }

    def test_describe(self) -> None:
        assert LIGHTNING[4].sampler.describe() == (
            "EulerDiscreteScheduler, timestep_spacing=trailing, 4 steps, guidance_scale=0 "
            "(ComfyUI: euler + sgm_uniform, CFG 1.0)"
        )
        assert LIGHTNING[1].sampler.describe() == (
            "EulerDiscreteScheduler, timestep_spacing=trailing, prediction_type=sample, 1 step, guidance_scale=0 "
            "(ComfyUI: euler + sgm_uniform, CFG 1.0, sampling x0)"
        )


class TestIdentifyFile:
    @pytest.mark.parametrize(
        ("name", "steps"),
        [
            (LORA, 4),
            ("/models/loras/SDXL_Lightning_8step_LoRA.safetensors", 8),
            ("C:\\models\\sdxl_lightning_2step_unet.safetensors", 2),
            (f"{REPO}/sdxl_lightning_1step_x0.safetensors", 1),
            ("sdxl_lightning_1step_unet_x0.safetensors", 1),
        ],
    )
    def test_by_name(self, name: str, steps: int) -> None:
        p = identify_file(name)
        assert p is not None and p.steps == steps

    def test_by_sha_beats_name(self) -> None:
        sha = LIGHTNING[4].known_sha256["sdxl_lightning_4step_unet.safetensors"]
        p = identify_file("renamed.safetensors", sha.upper())
        assert p is LIGHTNING[4]
        sha1 = LIGHTNING[1].known_sha256["sdxl_lightning_1step_unet_x0.safetensors"]
        assert identify_file("sdxl_lightning_8step_lora.safetensors", sha1) is LIGHTNING[1]

    @pytest.mark.parametrize(
        "name",
        ["my_lora.safetensors", "sdxl_lightning_1step_lora.safetensors", "sdxl_lightning_4step_lora.ckpt", ""],
    )
    def test_unknown(self, name: str) -> None:
        assert identify_file(name, "0" * 64) is None


class TestSamplerSettings:
    def test_round_trip(self) -> None:
        for p in LIGHTNING.values():
            d = p.sampler.to_dict()
            assert d["scheduler"] == "EulerDiscreteScheduler"
            assert SamplerSettings.from_dict(d) == p.sampler

    def test_from_string_metadata(self) -> None:
        d = {k: str(v) for k, v in LIGHTNING[1].sampler.to_dict().items()}
        d["future_field"] = "ignored"
        s = SamplerSettings.from_dict(d)
        assert s == LIGHTNING[1].sampler
        assert isinstance(s.steps, int) and isinstance(s.guidance_scale, float)

    def test_from_dict_errors(self) -> None:
        d = LIGHTNING[4].sampler.to_dict()
        with pytest.raises(UsageError, match="missing steps"):
            SamplerSettings.from_dict({k: v for k, v in d.items() if k != "steps"})
        with pytest.raises(UsageError, match="steps"):
            SamplerSettings.from_dict({**d, "steps": "four"})
        with pytest.raises(UsageError, match="prediction_type"):
            SamplerSettings.from_dict({**d, "prediction_type": "flow"})

    def test_frozen(self) -> None:
        with pytest.raises(AttributeError):
            LIGHTNING[4].sampler.steps = 8  # type: ignore[misc]
        assert isinstance(LIGHTNING[4], AccelerationPreset)
