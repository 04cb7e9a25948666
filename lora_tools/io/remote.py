"""Objects on S3-compatible storage (``s3://bucket/key``), read and written streamed.

The one place that talks to an object store. A URL is accepted wherever a path is: :func:`as_path`
turns ``s3://bucket/key`` into an :class:`ObjectPath` (a path whose text is the URL and whose
``exists``/``stat`` ask the store), and the readers and writers of :mod:`lora_tools.io.safetensors`
hand every URL to this module:

- reads are ranged GETs: the header first (a HEAD for the size, then one GET of the first MiB, a
  second only for a longer header), then each tensor's byte range when it is needed; nothing is
  downloaded before it is used;
- writes stream into a multipart upload (:class:`ObjectWriter`) that becomes an object only when it is
  completed, so a killed run leaves no object under the output key; a failed run aborts its upload,
  and the next write to the same key aborts the incomplete uploads a killed run left there.

Credentials, region and endpoint come from the standard AWS environment and config files
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for MinIO, R2 or a
local server): nothing of ours to configure. The client is fsspec's s3fs (the ``s3`` extra), imported
only when a URL is used. Every request is counted (:func:`request_counts`; the CLI shows them with
``--debug``).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PosixPath, PurePath
from typing import Any

from lora_tools.errors import Hint, InvalidFileError, OutputError, UsageError

logger = logging.getLogger(__name__)

SCHEME = "s3://"
#: The first ranged GET of a header: a LoRA's or an SDXL checkpoint's header fits (an SDXL header is ~250 KB).
FIRST_READ = 1 << 20
#: Tensors smaller than this are read in windows of this size (one GET for many small tensors).
WINDOW_BYTES = 16 << 20
#: A big read's body is copied into its tensor in pieces of at most this size, as they arrive.
BODY_PIECE = 1 << 20
#: An object read out of order is copied to a local temporary file when it is at most this big (LoRAs).
SPILL_MAX_BYTES = 2 << 30
#: Multipart part size: 16 MiB (S3 takes 5 MiB to 5 GiB, at most 10 000 parts: 160 GB objects).
PART_BYTES = 16 << 20

_COUNTS: Counter[str] = Counter()
#: Allocations at least this big get pages of their own, given back when freed (glibc; see _fixed_mmap_threshold).
MMAP_THRESHOLD = 256 << 10
_LOCK = threading.Lock()


def is_url(path: object) -> bool:
    """Whether ``path`` names an object: ``s3://...`` text, an :class:`ObjectPath`, or what ``Path("s3://b/k")``
    collapses to (``s3:/b/k``)."""
    if isinstance(path, ObjectPath):
        return True
    if isinstance(path, str):
        return path.startswith(SCHEME)
    if isinstance(path, PurePath):
        return str(path).startswith("s3:/")
    return False


def url_of(path: str | os.PathLike[str]) -> str:
    """The ``s3://bucket/key`` text of a URL given as text or as a path."""
    if isinstance(path, ObjectPath):
        return str(path)
    text = os.fspath(path)
    return text if text.startswith(SCHEME) else SCHEME + text[len("s3:/"):].lstrip("/")


def as_path(value: str | os.PathLike[str]) -> Path:
    """A path for a value the user typed: an :class:`ObjectPath` for a URL, else a plain ``Path``."""
    if isinstance(value, ObjectPath):
        return value
    return ObjectPath(url_of(value)) if is_url(value) else Path(value)


def place(value: str | os.PathLike[str], folder: Path) -> Path:
    """Where ``value`` names a file: a URL as it is, a local path with ``~`` expanded, relative to ``folder``,
    resolved."""
    if is_url(value):
        return as_path(value)
    p = Path(value).expanduser()
    return (p if p.is_absolute() else folder / p).resolve()


def split(url: str | os.PathLike[str]) -> tuple[str, str]:
    """``(bucket, key)`` of a URL.

    Raises:
        UsageError: no bucket or no key (``s3://bucket/`` names no object).
    """
    text = url_of(url)
    bucket, _, key = text[len(SCHEME):].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise UsageError(f"'{text}' names no object: write s3://BUCKET/KEY.")
    return bucket, key


class ObjectPath(PosixPath):
    """A path naming an object (``s3://bucket/key``): its text is the URL; ``exists``, ``is_file`` and
    ``stat`` ask the store (one HEAD); it is never a folder, a link or relative."""

    def __str__(self) -> str:
        parts = self.parts
        return SCHEME + "/".join(parts[1:]) if parts and parts[0] == "s3:" else super().__str__()

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def exists(self, *args: Any, **kwargs: Any) -> bool:
        return len(self.parts) > 2 and head(self) is not None  # a bucket (s3://b) is no object

    def is_file(self) -> bool:
        return self.exists()

    def is_dir(self) -> bool:
        return False

    def is_symlink(self) -> bool:
        return False

    def resolve(self, strict: bool = False) -> ObjectPath:
        return self

    def absolute(self) -> ObjectPath:
        return self

    def is_absolute(self) -> bool:
        return True

    def stat(self, *args: Any, **kwargs: Any) -> os.stat_result:
        info = head(self)
        if info is None:
            raise FileNotFoundError(2, "no such object", str(self))
        return os.stat_result((0o100644, 0, 0, 1, 0, 0, int(info["size"]), 0, 0, 0))


# -- the client -------------------------------------------------------------------------------------------

_FS: dict[tuple[str | None, ...], Any] = {}


def _fixed_mmap_threshold() -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (nothing where the C library is not glibc).

    The client's threads churn through megabytes of short-lived buffers per request beside the engine's tensors;
    glibc raises its threshold to the largest block freed (up to 32 MiB) and keeps what such blocks leave free in
    per-thread arenas: a 7 GB fuse from and to a store held ~400 MiB more than a local one. A fixed threshold
    stops the raising (and so turns off glibc's own adjustment): big blocks are mapped and unmapped."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def _fs() -> Any:
    """The s3fs client for the current AWS environment (one per endpoint and key id)."""
    key = tuple(os.environ.get(v) for v in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                            "AWS_PROFILE", "AWS_DEFAULT_REGION"))
    fs = _FS.get(key)
    if fs is None:
        try:
            import s3fs
        except ImportError:
            raise UsageError("s3:// URLs need the s3 extra: pip install 'lora-tools[s3]'.") from None
        _fixed_mmap_threshold()
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = _FS[key] = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                          client_kwargs={"endpoint_url": endpoint} if endpoint else {})
    return fs


def _count(kind: str) -> None:
    with _LOCK:
        _COUNTS[kind] += 1


def request_counts() -> dict[str, int]:
    """How many requests of each kind this process sent (``GET``, ``HEAD``, ``UploadPart``...)."""
    with _LOCK:
        return dict(_COUNTS)


#: The environment a worker on another machine needs to reach the same store (the standard AWS variables).
AWS_ENV_PREFIX = "AWS_"


def store_env(names: object) -> dict[str, str]:
    """The AWS environment of this process when ``names`` (any JSON-like value) holds an ``s3://`` URL, else ``{}``:
    what an executor hands its workers so they reach the store this process reaches."""
    import json

    if SCHEME not in json.dumps(names, default=str):
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith(AWS_ENV_PREFIX)}


def reset_counts() -> None:
    """Start counting from zero (each command counts its own requests)."""
    with _LOCK:
        _COUNTS.clear()


def _store_error(url: str, e: Exception, doing: str) -> Exception:
    """One line for a store failure (missing object, refused credentials, no such bucket, no server)."""
    if isinstance(e, FileNotFoundError):
        return InvalidFileError(f"'{url}' does not exist.")
    if isinstance(e, PermissionError):
        return InvalidFileError(f"'{url}' cannot be {doing}: access denied (check the AWS credentials).")
    text = " ".join(str(e).split())[:200] or type(e).__name__
    cls = OutputError if doing == "written" else InvalidFileError
    return cls(f"'{url}' cannot be {doing}: {text}.")


def head(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The object's HEAD (``size``, ``ETag``...), or ``None`` when there is none."""
    url = url_of(path)
    bucket, key = split(url)
    _count("HEAD")
    try:
        info = _fs().call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - every client failure becomes one line naming the object
        raise _store_error(url, e, "read") from None
    return {"size": int(info["ContentLength"]), "etag": info.get("ETag")}


def read_range(path: str | os.PathLike[str], start: int, end: int) -> bytes:
    """Bytes ``start..end`` (end exclusive) of an object: one ranged GET."""
    url = url_of(path)
    _count("GET")
    try:
        return bytes(_fs().cat_file(url, start=start, end=end))
    except Exception as e:  # noqa: BLE001 - every client failure becomes one line naming the object
        raise _store_error(url, e, "read") from None


def read_into(path: str | os.PathLike[str], offset: int, view: memoryview) -> None:
    """Fill ``view`` with the object's bytes from ``offset``: one ranged GET, its body copied into ``view``
    piece by piece as it arrives (a whole-body read would hold the tensor twice more: the client's pieces and
    their join)."""
    from fsspec.asyn import sync

    n = view.nbytes
    if not n:
        return
    url = url_of(path)
    bucket, key = split(url)
    fs = _fs()
    _count("GET")
    pos = 0
    try:
        body = fs.call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + n - 1}")["Body"]
        try:
            while pos < n:
                chunk = sync(fs.loop, body.read, min(n - pos, BODY_PIECE))
                if not chunk:
                    break
                view[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
        finally:
            body.close()
    except FileNotFoundError:
        raise InvalidFileError(f"'{url}' does not exist.") from None
    except Exception as e:  # noqa: BLE001 - every client failure becomes one line naming the object
        raise _store_error(url, e, "read") from None
    if pos != n:
        raise InvalidFileError(f"'{url}' is truncated: {pos} of {n} bytes at {offset}.")


def _first_bytes(url: str) -> tuple[int, bytes]:
    """``(object size, its first FIRST_READ bytes)`` in one ranged GET (the size from its Content-Range)."""
    from fsspec.asyn import sync

    bucket, key = split(url)
    fs = _fs()
    _count("GET")
    try:
        resp = fs.call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes=0-{FIRST_READ - 1}")
        data = sync(fs.loop, resp["Body"].read)
    except FileNotFoundError:
        raise InvalidFileError(f"'{url}' does not exist.") from None
    except Exception as e:  # noqa: BLE001 - an empty object has no byte 0 (InvalidRange): its HEAD says so
        info = head(url)
        if info is None:
            raise InvalidFileError(f"'{url}' does not exist.") from None
        if info["size"]:
            raise _store_error(url, e, "read") from None
        return 0, b""
    total = str(resp.get("ContentRange", "")).rpartition("/")[2]
    return (int(total) if total.isdigit() else len(data)), bytes(data)


class RangeReader:
    """An object read by byte ranges, in windows: a read that starts outside the current window fetches
    :data:`WINDOW_BYTES` from there in one GET (tensors are read in file order, so the next few small ones
    come from memory); a read at least that big is one GET of its own. Memory: one window.

    A read that goes back before the window (a LoRA's factors are read in the base's order, not in the
    file's) means a second pass: an object up to :data:`SPILL_MAX_BYTES` is then copied once, in one
    streamed GET, into an unlinked local temporary file, and read from there (the page cache, not this
    process's memory, holds it)."""

    def __init__(self, path: str | os.PathLike[str], size: int):
        self.url = url_of(path)
        self.size = size
        self._start = 0
        self._window = bytearray()  # allocated once, refilled in place (no fresh 16 MiB buffer per window)
        self._data = memoryview(self._window)  # the valid part of the window
        self._lock = threading.Lock()
        self._spill: int | None = None  # fd of the local copy

    def read_into(self, offset: int, view: memoryview) -> None:
        n = view.nbytes
        with self._lock:
            if self._spill is None and offset < self._start and self.size <= SPILL_MAX_BYTES:
                self._spill = _spill(self.url)
                self._drop_window()
            if self._spill is not None:
                _pread_all(self._spill, view, offset, self.url)
                return
            if n >= WINDOW_BYTES:
                self._data, self._start = self._data[:0], offset
                read_into(self.url, offset, view)
                return
            if not (self._start <= offset and offset + n <= self._start + len(self._data)):
                if not self._window:
                    self._window = bytearray(WINDOW_BYTES)
                self._data, self._start = memoryview(self._window)[:0], offset
                end = min(self.size, offset + WINDOW_BYTES)
                if end < offset + n:
                    raise InvalidFileError(f"'{self.url}' is truncated: {max(0, end - offset)} of {n} bytes at "
                                           f"{offset}.")
                read_into(self.url, offset, memoryview(self._window)[:end - offset])
                self._data = memoryview(self._window)[:end - offset]
            begin = offset - self._start
            view[:] = self._data[begin:begin + n]

    def _drop_window(self) -> None:
        self._data.release()
        self._data, self._window = memoryview(b""), bytearray()

    def close(self) -> None:
        self._drop_window()
        if self._spill is not None:
            os.close(self._spill)
            self._spill = None


def _spill(url: str) -> int:
    """A local copy of the object (one streamed GET), unlinked at once: its open file descriptor."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix=".loratool-object-", suffix=".partial")
    try:
        os.close(fd)
        _count("GET")
        try:
            _fs().get_file(url, name)
        except Exception as e:  # noqa: BLE001 - every client failure becomes one line naming the object
            raise _store_error(url, e, "read") from None
        return os.open(name, os.O_RDONLY)
    finally:
        os.unlink(name)


def _pread_all(fd: int, view: memoryview, offset: int, url: str) -> None:
    pos = 0
    while pos < view.nbytes:
        got = os.preadv(fd, [view[pos:]], offset + pos)
        if got <= 0:
            raise InvalidFileError(f"'{url}' is truncated at byte {offset + pos}.")
        pos += got


def header_bytes(path: str | os.PathLike[str]) -> tuple[int, bytes, bytes]:
    """``(object size, first 8 bytes, header)`` in one HEAD and one ranged GET (two for a header over 1 MiB).

    Raises:
        InvalidFileError: no such object, or it cannot be read.
    """
    url = url_of(path)
    size, first = _first_bytes(url)
    if len(first) < 8:
        return size, first, b""
    n = int.from_bytes(first[:8], "little")
    want = min(n, max(0, size - 8))
    if 8 + want <= len(first) or want > 100_000_000:
        return size, first[:8], first[8:8 + want]
    return size, first[:8], first[8:] + read_range(url, len(first), 8 + want)


class ObjectReader:
    """A binary file over a whole object, read front to back from ONE streamed GET (for hashing)."""

    def __init__(self, path: str | os.PathLike[str]):
        from fsspec.asyn import sync

        self.url = url_of(path)
        bucket, key = split(self.url)
        self._fs = _fs()
        self._sync = sync
        _count("GET")
        try:
            self._body = self._fs.call_s3("get_object", Bucket=bucket, Key=key)["Body"]
        except FileNotFoundError:
            raise InvalidFileError(f"'{self.url}' does not exist.") from None
        except Exception as e:  # noqa: BLE001 - every client failure becomes one line naming the object
            raise _store_error(self.url, e, "read") from None

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._body.close()

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            try:
                chunk = self._sync(self._fs.loop, self._body.read, -1 if n < 0 else n - len(out))
            except Exception as e:  # noqa: BLE001 - a dropped connection is one line naming the object
                raise _store_error(self.url, e, "read") from None
            if not chunk:
                break
            out += chunk
            if n < 0:
                break
        return bytes(out)

    def readinto(self, view: Any) -> int:
        data = self.read(memoryview(view).nbytes)
        memoryview(view).cast("B")[:len(data)] = data
        return len(data)


def open_read(path: str | os.PathLike[str]) -> Any:
    """A binary file for reading: a local file, or an :class:`ObjectReader` for a URL."""
    return ObjectReader(path) if is_url(path) else open(path, "rb", buffering=0)


# -- writing ------------------------------------------------------------------------------------------------


def abort_stale_uploads(path: str | os.PathLike[str]) -> int:
    """Abort the incomplete multipart uploads under the object's exact key (what a killed run left);
    returns how many. Never touches another key."""
    url = url_of(path)
    bucket, key = split(url)
    fs = _fs()
    _count("ListMultipartUploads")
    try:
        listed = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
    except OSError as e:
        if e.errno != errno.ENOSYS:  # s3fs's NotImplemented: a store that cannot list uploads (s3rver)
            raise _store_error(url, e, "written") from None
        logger.warning("the store cannot list incomplete uploads: those a killed run left under '%s' stay", url)
        return 0
    except Exception as e:  # noqa: BLE001 - every client failure becomes one line naming the object
        raise _store_error(url, e, "written") from None
    stale = [u["UploadId"] for u in listed.get("Uploads", []) if u.get("Key") == key]
    for upload in stale:
        _count("AbortMultipartUpload")
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
    if stale:
        logger.info("aborted %d incomplete upload(s) a killed run left under '%s'", len(stale), url)
    return len(stale)


def list_uploads(path: str | os.PathLike[str]) -> list[str]:
    """The ids of the incomplete multipart uploads under the object's exact key."""
    bucket, key = split(path)
    listed = _fs().call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
    return [u["UploadId"] for u in listed.get("Uploads", []) if u.get("Key") == key]


class ObjectWriter:
    """Bytes streamed into a multipart upload: invisible under the key until :meth:`commit`.

    Parts of :data:`PART_BYTES` are uploaded in a background thread while the next one fills (two
    buffers: memory stays at two parts). :meth:`finish` uploads the last part; :meth:`commit` completes
    the upload (the object appears whole, S3's own atomicity); :meth:`abort` drops it.
    """

    def __init__(self, path: str | os.PathLike[str], part_bytes: int = PART_BYTES):
        self.url = url_of(path)
        self.bucket, self.key = split(self.url)
        self.part_bytes = part_bytes
        fs = _fs()
        _count("CreateMultipartUpload")
        try:
            self.upload_id: str | None = fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key,
                                                    ContentType="application/octet-stream")["UploadId"]
        except Exception as e:  # noqa: BLE001 - every client failure becomes one line naming the object
            raise _store_error(self.url, e, "written") from None
        self._buffers = [bytearray(part_bytes), bytearray(part_bytes)]
        self._fill = 0
        self._parts: list[dict[str, Any]] = []
        self._pending: Future[None] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loratool-upload")

    def write(self, view: memoryview) -> None:
        pos = 0
        while pos < view.nbytes:
            n = min(view.nbytes - pos, self.part_bytes - self._fill)
            self._buffers[0][self._fill:self._fill + n] = view[pos:pos + n]
            self._fill += n
            pos += n
            if self._fill == self.part_bytes:
                self._send()

    def _send(self) -> None:
        self._wait()
        buf, self._buffers = self._buffers[0], self._buffers[::-1]
        # a full part goes out from its buffer as it is (not refilled before its upload is done); the last one copied
        data, self._fill = (buf if self._fill == len(buf) else bytes(buf[:self._fill])), 0
        number = len(self._parts) + 1
        self._parts.append({"PartNumber": number})
        self._pending = self._pool.submit(self._upload, number, data)

    def _upload(self, number: int, data: bytes | bytearray) -> None:
        _count("UploadPart")
        result = _fs().call_s3("upload_part", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                               PartNumber=number, Body=data)
        self._parts[number - 1]["ETag"] = result["ETag"]

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            except Exception as e:  # noqa: BLE001 - every client failure becomes one line naming the object
                raise _store_error(self.url, e, "written") from None

    def finish(self) -> None:
        """Upload what is buffered; every part is then in the store (not yet an object)."""
        if self._fill or not self._parts:
            self._send()
        self._wait()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._buffers = []

    def commit(self) -> None:
        """Complete the upload: the object appears under its key, whole."""
        self.finish()
        _count("CompleteMultipartUpload")
        try:
            _fs().call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                          MultipartUpload={"Parts": self._parts})
        except Exception as e:  # noqa: BLE001 - every client failure becomes one line naming the object
            raise _store_error(self.url, e, "written") from None
        self.upload_id = None

    def abort(self) -> None:
        """Drop the upload (its parts are deleted); the key is never touched."""
        self._pending = None
        self.close()
        if self.upload_id is not None:
            upload, self.upload_id = self.upload_id, None
            _count("AbortMultipartUpload")
            try:
                _fs().call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload)
            except Exception as e:  # noqa: BLE001 - the next write to this key aborts it
                logger.warning("could not abort the upload to '%s' (%s): the next run writing it will", self.url, e)


def delete(path: str | os.PathLike[str]) -> None:
    """Delete an object of ours (a rolled-back output)."""
    bucket, key = split(path)
    _count("DeleteObject")
    _fs().call_s3("delete_object", Bucket=bucket, Key=key)


def refuse_folder(path: str | os.PathLike[str], param: str = "output") -> None:
    """Folder outputs (diffusers folders, releases) are local only: one line naming the option."""
    if is_url(path):
        raise UsageError(f"'{url_of(path)}': this output is a folder, and folders are written locally only",
                         hint=Hint(param, "naming a local folder", "PATH"))


