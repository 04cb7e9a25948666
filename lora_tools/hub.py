"""The Hugging Face hub: the only module of lora_tools that touches the network.

Everything goes through ``huggingface_hub`` (its cache, ``HF_TOKEN``, ``HF_ENDPOINT``...). Two
settings are re-read from the environment at call time, because ``huggingface_hub`` reads them once
at import: ``HF_HUB_OFFLINE`` (and ``TRANSFORMERS_OFFLINE``), and the cache location
(``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``).

Without ``HF_HUB_OFFLINE`` and without network, ``huggingface_hub`` retries for many seconds
before it gives up. So when a file is not in the cache, a short TCP connect to the endpoint's host
(or its proxy) comes first, once per process (:func:`hub_unreachable`); when it fails, lora_tools
behaves as offline at once.

Every hub failure becomes a one-line :class:`~lora_tools.errors.HubError` that names the repository
and the file and says what to do.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lora_tools.errors import Hint, HubError, UsageError

#: What a missing hub file suggests by default: pass the file, once downloaded, as a LoRA.
LORA_HINT = Hint("lora", "with the downloaded file", "PATH")

logger = logging.getLogger(__name__)

__all__ = ["REPO_ID_RE", "TOKENIZER_FILES", "hub_unreachable", "parse_source", "resolve_file", "resolve_source",
           "tokenizer_files"]

_TRUE = {"1", "ON", "YES", "TRUE"}
#: A hub repository id (``owner/name``), as huggingface_hub validates it.
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


# --------------------------------------------------------------------------------------------
# environment, read at call time


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE


def _offline_from_env() -> bool:
    """Whether the hub is offline: ``huggingface_hub``'s import-time flag or the variables now."""
    return bool(getattr(hf_constants, "HF_HUB_OFFLINE", False)) or _env_true("HF_HUB_OFFLINE") or _env_true(
        "TRANSFORMERS_OFFLINE"
    )


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def _cache_dir_from_env() -> str | None:
    """The hub cache the environment names now, with ``huggingface_hub``'s precedence; None: its default."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(var)
        if value:
            return _expand(value)
    home = os.environ.get("HF_HOME")
    if home:
        return os.path.join(_expand(home), "hub")
    return None


def _hub_version() -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in huggingface_hub.__version__.split(".")[:2])
    except ValueError:
        return (1, 0)
    return (major, minor)


def _cli(*args: str) -> str:
    """Spell a hub CLI command for the installed huggingface_hub (``hf`` since 0.34)."""
    exe = "hf" if _hub_version() >= (0, 34) else "huggingface-cli"
    return " ".join((exe, *args))


def _login_hint() -> str:
    cmd = _cli("auth", "login") if _hub_version() >= (0, 34) else _cli("login")
    return f"log in with '{cmd}' or set HF_TOKEN"


def _one_line(text: object, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------
# reachability, probed once per process

#: How long the reachability probe waits for a TCP connection to the hub (or its proxy).
PROBE_SECONDS = 1.5
_probed: dict[tuple[str, int], str | None] = {}
_probe_lock = threading.Lock()


def _probe_target(endpoint: str) -> tuple[str, int] | None:
    """The ``(host, port)`` a download from ``endpoint`` connects to first: the proxy's, where the
    environment names one for the endpoint's scheme, else the endpoint's own."""
    url = urllib.parse.urlsplit(endpoint)
    scheme = (url.scheme or "https").lower()
    proxy = next((os.environ[v] for v in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY")
                  if os.environ.get(v)), None)
    if proxy:
        url = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        scheme = (url.scheme or "http").lower()
    try:
        port = url.port or (443 if scheme == "https" else 80)
    except ValueError:
        return None
    return (url.hostname, port) if url.hostname else None


def hub_unreachable(endpoint: str | None = None) -> str | None:
    """Why the hub cannot be reached (``"ConnectionRefusedError: ..."``), or ``None`` when a TCP
    connection to it (or to its proxy) opens within :data:`PROBE_SECONDS`.

    The answer is remembered for the rest of the process; name resolution counts against the
    same time limit.

    Args:
        endpoint (`str`, *optional*): the hub's URL; defaults to ``huggingface_hub``'s endpoint
            (``HF_ENDPOINT`` as read at import, else ``https://huggingface.co``).
    """
    target = _probe_target(endpoint or hf_constants.ENDPOINT)
    if target is None:
        return None
    with _probe_lock:
        if target in _probed:
            return _probed[target]
        answer: list[str | None] = []

        def attempt() -> None:
            try:
                socket.create_connection(target, timeout=PROBE_SECONDS).close()
                answer.append(None)
            except OSError as e:
                answer.append(f"{type(e).__name__}: {_one_line(e, 100)}")

        worker = threading.Thread(target=attempt, name="loratool-hub-probe", daemon=True)
        worker.start()
        worker.join(PROBE_SECONDS + 0.5)
        why = answer[0] if answer else f"no connection to {target[0]}:{target[1]} within {PROBE_SECONDS:g} s"
        _probed[target] = why
        logger.debug("hub probe %s:%s -> %s", *target, why or "reachable")
        return why


def _cached(repo_id: str, filename: str, revision: str | None, cache_dir: Path | None) -> bool:
    try:
        found = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    except (ValueError, OSError):  # a malformed id: hf_hub_download says so
        return True
    return isinstance(found, str)


# --------------------------------------------------------------------------------------------
# public API


def resolve_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: Path | None = None,
    hint: Hint | None = LORA_HINT,
    instead: str | Hint | None = None,
    tqdm_class: Any | None = None,
) -> Path:
    """Return the local path of a hub file, downloading it into the Hugging Face cache if needed.

    Args:
        repo_id (`str`): the model repository, e.g. ``"ByteDance/SDXL-Lightning"``.
        filename (`str`): the file inside it, e.g. ``"sdxl_lightning_4step_lora.safetensors"``.
        revision (`str`, *optional*): branch, tag or commit; defaults to ``main``.
        local_files_only (`bool`, *optional*): only look in the cache. Defaults to whether
            ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now.
        cache_dir (`Path`, *optional*): the hub cache; defaults to ``HF_HUB_CACHE`` / ``HF_HOME``
            as set now, else ``huggingface_hub``'s default.
        hint (`Hint`, *optional*, defaults to :data:`LORA_HINT`): the parameter the error
            suggests for passing the downloaded file (the CLI spells it as its flag).
        instead (`str` or `Hint`, *optional*): for files that cannot be passed locally, what the error
            message suggests instead of ``hint``: a sentence (no hint is then attached), or a hint naming
            another parameter (attached instead of ``hint``).
        tqdm_class (*optional*): progress bar class handed to ``hf_hub_download``.

    Returns:
        `Path`: the cached file (a path inside ``snapshots/<commit>/``).

    Raises:
        [`HubError`]: offline and not cached, network failure, repository/revision/file not found,
            gated or denied access.
        [`UsageError`]: the repository id or file name is malformed.

    Example:
        ```py
        >>> resolve_file("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_lora.safetensors")
        PosixPath('/home/me/.cache/huggingface/hub/models--ByteDance--SDXL-Lightning/snapshots/...')
        ```
    """
    env_offline = _offline_from_env()
    offline = env_offline if local_files_only is None else bool(local_files_only)
    if cache_dir is None:
        cache_env = _cache_dir_from_env()
        cache_dir = Path(cache_env) if cache_env else None

    kwargs: dict[str, Any] = {"revision": revision, "local_files_only": offline}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if tqdm_class is not None:
        kwargs["tqdm_class"] = tqdm_class

    what = f"Cannot get '{filename}' from {repo_id}" + (f" (revision {revision})" if revision else "")
    download = _cli("download", repo_id, filename, *(("--revision", revision) if revision else ()))
    if instead is None:
        elsewhere, way_out = f"on a machine with network ({download}).", hint
    elif isinstance(instead, Hint):
        elsewhere, way_out = f"into the Hugging Face cache ({download}).", instead
    else:
        elsewhere, way_out = f"into the Hugging Face cache ({download}); {instead}", None
    tree = f"https://huggingface.co/{repo_id}/tree/{revision or 'main'}"

    if not offline and not _cached(repo_id, filename, revision, cache_dir):
        why = hub_unreachable()
        if why is not None:  # behave as offline at once, instead of huggingface_hub's retries
            raise HubError(f"{what}: the hub ({hf_constants.ENDPOINT}) could not be reached ({why}) and the file is "
                           f"not in the Hugging Face cache. Check the network, or download it {elsewhere}", hint=way_out)
    logger.debug("hf_hub_download(%r, %r, %s)", repo_id, filename, kwargs)
    try:
        path = hf_hub_download(repo_id, filename, **kwargs)
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError: it is a subclass
        if offline:
            why = "the hub is offline (HF_HUB_OFFLINE=1)" if env_offline else "only local files were allowed"
            raise HubError(f"{what}: not in the Hugging Face cache and {why}. Download it {elsewhere}", hint=way_out) from e
        cause = e.__cause__ if e.__cause__ is not None else e
        raise HubError(
            f"{what}: the hub could not be reached and the file is not in the Hugging Face cache "
            f"({type(cause).__name__}: {_one_line(cause, 120)}). Check the network, or download it {elsewhere}",
            hint=way_out,
        ) from e
    except GatedRepoError as e:  # before RepositoryNotFoundError: it is a subclass
        raise HubError(
            f"{what}: the repository is gated; accept its terms at https://huggingface.co/{repo_id} "
            f"and {_login_hint()}."
        ) from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"{what}: repository not found on the hub (if it is private, {_login_hint()})."
        ) from e
    except RevisionNotFoundError as e:
        raise HubError(f"{what}: revision '{revision or 'main'}' not found in the repository.") from e
    except EntryNotFoundError as e:
        raise HubError(f"{what}: no such file in the repository; see {tree} for its files.") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(f"{what}: access denied (HTTP {status}); {_login_hint()}.") from e
        raise HubError(f"{what}: the hub answered {_one_line(e)}. Try again later, or download it {elsewhere}",
                       hint=way_out) from e
    except ValueError as e:  # HFValidationError and friends: a malformed repo id or file name
        raise UsageError(f"{what}: {_one_line(e)}") from e
    except OSError as e:  # disk full, permissions, proxy, SSL, missing ETag...
        raise HubError(f"{what}: {type(e).__name__}: {_one_line(e)}") from e
    logger.info("Resolved %s/%s -> %s", repo_id, filename, path)
    return Path(path)


#: The tokenizer files of a diffusers SDXL folder (relative paths), as the SDXL base repository holds them.
TOKENIZER_FILES = tuple(f"{name}/{f}" for name in ("tokenizer", "tokenizer_2")
                        for f in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"))


def tokenizer_files(repo_id: str, *, revision: str | None = None) -> dict[str, Path]:
    """The tokenizer files of an SDXL repository (:data:`TOKENIZER_FILES`) in the Hugging Face cache,
    downloaded if needed.

    Raises:
        [`HubError`]: as :func:`resolve_file`; the error suggests saving without a diffusers folder,
            whose tokenizers are the only ones needed.
    """
    why = Hint("saves", "or unet instead of diffusers: they need no tokenizer", "checkpoint")
    return {rel: resolve_file(repo_id, rel, revision=revision, instead=why) for rel in TOKENIZER_FILES}


def parse_source(text: str) -> tuple[str, float]:
    """Split a ``--lora SRC[:STRENGTH]`` value into the source and its strength.

    The strength is the part after the last ``:`` when that part is a number; otherwise the whole
    text is the source and the strength is 1.0 (the one rule: :func:`lora_tools.values.path_number`).

    Raises:
        [`UsageError`]: empty source, empty, malformed or non-finite strength.

    Example:
        ```py
        >>> parse_source("path/to/x.safetensors:0.6")
        ('path/to/x.safetensors', 0.6)
        >>> parse_source("ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors")
        ('ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors', 1.0)
        ```
    """
    from lora_tools import values

    return values.path_number(text, values.strength, 1.0, name="strength")


def _looks_like_hub_ref(src: str) -> bool:
    if "\\" in src or src.startswith(("/", ".", "~")) or "://" in src:
        return False
    parts = src.split("/")
    if len(parts) < 3 or any(not p or p in (".", "..") for p in parts):
        return False
    return ":" not in parts[0] and ":" not in parts[1]


def resolve_source(src: str, *, revision: str | None = None, hint: Hint | None = LORA_HINT) -> Path:
    """Turn a LoRA/model source into a local path: a local file, or a hub file ``owner/repo/path``.

    Args:
        src (`str`): a local path, or ``"owner/repo/path/in/repo.safetensors"``.
        revision (`str`, *optional*): hub revision for a hub reference.
        hint (`Hint`, *optional*): see :func:`resolve_file`.

    Raises:
        [`UsageError`]: ``src`` is a directory, or neither a file nor a hub reference.
        [`HubError`]: the hub reference cannot be resolved (see :func:`resolve_file`).

    Example:
        ```py
        >>> resolve_source("ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors")
        PosixPath('.../snapshots/.../sdxl_lightning_4step_lora.safetensors')
        ```
    """
    if not src or not src.strip():
        raise UsageError("Empty source: expected a file path or owner/repo/file.safetensors.")
    local = Path(src).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        raise UsageError(f"'{src}' is a directory, not a file: name a .safetensors file inside it.")
    from lora_tools.special_files import refuse_special

    refuse_special(local)
    if not _looks_like_hub_ref(src):
        raise UsageError(f"'{src}' is not a file and not a hub reference (owner/repo/file.safetensors).")
    owner, repo, *rest = src.split("/")
    try:
        return resolve_file(f"{owner}/{repo}", "/".join(rest), revision=revision, hint=hint)
    except HubError as e:
        msg = e.message
        raise HubError(f"No local file '{src}', and {msg[:1].lower()}{msg[1:]}", hint=e.hint) from e
