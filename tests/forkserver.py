"""Start test ranks from a pre-warmed interpreter: the same ``python -m …`` code, without paying
torch + megatron-core + DeepSpeed's import (~4.7 CPU-s) again for every rank of every run.

A server process (started once per test session) imports the heavy libraries and nothing else
that runs: no torch op, no thread pool, no process group. For each request it ``fork()``s a
child that becomes the rank: it takes the requested environment (exactly, as ``Popen(env=…)``
does), working directory and argv, points stdout/stderr at the requested log file, runs the
module or script as ``__main__`` (``runpy``, what ``python -m`` does), runs the exit handlers
and exits with the program's code. The child is a real process: tests signal and kill it by
pid as before; the server reaps it and reports its exit status back.

``spawn(argv, env, cwd, log)`` returns a :class:`Rank`, a ``subprocess.Popen`` look-alike
(``pid``, ``poll``, ``wait``, ``kill``, ``send_signal``, ``communicate``, ``returncode``).
``TWICING_TEST_FORKSERVER=0`` turns it off (every rank is a fresh interpreter again).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

#: what the server imports before it forks (all torch-side modules a rank would import anyway)
WARM = (
    "torch",
    "torch.distributed",
    "deepspeed",
    "megatron.core.parallel_state",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel.schedules",
    "pretrain.training.trainer",
    "pretrain.evaluation.driver",
)


def enabled() -> bool:
    return os.environ.get("TWICING_TEST_FORKSERVER", "1") != "0"


# ----------------------------------------------------------------------------- server side
def _child(request: dict) -> None:
    """Become the rank described by ``request``; never returns."""
    code = 1
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND)  # made by the client
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit():
            import torch

            torch.set_num_threads(int(threads))
        code = _run_main(request["argv"], request["cwd"])
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:  # noqa: BLE001 - what the interpreter would print
        import traceback

        traceback.print_exc()
        code = 1
    try:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _run_main(argv: list[str], cwd: str) -> int:
    import runpy

    sys.path[0:1] = []  # the server's own folder (tests/) is not on a rank's path
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path.insert(0, cwd)
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path.insert(0, "")
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")
    return 0


def serve(sock: socket.socket) -> None:
    """The server loop: fork a child per request, report each child's exit status."""
    import importlib

    for name in WARM:
        importlib.import_module(name)
    lock = threading.Lock()

    def send(message: dict) -> None:
        with lock:
            sock.sendall((json.dumps(message) + "\n").encode())

    children: set[int] = set()
    send({"ready": os.getpid()})
    buf = b""
    sock.settimeout(0.05)
    while True:
        while children:  # reap
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                sock.close()
                _child(request)
            children.add(pid)
            send({"started": pid, "id": request["id"]})
    for pid in children:
        os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- client side
class _Server:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock = ours
        self.cond = threading.Condition()
        self.started: dict[int, int] = {}  # request id -> pid
        #: exit codes by request id: pids are reused over a long session, so a new rank's pid
        #: may be an earlier rank's, whose exit must not be taken for the new one's
        self.exited: dict[int, int] = {}
        self._running: dict[int, int] = {}  # pid -> request id
        self.next_id = 0
        self.ready = False
        threading.Thread(target=self._read, daemon=True).start()
        with self.cond:
            if not self.cond.wait_for(lambda: self.ready, timeout=300):
                raise RuntimeError("the test fork server did not start in 300 s")

    def _read(self) -> None:
        buf = b""
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                with self.cond:
                    if "ready" in msg:
                        self.ready = True
                    elif "started" in msg:
                        self.started[msg["id"]] = msg["started"]
                        self._running[msg["started"]] = msg["id"]
                    else:  # the server reports a child's exit after its start, in order
                        self.exited[self._running.pop(msg["exited"])] = msg["code"]
                    self.cond.notify_all()

    def spawn(self, argv: list[str], env: dict, cwd: str, log: str) -> tuple[int, int]:
        """Start a rank: ``(request id, pid)``."""
        with self.cond:
            rid = self.next_id
            self.next_id += 1
        request = {"id": rid, "argv": argv, "env": env, "cwd": cwd, "log": log}
        self.sock.sendall((json.dumps(request) + "\n").encode())
        with self.cond:
            if not self.cond.wait_for(lambda: rid in self.started, timeout=60):
                raise RuntimeError("the test fork server did not start a rank in 60 s")
            return rid, self.started.pop(rid)


_server: _Server | None = None
_server_lock = threading.Lock()


def server() -> _Server:
    global _server
    with _server_lock:
        if _server is None or _server.proc.poll() is not None:
            _server = _Server()
        return _server


class Rank:
    """A rank started by the fork server, used like ``subprocess.Popen``."""

    def __init__(self, argv, env: dict, cwd, log: Path, keep_log: bool) -> None:
        self.args = list(argv)
        self.log = Path(log)
        self.keep_log = keep_log
        self._server = server()
        self.log.write_bytes(b"")  # exists (empty) before the rank runs: tests read it at once
        self.id, self.pid = self._server.spawn(list(argv), dict(env), str(cwd), str(self.log))
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with self._server.cond:
                self.returncode = self._server.exited.get(self.id)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._server.cond:
            ok = self._server.cond.wait_for(
                lambda: self.id in self._server.exited,
                timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
            )
        if not ok:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.poll()  # type: ignore[return-value]

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        self.wait(timeout)
        text = self.log.read_text(errors="replace")
        if not self.keep_log:
            self.log.unlink(missing_ok=True)
        return text, None

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
