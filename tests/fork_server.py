"""A fork server for the tests that run the CLI as a process of its own (signals, exit codes, two runs at once).

A fresh ``python -c "from lora_tools.cli import main; main()"`` pays the interpreter's start and the imports (torch
among them) each time, about a second of CPU. The server is one interpreter started once per session (per xdist
worker) with torch and the commands' modules imported, single-threaded (no Python thread, no torch op run); for each
run it forks a child that takes the run's argv, environment and folder, has the test's pipes as its stdout and
stderr, runs the real entry point (:func:`lora_tools.cli.main`) and exits with its status, as the fresh interpreter
would (``sys.exit``'s code; an uncaught ``KeyboardInterrupt`` kills it with SIGINT). The test gets a
:class:`ForkedRun`, which answers as :class:`subprocess.Popen` does (``pid``, ``poll``, ``send_signal``,
``communicate``, ``returncode``: ``-N`` when a signal ended it).

What a forked child does not have: a fresh interpreter's state. A test about import-time behaviour or the
interpreter's start keeps its own subprocess. The environment: a module the server imported may have read a variable
then (huggingface_hub reads ``HF_*`` at import, torch its threads' variables), so a run that sets or changes a
variable of ``IMPORT_TIME_ENV`` fails at once (exit status ``ENV_REFUSED``, the names on stderr) rather than run with
what the server read.

Each run's child is forked by a small monitor process (forked from the server), which sends the child's pid and
then, once it has reaped it, its wait status over the run's own socket: several runs can be under way at once, and
the pid is no longer a live process (nor a zombie) when the test reads the status.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

#: What the server imports before it forks: what a fuse or LoRA-writing command imports (the rest is imported by the
#: child that needs it, as a fresh interpreter would).
PRELOAD = ("torch", "safetensors.torch", "lora_tools.cli", "lora_tools.hub", "lora_tools.ops.fuse",
           "lora_tools.ops.rescale", "lora_tools.ops.resize", "lora_tools.ops.merge", "lora_tools.ops.convert",
           "lora_tools.ops.extract")
#: Variables (by prefix) that the preloaded modules or the interpreter read at start or import: a run may not change
#: them (the hub's, transformers' and diffusers' settings, torch's and the BLAS libraries' threads, Python's own).
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_",
                   "OPENBLAS_", "CUDA_", "SAFETENSORS_", "PYTHON")
ENV_REFUSED = 70


# ----------------------------------------------------------------------------------------- the server's side


def _serve(channel: socket.socket) -> None:
    import importlib

    start_env = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    sys.stdout.flush()
    sys.stderr.flush()
    channel.sendall(b"ready")
    while True:
        with contextlib.suppress(ChildProcessError):  # the monitors of finished runs
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        message, fds, _, _ = socket.recv_fds(channel, 1 << 20, 3)
        if not message:  # the tests' process closed its end
            return
        if os.fork() == 0:
            channel.close()
            _monitor(json.loads(message), start_env, *fds)
        for fd in fds:
            os.close(fd)


def _monitor(request: dict[str, object], start_env: dict[str, str], out: int, err: int, control: int) -> None:
    """Forks the run's child, sends its pid, waits for it, sends its wait status; never returns."""
    status = 1
    try:
        pid = os.fork()
        if pid == 0:
            os.close(control)
            _child(request, start_env, out, err)
        os.close(out)
        os.close(err)
        os.write(control, f"{pid}\n".encode())
        _, wait_status = os.waitpid(pid, 0)
        os.write(control, f"{wait_status}\n".encode())
        status = 0
    finally:
        os._exit(status)


def _child(request: dict[str, object], start_env: dict[str, str], out: int, err: int) -> None:
    """The run itself: the CLI's entry point with the run's argv, environment and folder; never returns."""
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        env: dict[str, str] = request["env"]  # type: ignore[assignment]
        changed = sorted(k for k in {*env, *start_env} if env.get(k) != start_env.get(k)
                         and k.startswith(IMPORT_TIME_ENV))
        if changed:
            print(f"fork server: this run changes {', '.join(changed)}, which the server's imports may have read: "
                  "run it in a fresh interpreter (subprocess)", file=sys.stderr)
            code = ENV_REFUSED
            return
        os.chdir(str(request["cwd"]))
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["-c", *request["argv"]]  # type: ignore[misc]
        from lora_tools.cli import main

        try:
            main()
            code = 0
        except SystemExit as e:
            code = _exit_code(e.code)
        except KeyboardInterrupt:  # as a fresh interpreter ends on one: killed by SIGINT
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # noqa: BLE001 - printed as the interpreter would, exit status 1
            import traceback

            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------------------- the tests' side


class ForkServer:
    """The server process and the tests' end of its channel; :meth:`start` runs the CLI."""

    def __init__(self, log: Path) -> None:
        self._channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs, open(log, "wb") as stderr:
            self.process = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        self._log = log
        self._channel.settimeout(120)
        try:
            ready = self._channel.recv(16)
        except TimeoutError:
            ready = b""
        if ready != b"ready":
            self.close()
            raise RuntimeError(f"the fork server did not start: {log.read_text()}")
        self._channel.settimeout(None)

    def start(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None) -> ForkedRun:
        """``loratool ARGV`` in a forked child, with ``env`` (default: this process's) in ``cwd`` (default: here)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        mine, theirs = socket.socketpair()
        request = {"argv": [str(a) for a in argv], "env": dict(os.environ if env is None else env),
                   "cwd": str(cwd if cwd is not None else os.getcwd())}
        try:
            socket.send_fds(self._channel, [json.dumps(request).encode()], [out_w, err_w, theirs.fileno()])
        finally:
            os.close(out_w)
            os.close(err_w)
            theirs.close()
        run = ForkedRun(mine, out_r, err_r)
        if run.pid <= 0:
            raise RuntimeError(f"the fork server did not start the run: {self._log.read_text()}")
        return run

    def close(self) -> None:
        self._channel.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ForkedRun:
    """One run, answering as :class:`subprocess.Popen` with ``stdout``/``stderr`` pipes and ``text=True`` does."""

    def __init__(self, control: socket.socket, out: int, err: int) -> None:
        self._control = control
        self._buffer = b""
        self.stdout: IO[str] = open(out, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by communicate
        self.stderr: IO[str] = open(err, encoding="utf-8", errors="replace")  # noqa: SIM115
        self.returncode: int | None = None
        line = self._line(120)
        self.pid = int(line) if line else -1

    def _line(self, timeout: float | None) -> str | None:
        """The next line from the monitor; ``None`` when none came within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._control], [], [], left)[0]:
                return None
            chunk = self._control.recv(64)
            if not chunk:
                raise RuntimeError("the fork server's monitor ended without the run's status")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        return self.wait(timeout=0, _raise=False)

    def wait(self, timeout: float | None = None, _raise: bool = True) -> int | None:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                if _raise:
                    raise subprocess.TimeoutExpired(f"loratool (pid {self.pid})", timeout or 0)
                return None
            self.returncode = os.waitstatus_to_exitcode(int(line))
            self._control.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Reads stdout and stderr to their end, then waits for the status (``TimeoutExpired`` past ``timeout``)."""
        if self.stdout.closed:  # read to its end already
            self.wait(timeout)
            return "", ""
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks: dict[int, list[bytes]] = {self.stdout.fileno(): [], self.stderr.fileno(): []}
        open_fds = list(chunks)
        while open_fds:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"loratool (pid {self.pid})", timeout or 0)
            for fd in select.select(open_fds, [], [], left)[0]:
                data = os.read(fd, 1 << 16)
                if data:
                    chunks[fd].append(data)
                else:
                    open_fds.remove(fd)
        out, err = (b"".join(c).decode("utf-8", errors="replace") for c in chunks.values())
        self.stdout.close()
        self.stderr.close()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return out, err


if __name__ == "__main__":
    sys.path[0] = ""  # as under ``python -c``: the folder the run is in, not this file's
    _serve(socket.socket(fileno=int(sys.argv[1])))
