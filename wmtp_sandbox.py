"""The sandbox that runs model-written programs: `check_program(program, timeout=...)`.

Stdlib only: the evaluator (wmtp_eval.py) imports it, and so can a notebook. Run as a script,
this file is the sandbox server (`python -I -S -B wmtp_sandbox.py CONFIG`).

Isolation (`isolation=`, or `eval.sandbox` in the config):

- "namespaces": every program runs in its own user, PID, mount, network, IPC and UTS
  namespaces, as uid 65534, with `/` a read-only tmpfs holding only what Python needs (/usr,
  the interpreter's prefix, site-packages, a few /etc files) bound read-only, a private /proc
  that shows only its own processes, /dev with null/zero/full/random/urandom, no network, and
  a fresh size-limited tmpfs at /tmp (its cwd, HOME and TMPDIR), which vanishes with it.
  Backends: bubblewrap (`bwrap`, apt-get install bubblewrap) or the kernel's unshare(2) called
  directly ("unshare"). As root the unshare backend goes first: it runs programs as uid 65534
  outside the namespace too, where bwrap would keep root's uid (and root's write access to
  the host's /proc/sys, which it then has to cover).
- "hook": the in-process guard only (wmtp_sandbox_runner.py): an audit hook that refuses
  process, native-code, network and introspection calls, writes outside a host temp folder
  and reads outside the interpreter's own files. Not a security boundary (see the README).
- "auto" (the default): namespaces where this machine allows them, else hook, with a warning
  once per process; `sandbox_mode()` says which and why. "namespaces" fails loudly instead.

Either way, per program: a fresh `python -I -S -B` (the runner) with an empty environment,
limits on address space, CPU seconds, file size, processes (none) and core dumps, the audit
hook, and success only as "ran to its end" (a random sentinel the runner writes afterwards).
The server, one per worker and started with an empty environment, starts each job's runner
while the job before runs (so its start costs no wall time) and watches it from outside: at its end or after `timeout` seconds it kills the whole PID namespace (hook mode:
the process group), reaps every child (it is their subreaper), removes the temp folder
without recursion, and answers on a socket only it and the evaluator hold, tagged with the
job's id, so nothing a program does can reach another job's result.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings

MEMORY_LIMIT = 4 * 2**30  # bytes of address space a checked program may map
FILE_LIMIT = 16 * 2**20  # bytes a checked program may write to one file
DISK_LIMIT = 64 * 2**20  # bytes of its tmpfs (namespaces mode)
OUTPUT_TAIL = 2**16  # bytes of a program's stdout/stderr kept (the rest is read and dropped)
CLEANUP_ENTRIES = 10**6  # hook mode: files and folders removed from one temp folder at most
REPLY_GRACE = 60.0  # seconds the server may take past the timeout (kill, reap, remove)
ISOLATIONS = ("auto", "namespaces", "bwrap", "unshare", "hook")
NOBODY = 65534
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wmtp_sandbox_runner.py")

# The runner's first lines (`python -c`): its job arrives on fd 0 as marshal data, the runner's
# compiled code and the job; nothing else of the server comes along.
BOOT = (
    "import marshal,os\n"
    "d=b''\n"
    "while c:=os.read(0,1<<20):d+=c\n"
    "c,j=marshal.loads(d)\n"
    "del d\n"
    "g={'__name__':'wmtp_sandbox_runner'}\n"
    "exec(marshal.loads(c),g)\n"
    "g['main'](j)\n"
)
PROBE = "import json, math\nassert json.loads('[3]')[0] < math.pi\n"

_CHOSEN: dict[str, tuple[str, bool, str]] = {}  # isolation -> (backend, drop, why), per process
_WARNED: list[str] = []
_USAGE: dict[str, str] = {}  # bwrap path -> its --help


# ---------------------------------------------------------------------------------------------
# The evaluator's side


def _clean_env(home: str | None = None) -> dict[str, str]:
    """A sandbox process's whole environment: none of the parent's variables (no AWS_*)."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    return env | ({"HOME": home, "TMPDIR": home} if home else {})


def _layout() -> dict:
    """What a program sees of the machine: read-only folders and files (what namespaces mode
    binds, and what hook mode lets it read), merged-/usr symlinks, the interpreter, site dirs."""
    ro, links = ["/usr"], []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            links.append((os.readlink(top), top))
        elif os.path.isdir(top):
            ro.append(top)
    python = os.path.realpath(sys.executable)
    site = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    wanted = [sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(python))]
    for path in sorted({os.path.realpath(p) for p in wanted + site if os.path.isdir(p)}, key=len):
        if not any(path == r or path.startswith(r.rstrip("/") + "/") for r in ro):
            ro.append(path)
    files = [f for f in ("/etc/ld.so.cache", "/etc/localtime") if os.path.exists(f)]
    return {
        "ro": ro,
        "links": links,
        "files": files,
        "python": python,
        "path": [p for p in site if os.path.isdir(p)],
    }


def _bwrap_command(layout: dict) -> list[str]:
    """bubblewrap's arguments up to the command (the server adds --info-fd and the runner)."""
    exe = shutil.which("bwrap") or "bwrap"
    if exe not in _USAGE:  # which options this bwrap has (--disable-userns: 0.8, --size: 0.7)
        run = subprocess.run([exe, "--help"], capture_output=True, text=True, env=_clean_env())
        _USAGE[exe] = run.stdout
    usage, root = _USAGE[exe], os.getuid() == 0
    args = [exe, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session"]
    args += ["--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox"]
    if "--disable-userns" in usage:
        args.append("--disable-userns")  # no nested namespaces: less kernel to attack
    if root:
        args += ["--cap-drop", "ALL"]
    if "--size" in usage:
        args += ["--size", str(DISK_LIMIT)]
    args += ["--tmpfs", "/tmp"]  # first: a bound folder under /tmp (a CI venv) stays visible
    for path in layout["ro"] + layout["files"]:
        args += ["--ro-bind", path, path]
    for target, link in layout["links"]:
        args += ["--symlink", target, link]
    args += ["--proc", "/proc", "--dev", "/dev"]
    if root:  # bwrap keeps the caller's uid outside: root could write the host's sysctls
        args += ["--tmpfs", "/proc/sys", "--remount-ro", "/proc/sys"]
    return args + ["--remount-ro", "/", "--chdir", "/tmp"]


def _start(backend: str, drop: bool, guard: bool, tmp: str | None) -> subprocess.Popen:
    """A sandbox server for one backend, its socket in `.channel`."""
    cfg = {"backend": backend, "drop": drop, "guard": guard, "runner": RUNNER} | _layout()
    scratch = None
    if backend == "hook":  # the programs' folders go in one of the server's own, which the
        # evaluator removes when it stops the server, even one that was killed
        scratch = tempfile.mkdtemp(prefix="wmtp-sandbox-", dir=tmp or tempfile.gettempdir())
        os.chmod(scratch, 0o711)  # uid 65534 (root's programs) reaches its folder, lists none
    cfg["tmp"] = os.path.realpath(scratch or "/tmp")
    if backend == "bwrap":
        cfg["bwrap"] = _bwrap_command(cfg)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server = subprocess.Popen(
            [cfg["python"], "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(cfg)],
            cwd="/",
            env=_clean_env(),
            stdin=theirs,
            stdout=theirs,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except BaseException:
        ours.close()
        if scratch:
            _remove_tree(scratch)
        raise
    finally:
        theirs.close()
    server.channel, server.isolation, server.scratch = ours, backend, scratch
    return server


def _probe(backend: str, drop: bool = False) -> str | None:
    """None if `backend` runs a program that imports from the stdlib here, else why not."""
    if backend == "bwrap" and shutil.which("bwrap") is None:
        return "bwrap is not installed (apt-get install bubblewrap)"
    try:
        server = _start(backend, drop, True, None)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        passed, status = check_program(PROBE, timeout=30, sandbox=server)
    finally:
        stop_sandbox(server)
    return None if passed else status


def _choose(isolation: str) -> tuple[str, bool, str]:
    """(backend, drop to uid 65534 in hook mode, why) for `isolation`, probed once a process."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"sandbox isolation {isolation!r}: one of {', '.join(ISOLATIONS)}")
    if isolation in _CHOSEN:
        return _CHOSEN[isolation]
    root = os.getuid() == 0
    if isolation == "hook":
        order = []
    elif isolation in ("bwrap", "unshare"):
        order = [isolation]
    else:
        order = ["unshare", "bwrap"] if root else ["bwrap", "unshare"]
    errors = []
    for backend in order:
        why = _probe(backend)
        if why is None:
            _CHOSEN[isolation] = (backend, False, f"namespaces via {backend}")
            return _CHOSEN[isolation]
        errors.append(f"{backend}: {why}")
    if isolation != "auto" and isolation != "hook":
        raise RuntimeError(f"sandbox: no namespaces on this machine ({'; '.join(errors)})")
    drop = root and _probe("hook", drop=True) is None
    why = "asked for" if isolation == "hook" else "no namespaces here: " + "; ".join(errors)
    why = "the in-process guard only, " + why
    _CHOSEN[isolation] = ("hook", drop, why)
    return _CHOSEN[isolation]


def sandbox_mode(isolation: str = "auto") -> tuple[str, str]:
    """("namespaces" or "hook", one line saying how) that `isolation` gets on this machine; what
    an evaluation records as its `sandbox` param. Raises RuntimeError where "namespaces",
    "bwrap" or "unshare" cannot be had."""
    backend, drop, why = _choose(isolation)
    if backend != "hook":
        return "namespaces", why
    return "hook", why + ("; programs run as uid 65534" if drop else "")


def start_sandbox(
    isolation: str = "auto", *, guard: bool = True, tmp: str | None = None
) -> subprocess.Popen:
    """A sandbox server (see above); `check_program(..., sandbox=it)` reuses it.

    `guard=False` leaves the audit hook out (namespaces only: to test what the kernel alone
    holds). `tmp` is where hook mode makes temp folders (default: tempfile.gettempdir()).
    """
    backend, drop, why = _choose(isolation)
    if backend == "hook" and isolation == "auto" and not _WARNED:
        _WARNED.append(why)
        warnings.warn(
            f"sandbox: {why} (install bubblewrap, or allow user namespaces, for more)",
            RuntimeWarning,
            stacklevel=2,
        )
    if backend == "hook" and not guard:
        raise ValueError("sandbox: guard=False needs namespaces")
    return _start(backend, drop, guard, tmp)


def stop_sandbox(sandbox: subprocess.Popen) -> None:
    """End a sandbox server (it exits when its socket closes)."""
    sandbox.channel.close()
    try:
        sandbox.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(sandbox.pid, signal.SIGKILL)
        sandbox.wait()
    if sandbox.scratch and os.path.lexists(sandbox.scratch):
        for _ in range(50):  # a killed server's runners die just after it (PR_SET_PDEATHSIG)
            if _remove_tree(sandbox.scratch) is None:
                break
            time.sleep(0.1)


def _ask(sandbox: subprocess.Popen, job: dict, wait: float) -> str | None:
    """Send one job and return its status; None if the server sends no reply in `wait` s.

    Replies are tagged with the job's id. Anything else on the channel (stale or forged) is
    this job's failure and is consumed here, so it can never become the next job's result.
    """
    sock, stray = sandbox.channel, False
    while select.select([sock], [], [], 0)[0]:  # left over from an earlier job: not ours
        if not sock.recv(1 << 20):
            return None
        stray = True
    sock.sendall(json.dumps(job).encode() + b"\n")
    data, deadline = b"", time.monotonic() + wait
    while True:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                return None
            chunk = sock.recv(1 << 20)
            if not chunk:
                return None
            data += chunk
        line, _, data = data.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            reply = {}
        if isinstance(reply, dict) and reply.get("id") == job["id"]:
            if stray or data:
                return "failed: a reply that was not this job's came on the sandbox channel"
            return str(reply.get("status"))
        stray = True


def check_program(
    program: str,
    *,
    timeout: float = 10.0,
    memory: int = MEMORY_LIMIT,
    sandbox: subprocess.Popen | None = None,
    isolation: str = "auto",
) -> tuple[bool, str]:
    """Run `program` in the sandbox; (True, "passed") only if it ran to its end.

    Otherwise (False, why): "failed: AssertionError", "failed: SystemExit: 0", "timed out",
    "failed: exited with code 0 before the end", ... `memory` bytes of address space, CPU
    seconds ⌈timeout⌉ + 1, `timeout` seconds of wall clock. `sandbox` (from `start_sandbox`)
    saves starting a server per call; `isolation` is used only when it is None. Never raises
    for anything the program does; see the module docstring for what each mode guarantees.
    """
    server = sandbox or start_sandbox(isolation)
    try:
        job = {
            "id": secrets.token_hex(16),
            "program": program,
            "timeout": timeout,
            "memory": memory,
            "cpu": math.ceil(timeout) + 1,
            "fsize": FILE_LIMIT,
            "tail": OUTPUT_TAIL,
        }
        try:
            status = _ask(server, job, timeout + REPLY_GRACE)
        except OSError:  # the server is gone
            status = None
        if status is None:
            os.killpg(server.pid, signal.SIGKILL)
            stop_sandbox(server)  # reaps it and removes its folder
            return False, "failed: the sandbox stopped"
        return status == "passed", status
    finally:
        if sandbox is None:
            stop_sandbox(server)


# ---------------------------------------------------------------------------------------------
# The server's side (run as a script)

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MNT_DETACH = 16384, 1 << 18, 1 << 21, 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
GRACE = 2.0  # seconds to wait for the output's end once the program's process has exited


@functools.cache
def _libc():
    """libc through ctypes, for the server only (runners never load ctypes)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ulong, text = ctypes.c_ulong, ctypes.c_char_p
    libc.mount.argtypes = [text, text, text, ulong, text]
    libc.umount2.argtypes = [text, ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ulong, ulong, ulong, ulong]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.sethostname.argtypes = [text, ctypes.c_size_t]
    libc.syscall.argtypes = [ctypes.c_long, text, text]
    return libc


def _call(libc, name: str, *args) -> None:
    """libc.name(*args) (str arguments as bytes), OSError if it fails."""
    rc = getattr(libc, name)(*(a.encode() if isinstance(a, str) else a for a in args))
    if rc != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(
            err, f"{name}{tuple(a for a in args if isinstance(a, str))}: {os.strerror(err)}"
        )


def _bind_ro(libc, source: str, target: str) -> None:
    """Bind `source` on `target` recursively, then make it and every mount below read-only."""
    _call(libc, "mount", source, target, None, MS_BIND | MS_REC, None)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in points:
        if point == target or point.startswith(target.rstrip("/") + "/"):
            flags = os.statvfs(point).f_flag
            # locked flags must be kept on a remount inside a user namespace
            keep = flags & (MS_NOEXEC | 1024 | 2048) | (MS_RELATIME if flags & 4096 else 0)
            extra = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep
            _call(libc, "mount", None, point, None, extra, None)


def _mount_sandbox(libc, cfg: dict, sources: dict[str, int]) -> None:
    """In a fresh mount namespace: build the program's root (see the module docstring) on a
    tmpfs, pivot into it and let go of the host's tree."""
    _call(libc, "mount", None, "/", None, MS_REC | MS_PRIVATE, None)
    root = "/tmp"  # mounted over in this namespace only
    _call(libc, "mount", "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    os.mkdir(root + "/tmp")  # first: a bound folder under /tmp (a CI venv) stays visible
    _call(libc, "mount", "tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
          f"mode=0700,size={DISK_LIMIT}")  # fmt: skip
    for path in cfg["ro"] + cfg["files"]:
        target, is_dir = root + path, stat.S_ISDIR(os.fstat(sources[path]).st_mode)
        os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
        if not is_dir:
            open(target, "w").close()
        _bind_ro(libc, f"/proc/self/fd/{sources[path]}", target)
    for target, link in cfg["links"]:
        os.symlink(target, root + link)
    os.mkdir(root + "/dev")
    _call(libc, "mount", "tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k")
    for name in ("null", "zero", "full", "random", "urandom"):
        open(f"{root}/dev/{name}", "w").close()
        _call(libc, "mount", f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND, None)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{root}/dev/{name}")
    os.mkdir(root + "/proc")
    _call(libc, "mount", "proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    for name in ("sys", "sysrq-trigger", "irq", "bus"):
        if os.path.exists(f"{root}/proc/{name}"):
            _bind_ro(libc, f"{root}/proc/{name}", f"{root}/proc/{name}")
    os.chdir(root)
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    _call(libc, "syscall", number, b".", b".")
    _call(libc, "umount2", ".", MNT_DETACH)  # the host's tree, stacked on ours by pivot_root
    os.chdir("/")
    ro = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
    _call(libc, "mount", None, "/", None, ro | MS_NODEV, None)
    _call(libc, "mount", None, "/dev", None, ro | MS_NOEXEC, None)
    os.chdir("/tmp")


def _enter_namespaces(cfg: dict, info_w: int, ready_w: int, go_r: int) -> None:
    """The unshare backend's launcher (a fork of the server; fds 0-2 already the job and the
    output). It enters new namespaces, has the server write its id maps (uid 65534 inside;
    outside too when the server is root), and forks pid 1 there, which builds the root, drops
    to uid 65534 and execs the runner; the launcher reports pid 1's pid on `info_w` and waits
    for it. Never returns."""
    libc = _libc()
    root = os.getuid() == 0
    if root:
        os.setgroups([])  # root's groups would still open root-group files
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
    _call(libc, "unshare", flags | CLONE_NEWUTS | CLONE_NEWCGROUP)
    os.write(ready_w, b"u")
    os.close(ready_w)
    if os.read(go_r, 1) != b"g":
        raise OSError("the server wrote no id maps")
    os.close(go_r)
    alive_r, alive_w = os.pipe()  # pid 1 sees EOF here once the launcher is gone
    pid = os.fork()
    if pid:
        os.close(alive_r)
        os.write(info_w, json.dumps({"child-pid": pid}).encode())
        for fd in (0, 1, 2, info_w):  # so the output ends when the namespace does
            os.close(fd)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os._exit(code if code >= 0 else 128 - code)
    os.close(info_w)
    os.close(alive_w)
    _call(libc, "sethostname", "sandbox", 7)
    # opened with the server's uid (root can reach /root/.pyenv), in this mount namespace
    sources = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in cfg["ro"] + cfg["files"]}
    if root:  # uid 65534 from here on; the capabilities in the new namespace stay until exec
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        _call(libc, "prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)
    # the launcher's death ends pid 1 and so the namespace; set after the uid change, which
    # clears it, and checked once, in case the launcher died before
    _call(libc, "prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(127)
    _mount_sandbox(libc, cfg, sources)
    os.setsid()
    _call(libc, "prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    argv = [cfg["python"], "-I", "-S", "-B", "-c", BOOT]
    os.execve(cfg["python"], argv, _clean_env("/tmp"))  # no capabilities survive: uid 65534


def _map_ids(pid: int) -> None:
    """Write launcher `pid`'s id maps: uid and gid 65534 inside, for the server's own outside,
    or for 65534 outside when the server is root."""
    uid, gid = (NOBODY, NOBODY) if os.getuid() == 0 else (os.getuid(), os.getgid())
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{NOBODY} {uid} 1"),
        ("gid_map", f"{NOBODY} {gid} 1"),
    ):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


def _close_except(keep: set[int]) -> None:
    """Close every descriptor from 3 up but those in `keep`."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _spawn(cfg: dict, home: str, job_fd: int, out_w: int, info_w: int) -> int:
    """Start the job's runner for the server's backend; its top process's pid. The top process
    gets SIGKILL if the server dies (PR_SET_PDEATHSIG, kept across exec), so no job outlives
    its server, whatever happens to the server."""
    runner = [cfg["python"], "-I", "-S", "-B", "-c", BOOT]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    server, libc = os.getpid(), _libc()
    pid = os.fork()
    if pid == 0:
        try:
            if cfg["backend"] == "hook" and cfg["drop"]:  # root: the program runs as 65534
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
            # after any uid change (which clears it); kept across exec
            _call(libc, "prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != server:  # the server died before that
                os._exit(127)
            os.dup2(job_fd, 0)
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            _close_except({info_w, ready_w, go_r})  # the server's pipes and socket
            os.setsid()
            if cfg["backend"] == "hook":
                os.execve(runner[0], runner, _clean_env(home))
            if cfg["backend"] == "bwrap":
                os.set_inheritable(info_w, True)
                argv = cfg["bwrap"] + ["--info-fd", str(info_w), "--"] + runner
                os.execve(argv[0], argv, _clean_env("/tmp"))
            _enter_namespaces(cfg, info_w, ready_w, go_r)
        except BaseException as exc:
            os.write(2, f"\nsandbox setup: {type(exc).__name__}: {exc}\n".encode())
        os._exit(127)
    os.close(ready_w)
    os.close(go_r)
    try:  # the unshare launcher asks for its id maps; the others close ready_w at exec
        if select.select([ready_r], [], [], 30)[0] and os.read(ready_r, 1) == b"u":
            _map_ids(pid)
            os.write(go_w, b"g")
    finally:
        os.close(ready_r)
        os.close(go_w)
    return pid


def _watch(out_r: int, info_r: int, pid: int, deadline: float, keep: int) -> tuple:
    """Read the job's output (its last `keep` bytes) until it ends and its top process has
    exited, or the deadline passes: (tail, wait status, None if timed out). What is left of the
    job is killed before the top process is reaped, so no pid used here can have been reused;
    the namespace's pid 1 (reported on `info_r`) is held by a pidfd for the same reason."""
    tail, status, ns, info = bytearray(), None, None, b""
    pidfd = os.pidfd_open(pid)
    watched = {out_r, info_r, pidfd}
    try:
        while out_r in watched or status is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd in select.select(list(watched), [], [], left)[0]:
                if fd == pidfd:  # exited, not reaped yet
                    _kill(pid, ns)
                    status = os.waitpid(pid, 0)[1]
                    watched.discard(pidfd)
                    deadline = min(deadline, time.monotonic() + GRACE)
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    watched.discard(fd)
                elif fd == info_r:
                    info += chunk
                    found = re.search(rb'"child-pid":\s*(\d+)', info)
                    if found and ns is None:
                        try:
                            ns = os.pidfd_open(int(found.group(1)))
                        except ProcessLookupError:  # already gone, with its namespace
                            pass
                else:
                    tail += chunk
                    del tail[:-keep]
        if status is None:  # timed out
            _kill(pid, ns)
            os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
        if ns is not None:
            os.close(ns)
    return bytes(tail), status


def _kill(pid: int, ns: int | None) -> None:
    """SIGKILL what is left of a job: the namespace's pid 1 (the kernel then kills all of it),
    and the top process with its process group (hook mode's runner leads its own)."""
    if ns is not None:
        try:
            signal.pidfd_send_signal(ns, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _reap_all(keep: int | None = None) -> None:
    """Kill and reap every child of the server's but `keep` (the next job's runner, waiting):
    the job's top process and its orphans (they come here: the server is a subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            continue
        me = os.getpid()
        try:
            with open(f"/proc/{me}/task/{me}/children") as f:
                children = [int(p) for p in f.read().split() if int(p) != keep]
        except OSError:
            children = []
        for child in children:  # still zombies or alive, so the pids are still theirs
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for child in children:
            try:
                os.waitpid(child, 0)
            except ChildProcessError:
                pass
        return


def _remove_tree(top: str, limit: int = CLEANUP_ENTRIES) -> str | None:
    """Remove folder `top` and all in it, without recursion (any depth) and without following
    links, holding one descriptor at a time and listing each folder once; None, or why it
    could not (it never raises: that is the job's failure, not the evaluator's)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd, names, seen = -1, [], [0]

    def folders_in(fd: int) -> list[str]:
        """Unlink the files in folder `fd`; the names of the folders in it."""
        found = []
        with os.scandir(fd) as entries:
            for entry in entries:
                seen[0] += 1
                if seen[0] > limit:
                    raise OSError(f"more than {limit} entries")
                if entry.is_dir(follow_symlinks=False):
                    found.append(entry.name)
                else:
                    os.unlink(entry.name, dir_fd=fd)
        return found

    try:
        os.chmod(top, 0o700)  # a program may have taken its own permissions away
        fd = os.open(top, flags)
        todo = [folders_in(fd)]  # per level: the folders still to empty
        while todo:
            if todo[-1]:
                name = todo[-1].pop()
                os.chmod(name, 0o700, dir_fd=fd)
                down = os.open(name, flags, dir_fd=fd)
                os.close(fd)
                fd = down
                names.append(name)
                todo.append(folders_in(fd))
            else:
                todo.pop()
                if names:
                    up = os.open("..", flags, dir_fd=fd)
                    os.close(fd)
                    fd = up
                    os.rmdir(names.pop(), dir_fd=fd)
        os.close(fd)
        fd = -1
        os.rmdir(top)
        return None
    except Exception as exc:  # noqa: BLE001 - the job's failure, never the evaluator's
        return f"{type(exc).__name__}: {exc}"
    finally:
        if fd >= 0:
            os.close(fd)


def _outcome(tail: bytes, sentinel: str, status: int | None, backend: str) -> str:
    """The job's status from its output's tail and its top process's wait status."""
    if status is None:
        return "timed out"
    at = tail.rfind(sentinel.encode() + b" ")
    if at >= 0:
        return tail[at + len(sentinel) + 1 :].split(b"\n")[0].decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    # bwrap and the unshare launcher exit with 128 + the signal that killed the runner
    sig = -code if code < 0 else code - 128 if backend != "hook" and code > 128 else 0
    if sig == signal.SIGXCPU:
        return "timed out (CPU limit)"
    if sig:
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return f"failed: killed by {name}"
    setup = re.findall(rb"^(?:bwrap|sandbox setup): .*$", tail, re.M)
    why = f" ({setup[-1].decode(errors='replace')[:300]})" if setup else ""
    return f"failed: exited with code {code} before the end{why}"


def _prepare(cfg: dict) -> dict:
    """Start a runner (its namespaces and interpreter) that waits for its job on a pipe: the
    server starts the next job's while the current one runs, so that start costs no wall time."""
    hook = cfg["backend"] == "hook"
    home = tempfile.mkdtemp(prefix="wmtp-check-", dir=cfg["tmp"]) if hook else "/tmp"
    job_r, job_w = os.pipe()
    out_r, out_w = os.pipe()
    info_r, info_w = os.pipe()
    try:
        if hook and cfg["drop"]:
            os.chown(home, NOBODY, NOBODY)
        pid = _spawn(cfg, home, job_r, out_w, info_w)
    except BaseException:
        for fd in (job_w, out_r, info_r):
            os.close(fd)
        if hook:
            _remove_tree(home)
        raise
    finally:
        for fd in (job_r, out_w, info_w):  # the output ends when the job's processes do
            os.close(fd)
    return {"pid": pid, "home": home, "job": job_w, "out": out_r, "info": info_r}


def _deliver(cfg: dict, code: bytes, job: dict, runner: dict) -> str:
    """Send `runner` its job (the runner's code, the program, limits); the sentinel."""
    import marshal

    sentinel = secrets.token_hex(16)
    hook = cfg["backend"] == "hook"
    task = {k: job[k] for k in ("program", "memory", "cpu", "fsize")} | {
        "sentinel": sentinel,
        "home": runner["home"],
        "guard": cfg["guard"],
        "reads": cfg["ro"] + cfg["files"] if hook else None,
        "path": cfg["path"],
    }
    data = memoryview(marshal.dumps((code, task)))
    try:
        while data:
            data = data[os.write(runner["job"], data) :]
    except BrokenPipeError:  # the runner is gone: its output says why
        pass
    finally:
        os.close(runner["job"])
    return sentinel


def _finish(cfg: dict, job: dict, runner: dict, sentinel: str, deadline: float, keep) -> str:
    """Watch a delivered job to its end, kill and reap what is left, remove its folder; its
    status."""
    try:
        tail, status = _watch(runner["out"], runner["info"], runner["pid"], deadline, job["tail"])
        outcome = _outcome(tail, sentinel, status, cfg["backend"])
    finally:
        os.close(runner["out"])
        os.close(runner["info"])
        _reap_all(keep)
        left = _remove_tree(runner["home"]) if cfg["backend"] == "hook" else None
    if left is not None:
        return f"failed: the temp folder could not be removed ({left[:200]})"
    return outcome


def _discard(cfg: dict, runner: dict | None) -> None:
    """Kill and reap a runner that got no job, and remove its folder."""
    if runner is not None:
        for fd in (runner["job"], runner["out"], runner["info"]):
            os.close(fd)
        _kill(runner["pid"], None)
        _reap_all()
        if cfg["backend"] == "hook":
            _remove_tree(runner["home"])


def serve(cfg: dict) -> None:
    """The sandbox server: one JSON job per line on fd 0 (a socket), one reply line for each,
    {"id": the job's id, "status": ...}, written only after all of the job is gone."""
    import marshal

    with open(cfg["runner"]) as f:
        code = marshal.dumps(compile(f.read(), cfg["runner"], "exec"))
    try:
        _call(_libc(), "prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # a job's orphans come here
    except OSError:
        pass
    sock, data, ready = socket.socket(fileno=0), b"", None
    try:
        while True:
            while b"\n" not in data:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return
                data += chunk
            line, _, data = data.partition(b"\n")
            job = json.loads(line)
            try:
                runner, ready = ready or _prepare(cfg), None
                deadline = time.monotonic() + job["timeout"]
                sentinel = _deliver(cfg, code, job, runner)
                try:
                    ready = _prepare(cfg)
                except Exception:  # noqa: BLE001 - then the next job starts its own
                    ready = None
                keep = ready["pid"] if ready else None
                status = _finish(cfg, job, runner, sentinel, deadline, keep)
            except Exception as exc:  # noqa: BLE001 - that job fails, the server carries on
                status = f"failed: sandbox error ({type(exc).__name__}: {exc})"
            sock.sendall(json.dumps({"id": job.get("id"), "status": status}).encode() + b"\n")
    finally:
        _discard(cfg, ready)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
