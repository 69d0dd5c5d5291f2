"""Real processes without the start-up: `warm.run` and `warm.Popen` start `python SCRIPT ARGS` (or `-m MODULE`,
`-c CODE`) as a fork of a warm interpreter that has already imported torch, transformers, accelerate and kd.

Why: a fresh interpreter spends ~6 s of CPU importing torch and transformers before kd runs a line, and the suite
starts about a hundred processes (the signal and kill tests, the multi-process runs, the exit-status checks): most of
its time on 2 cores. The process under test is still a real process of its own: its own pid, signals delivered to it,
its exit status (negative for a signal, as subprocess reports it), its stdout and stderr, a SIGKILL that leaves what a
killed run leaves. What differs from `python SCRIPT`: the imported modules come from the warm interpreter (imported,
never run: no state but import-time state), and a traceback shows this module's frames above the script's.

The warm interpreter (this file run as a program) imports, then waits on a Unix socket; each request (argv, env,
cwd, output files, resource limits) forks a child that becomes the requested command: the environment replaced, the
signal dispositions of a foreground command (SIGINT raises KeyboardInterrupt, SIGTERM kills), stdin /dev/null, fds 1
and 2 on the requested files, sys.argv and sys.path[0] as Python sets them, the script run as `__main__` at this
file's top level, so that its exceptions, SystemExit and KeyboardInterrupt end the process as they end a script.
Nothing in it runs torch before forking: an OpenMP thread pool started before a fork hangs the child's first
parallel operation. `OMP_NUM_THREADS` in a request's env is applied with torch.set_num_threads (libgomp read the
warm interpreter's at import).

A request whose environment differs from the warm interpreter's in a variable read at import time (HF_*, TORCH*,
PYTHON*, ...) starts a fresh interpreter instead, as does every request with KD_TEST_COLD=1 in the test's
environment (the whole suite with fresh processes, to check that nothing depends on the warm start).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPE, DEVNULL = subprocess.PIPE, subprocess.DEVNULL
# variables a library reads when it is imported: a request that changes one gets a fresh interpreter
# (torchrun's TORCHELASTIC_* and the process group's variables are read when the group starts)
IMPORT_TIME_ENV = (
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS",
    "TORCH_",
    "TORCHINDUCTOR",
    "TORCHDYNAMO",
    "PYTHON",
    "MKL",
    "KMP",
)
IMPORT_TIME_ENV += ("CUDA", "TOKENIZERS")


# ---- the warm interpreter (this file as a program) -------------------------------------------------------------


def _preload() -> None:
    """What every kd process imports (the scripts' library, the tests' tiny Llama and MoE teachers' model code)."""
    import accelerate  # noqa: F401
    import h5py  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import convert_slow_tokenizer, tokenization_utils_tokenizers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import kd.cache_teacher  # noqa: F401
    import kd.train_student  # noqa: F401


def _serve(path: str) -> dict:
    """Accept requests on the socket at `path` until told to quit; returns (in the forked child only) the request
    the child is to become. The parent sends each request's client the child's pid, then its exit status."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    parent = os.getppid()
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection its exit status goes to
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([listener], [], [], 0.05)
        if readable:
            conn, _ = listener.accept()
            conn.settimeout(30)
            data = b""
            while chunk := conn.recv(1 << 16):  # the client shuts its side of the connection once it has sent
                data += chunk
            request = json.loads(data)
            if request.get("quit"):
                return {}
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in waiting.values():
                    other.close()
                conn.close()
                return request
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            waiting[pid] = conn
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass  # the test went away
                conn.close()
        if os.getppid() != parent:  # the test process died: so does its warm interpreter
            return {}


def _become(request: dict) -> list[str]:
    """Turn this forked child into the requested command's process; returns its argv (after the interpreter)."""
    import resource

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in request["ignore_signals"]:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    for name, value in request["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, target, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_APPEND)):
        opened = os.open(target, mode)
        os.dup2(opened, fd)
        os.close(opened)
    opened = os.open(request["stderr"], os.O_WRONLY | os.O_APPEND)
    os.dup2(opened, 2)
    os.close(opened)
    if "OMP_NUM_THREADS" in request["env"]:
        import torch

        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
    return request["argv"]


if __name__ == "__main__":
    import runpy

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is for the tests and their processes
    sys.path.insert(0, str(ROOT))
    _preload()
    import gc

    gc.freeze()  # the imported modules' objects: never scanned (nor copied on write) by the children's collections
    _request = _serve(sys.argv[1])
    if not _request:
        sys.exit(0)
    _argv = _become(_request)
    del _request
    if _argv[0] == "-m":  # as `python -m MODULE`: a second copy of the module runs as __main__
        sys.argv, sys.path[0] = [_argv[1], *_argv[2:]], os.getcwd()
        sys.modules.pop(_argv[1], None)
        runpy.run_module(_argv[1], run_name="__main__", alter_sys=True)
    elif _argv[0] == "-c":
        sys.argv, sys.path[0] = ["-c", *_argv[2:]], ""
        exec(compile(_argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.argv, sys.path[0] = list(_argv), os.path.dirname(os.path.realpath(_argv[0]))
        runpy.run_path(_argv[0], run_name="__main__")
    sys.exit(0)


# ---- the tests' side -----------------------------------------------------------------------------------------

_server: dict = {}
_folders: list[Path] = []  # each process's output files, removed when the test session ends


def _start() -> dict:
    """The warm interpreter, started on first use (~7 s, once per test session) and ended with the session."""
    if _server.get("proc") is not None and _server["proc"].poll() is None:
        return _server
    folder = Path(tempfile.mkdtemp(prefix="kd-warm-"))
    path = str(folder / "socket")
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - open for the server's life
    proc = subprocess.Popen(
        [sys.executable, __file__, path], stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
    )
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        raise RuntimeError(f"the warm interpreter did not start: {(folder / 'server.log').read_text()[-3000:]}")
    _server.update(proc=proc, path=path, env=dict(os.environ), folder=folder)
    return _server


def _stop() -> None:
    import shutil

    proc = _server.get("proc")
    if proc is not None and proc.poll() is None:
        try:
            _request({"quit": True}).close()
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    for folder in [*_folders, _server.get("folder")]:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ != "__main__":  # the tests' side: the warm interpreter and the processes' files go with the session
    import atexit

    atexit.register(_stop)


def _request(request: dict) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(_server["path"])
    conn.sendall(json.dumps(request).encode())
    conn.shutdown(socket.SHUT_WR)
    return conn


def _cold(env: dict | None) -> bool:
    """Whether a request must start a fresh interpreter (module docstring)."""
    if os.environ.get("KD_TEST_COLD"):
        return True
    if env is None:
        return False
    base = _start()["env"]
    changed = {k for k in set(env) | set(base) if env.get(k) != base.get(k)}
    return any(k.startswith(IMPORT_TIME_ENV) and k != "OMP_NUM_THREADS" for k in changed)


class Popen:
    """The part of subprocess.Popen the tests use, for `[sys.executable, SCRIPT | -m MODULE | -c CODE, ARGS...]`.
    Output goes to files (read by `communicate`), so nothing blocks on a full pipe. `rlimits` ({"RLIMIT_FSIZE": n})
    and `ignore_signals` (["SIGXFSZ"]) replace what a preexec_fn would do."""

    def __init__(
        self,
        args,
        stdout=None,
        stderr=None,
        text: bool = False,
        env: dict | None = None,
        cwd=None,
        rlimits: dict | None = None,
        ignore_signals=(),
    ):
        args = [str(a) for a in args]
        if args[0] != sys.executable:
            raise ValueError(f"warm.Popen runs Python commands, not {args[0]}")
        self.args, self.text, self.returncode = args, text, None
        self._folder = Path(tempfile.mkdtemp(prefix="kd-proc-"))
        _folders.append(self._folder)
        self._outputs = {}
        paths = {}
        for name, how in (("stdout", stdout), ("stderr", stderr)):
            paths[name] = os.devnull if how == DEVNULL else str(self._folder / name)
            Path(paths[name]).touch()
            self._outputs[name] = (how, paths[name])
        env = dict(os.environ if env is None else env)
        cwd = str(cwd or os.getcwd())
        if _cold(env):
            self._proc = self._conn = None
            with open(paths["stdout"], "ab") as out, open(paths["stderr"], "ab") as err:

                def limits():
                    import resource

                    for name in ignore_signals:
                        signal.signal(getattr(signal, name), signal.SIG_IGN)
                    for name, value in (rlimits or {}).items():
                        resource.setrlimit(getattr(resource, name), (value, value))
                    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a foreground command's Ctrl-C

                self._proc = subprocess.Popen(
                    args, stdout=out, stderr=err, stdin=DEVNULL, env=env, cwd=cwd, preexec_fn=limits
                )
            self.pid = self._proc.pid
            return
        _start()
        self._proc = None
        self._conn = _request(
            {
                "argv": args[1:],
                "env": env,
                "cwd": cwd,
                "stdout": paths["stdout"],
                "stderr": paths["stderr"],
                "rlimits": rlimits or {},
                "ignore_signals": list(ignore_signals),
            }
        )
        self._buffer = b""
        self.pid = self._message(None)["pid"]

    def _message(self, timeout: float | None) -> dict | None:
        """The next line from the warm interpreter, or None if none came within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._conn], [], [], left)
            if not ready:
                return None
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError("the warm interpreter went away while a process was running")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.wait(0, _raise=False)
        return self.returncode

    def wait(self, timeout: float | None = None, _raise: bool = True) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self._proc is not None:
            try:
                self.returncode = self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if _raise:
                    raise
            return self.returncode
        message = self._message(timeout)
        if message is None:
            if _raise:
                raise subprocess.TimeoutExpired(self.args, timeout)
            return None
        self.returncode = message["returncode"]
        self._conn.close()
        return self.returncode

    def _read(self, name: str):
        how, path = self._outputs[name]
        if how == DEVNULL:
            return None
        data = Path(path).read_bytes()
        if how != PIPE:  # not captured: shown as the test's own output (captured by pytest)
            sys.stdout.write(data.decode("utf-8", "replace")) if name == "stdout" else sys.stderr.write(
                data.decode("utf-8", "replace")
            )
            return None
        return data.decode("utf-8") if self.text else data

    def communicate(self, timeout: float | None = None):
        self.wait(timeout)
        return self._read("stdout"), self._read("stderr")

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass  # exited, not yet reported

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def run(
    args,
    capture_output: bool = False,
    text: bool = False,
    env: dict | None = None,
    cwd=None,
    check: bool = False,
    timeout: float | None = None,
    stdout=None,
    stderr=None,
    **options,
) -> subprocess.CompletedProcess:
    """subprocess.run for a Python command, started warm (module docstring)."""
    if capture_output:
        stdout = stderr = PIPE
    proc = Popen(args, stdout=stdout, stderr=stderr, text=text, env=env, cwd=cwd, **options)
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result


def launch(args, nproc: int, port: int, env: dict) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node NPROC --master_port PORT SCRIPT ARGS` on one node: the
    `nproc` processes with the environment torchrun gives its workers, each started warm; when one fails the others
    get SIGTERM (SIGKILL 30 s later) and the launch exits 1, as torchrun's. Output: the processes' in rank order."""
    procs = []
    for rank in range(nproc):
        worker = dict(
            env,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            ROLE_RANK=str(rank),
            ROLE_NAME="default",
            GROUP_RANK="0",
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            ROLE_WORLD_SIZE=str(nproc),
            GROUP_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TORCHELASTIC_RUN_ID="kd-tests",
            TORCHELASTIC_RESTART_COUNT="0",
            TORCHELASTIC_MAX_RESTARTS="0",
        )
        procs.append(Popen([sys.executable, *map(str, args)], stdout=PIPE, stderr=PIPE, text=True, env=worker))
    failed_at = None
    while [p.poll() for p in procs].count(None):  # every process polled each round
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
            for p in procs:
                p.terminate()
        if failed_at is not None and time.monotonic() - failed_at > 30:
            for p in procs:
                p.kill()
        time.sleep(0.02)
    outputs = [p.communicate() for p in procs]
    code = 0 if all(p.returncode == 0 for p in procs) else 1
    return subprocess.CompletedProcess(
        ["torchrun", *args], code, "".join(o for o, _ in outputs), "".join(e for _, e in outputs)
    )
