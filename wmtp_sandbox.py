"""The sandbox that runs model-written programs: `check_program(program, timeout=...)`.

Stdlib only: the evaluator (wmtp_eval.py) imports it, and so can a notebook.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time

MEMORY_LIMIT = 4 * 2**30  # bytes of address space a checked program may map
FILE_LIMIT = 16 * 2**20  # bytes a checked program may write to one file
OUTPUT_TAIL = 2**16  # bytes of a program's stdout/stderr kept (the rest is read and dropped)

# ---------------------------------------------------------------------------------------------
# The sandbox
#
# A sandbox server is a `python -I` started with an empty environment in its own session. For
# every program it forks a supervisor, which starts a session of its own in the program's fresh
# temp folder and forks the runner: the runner lowers its resource limits, installs an audit
# hook, runs the program and, only if the program returned, writes a random sentinel. The
# server kills the supervisor's whole process group when it is done or the time is up, reaps
# everything, and answers with one line. The program's parent is the supervisor, never the
# evaluator, and forking from a clean server costs milliseconds where a new interpreter costs
# tens of them.

_SERVER = r"""
import ctypes, json, os, resource, select, signal, sys

ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: a job's orphans come back here


def run(job, out_w):
    # the runner: output to the supervisor's pipe, limits, audit hook, program, sentinel
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.close(out_w)
    report, write, leave, home = os.dup(1), os.write, os._exit, os.getcwd()
    for what, soft, hard in ((resource.RLIMIT_AS, job["memory"], job["memory"]),
                             (resource.RLIMIT_CPU, job["cpu"], job["cpu"] + 1),
                             (resource.RLIMIT_FSIZE, job["fsize"], job["fsize"]),
                             (resource.RLIMIT_NPROC, 0, 0), (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(what, (soft, hard))
    BLOCKED = {"os.kill", "os.killpg", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
               "os.exec", "os.system", "subprocess.Popen", "ctypes.dlopen", "resource.setrlimit",
               "resource.prlimit", "socket.connect", "socket.bind", "socket.sendto",
               "socket.sendmsg"}
    CHANGES = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.symlink", "os.link",
               "os.chmod", "os.chown", "os.truncate", "os.utime", "os.setxattr",
               "os.removexattr", "shutil.rmtree"}
    IMPORTS = {"_posixsubprocess", "_ctypes", "_signal", "posix"}  # raw fork/exec, or restoring
    WRITES = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def outside(path):
        real = os.path.realpath(os.fsdecode(path))
        return not (real in (home, os.devnull) or real.startswith(home + os.sep))

    def guard(event, args):
        if event in BLOCKED or (event == "import" and args[0] in IMPORTS):
            raise PermissionError(f"sandbox: {event} {args[0] if args else ''} is not allowed")
        paths = ()
        if event == "open" and isinstance(args[0], (str, bytes)) and args[2] & WRITES:
            paths = args[:1]
        elif event in CHANGES:
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        for path in paths:
            if outside(path):
                raise PermissionError(f"sandbox: {event} {path!r} is outside the temp folder")

    # unaudited ways to signal other processes or to leave the process group
    for module in ("os", "posix"):
        for name in ("pidfd_open", "setsid", "setpgid", "setpgrp"):
            setattr(sys.modules[module], name, None)
    for module in ("signal", "_signal"):
        setattr(sys.modules[module], "pidfd_send_signal", None)
    try:
        code = compile(job["program"], "<program>", "exec")
        sys.addaudithook(guard)
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        outcome = "passed"
    except BaseException as exc:
        try:
            why = str(exc)
        except BaseException:
            why = ""
        outcome = f"failed: {type(exc).__name__}" + (f": {why}" if why else "")
    sentinel = job["sentinel"].encode()
    write(report, b"\n" + sentinel + b" " + " ".join(outcome.split())[:300].encode() + b"\n")
    leave(0)


def supervise(job, result_w):
    # the supervisor: own session in the temp folder, runs the runner, reads its output's tail
    os.setsid()
    os.chdir(job["home"])
    os.environ.update(HOME=job["home"], TMPDIR=job["home"])
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(result_w)
        run(job, out_w)
    os.close(out_w)
    tail, sentinel = b"", job["sentinel"].encode() + b" "
    while chunk := os.read(out_r, 65536):
        tail = (tail + chunk)[-job["tail"]:]
    _, status = os.waitpid(pid, 0)
    at = tail.rfind(sentinel)
    if at >= 0:
        return tail[at + len(sentinel):].split(b"\n")[0].decode(errors="replace")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return "timed out (CPU limit)"
        return f"failed: killed by {signal.Signals(sig).name}"
    return f"failed: exited with code {os.WEXITSTATUS(status)} before the end"


for line in sys.stdin.buffer:
    job = json.loads(line)
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(result_r)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        try:
            outcome = supervise(job, result_w)
        except BaseException as exc:
            outcome = f"failed: sandbox error ({type(exc).__name__}: {exc})"
        os.write(result_w, outcome.encode()[:4000])
        os._exit(0)
    os.close(result_w)
    pidfd = os.pidfd_open(pid)
    finished = bool(select.select([pidfd], [], [], job["timeout"])[0])
    os.close(pidfd)
    for kill in (os.killpg, os.kill):  # the group; the supervisor alone if it had no session yet
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    outcome = os.read(result_r, 4096).decode(errors="replace") if finished else "timed out"
    os.close(result_r)
    while True:  # the supervisor, and the runner if the kill orphaned it
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    sys.stdout.write(json.dumps({"status": outcome or "failed: the sandbox stopped"}) + "\n")
    sys.stdout.flush()
"""


def _clean_env() -> dict[str, str]:
    """The sandbox's whole environment: none of the parent's variables (no AWS_*, MLFLOW_*)."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}


def start_sandbox() -> subprocess.Popen:
    """A sandbox server (see above); `check_program(..., sandbox=it)` reuses it."""
    return subprocess.Popen(
        [sys.executable, "-I", "-B", "-u", "-c", _SERVER],
        cwd="/",
        env=_clean_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_sandbox(sandbox: subprocess.Popen) -> None:
    """End a sandbox server (it exits when its input closes)."""
    try:
        sandbox.stdin.close()
    except OSError:
        pass
    try:
        sandbox.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(sandbox.pid, signal.SIGKILL)
        sandbox.wait()
    sandbox.stdout.close()


def _reply(fd: int, timeout: float) -> bytes | None:
    """One line from the sandbox server, or None if it sends none within `timeout` seconds."""
    data, deadline = b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        data += chunk
    return data


def check_program(
    program: str,
    *,
    timeout: float = 10.0,
    memory: int = MEMORY_LIMIT,
    sandbox: subprocess.Popen | None = None,
) -> tuple[bool, str]:
    """Run `program` in a sandboxed process; (True, "passed") only if it ran to its end.

    Otherwise (False, why): "failed: AssertionError", "failed: SystemExit: 0", "timed out",
    "failed: exited with code 0 before the end", ... The program runs in a fresh temp folder
    (removed after) with an empty environment, `python -I`, limits on address space (`memory`
    bytes), CPU seconds, file size and new processes, and an audit hook that refuses kill, fork,
    exec, subprocess, ctypes, sockets and writes outside its folder. Its whole process group is
    killed when it ends or after `timeout` seconds. `sandbox` (from `start_sandbox`) saves
    starting a server per call. Not a security boundary against code written to escape: run
    untrusted code inside a container or VM as well.
    """
    server = sandbox or start_sandbox()
    try:
        with tempfile.TemporaryDirectory(prefix="wmtp-check-", ignore_cleanup_errors=True) as home:
            job = {
                "program": program,
                "sentinel": secrets.token_hex(16),
                "home": os.path.realpath(home),
                "timeout": timeout,
                "memory": memory,
                "cpu": math.ceil(timeout) + 1,
                "fsize": FILE_LIMIT,
                "tail": OUTPUT_TAIL,
            }
            try:
                server.stdin.write(json.dumps(job).encode() + b"\n")
                server.stdin.flush()
                reply = _reply(server.stdout.fileno(), timeout + 5)
            except OSError:  # the server is gone
                reply = None
        if reply is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            return False, "failed: the sandbox stopped"
        status = json.loads(reply)["status"]
        return status == "passed", status
    finally:
        if sandbox is None:
            stop_sandbox(server)
