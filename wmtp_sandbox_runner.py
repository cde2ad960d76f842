"""The sandbox's runner: runs one model-written program in a fresh `python -I -S -B`.

wmtp_sandbox's server compiles this file once and sends it, with the job, to every runner it
starts (inside fresh namespaces, or plainly in hook mode); the runner executes it and calls
`main(job)`. Nothing of the server is in the runner's memory: no ctypes, no server state.

`main` lowers the resource limits (the server has already made it uid 65534 where it could),
takes away the process calls no audit event reports, installs the guard (an audit hook, PEP 578),
runs the program and, only if the program returned, writes the job's sentinel and "passed".

The guard holds no mutable state: all it consults are default arguments (a tuple, which cannot
change in place) holding frozensets, strings and builtin functions, and touching the attributes
of its functions is refused, so `gc`, frames or a program's monkeypatching (of `os.path`,
`builtins`, ...) do not change what it decides. It cannot stop code that corrupts the
interpreter's memory (crafted bytecode or marshal data, CPython bugs): namespaces mode can.
"""

import gc
import os
import stat
import sys

# events refused outright: processes, signals, native code, the network and name lookups,
# introspection that reaches other frames or objects, locks and ioctls on shared files,
# interpreters without the hook, files created behind the guard's back (sqlite), raw mmap
# fmt: off
BLOCKED = frozenset(
    {
        "os.kill", "os.killpg", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
        "os.exec", "os.system", "os.lockf", "subprocess.Popen", "pty.spawn",
        "resource.setrlimit", "resource.prlimit",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "socket.gethostbyname_ex", "socket.getnameinfo",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
        "sys.addaudithook", "sys.monitoring.register_callback",
        "code.__new__", "cpython.PyInterpreterState_New", "_thread.start_new_thread",
        "fcntl.fcntl", "fcntl.ioctl", "fcntl.flock", "fcntl.lockf",
        "sqlite3.connect", "sqlite3.connect/handle", "sqlite3.enable_load_extension",
        "sqlite3.load_extension",
    }
)
# fmt: on
# modules that must not load, under any name or file name: raw fork/exec, native calls, files
# made where no audit event shows it (sqlite, dbm, POSIX shared memory and semaphores),
# interpreters without the hook, profilers, CPython's memory-unsafe test helpers
# fmt: off
MODULES = frozenset(
    {
        "_posixsubprocess", "_ctypes", "_sqlite3", "_dbm", "_gdbm", "_posixshmem",
        "_multiprocessing", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
        "_interpchannels", "_interpqueues", "_testcapi", "_testinternalcapi", "_testbuffer",
        "_testmultiphase", "_testsinglephase", "_testimportmultiple", "_testclinic",
        "_lsprof",
    }
)
# fmt: on
# event -> positions of the paths it changes, and of its dir_fd arguments (-1: none)
# fmt: off
CHANGES = (
    ("os.chmod", (0,), (2,)), ("os.chown", (0,), (3,)), ("os.utime", (0,), (3,)),
    ("os.truncate", (0,), ()), ("os.setxattr", (0,), ()), ("os.removexattr", (0,), ()),
    ("os.mkdir", (0,), (2,)), ("os.rmdir", (0,), (1,)), ("os.remove", (0,), (1,)),
    ("os.rename", (0, 1), (2, 3)), ("os.link", (0, 1), (2, 3)), ("os.symlink", (1,), (2,)),
    ("shutil.rmtree", (0,), (1,)),
)
# fmt: on
READS = frozenset({"os.listdir", "os.scandir", "os.chdir", "os.getxattr", "os.listxattr"})
WRITES = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
TMPFILE = os.O_TMPFILE & ~os.O_DIRECTORY  # an unnamed file in a folder: a write there
HANDLES = os.O_DIRECTORY | os.O_PATH  # descriptors other calls act relative to: none allowed
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# os/posix calls no audit event reports that reach other processes, leave the process group,
# or make fifos and device nodes; taken away before the program runs
# fmt: off
UNAUDITED = (
    "setsid", "setpgid", "setpgrp", "tcsetpgrp", "login_tty", "pidfd_open", "mkfifo", "mknod",
    "chroot", "setpriority", "sched_setaffinity", "sched_setparam", "sched_setscheduler",
    "unshare", "setns",
)
# fmt: on


def _refused(*args, **kwargs):
    """Stands in for a call the sandbox takes away."""
    raise PermissionError("sandbox: this call is not allowed")


def _no_handler(*args, **kwargs):
    """Stands in for signal.signal: ValueError, which callers expect off the main thread."""
    raise ValueError("sandbox: signal handlers are not allowed")


def _fd_path(fd, _readlink=os.readlink, _str=str):
    """The absolute path descriptor `fd` is open on, or None (a pipe, a socket, no /proc)."""
    try:
        path = _readlink("/proc/self/fd/" + _str(fd))
    except (OSError, ValueError):
        return None
    return path if path.startswith("/") else None


def _text(obj, _fd=_fd_path, _type=type, _sub=issubclass, _str=str, _bytes=bytes, _int=int,
          _all=slice(None)):  # fmt: skip
    """`obj` as an exact str path, or None when it is not a str, bytes or descriptor.

    A str or bytes subclass is copied to an exact str without calling its methods; a descriptor
    becomes the path it is open on. Anything else is None and the caller refuses it: a
    PathLike's __fspath__ could answer the call and the check differently.
    """
    t = _type(obj)
    if t is _str:
        return obj
    if t is _int:
        return _fd(obj)
    if _sub(t, _str):
        return _str.__getitem__(obj, _all)
    if _sub(t, _bytes):
        return _bytes.decode(_bytes.__getitem__(obj, _all), "utf-8", "surrogateescape")
    return None


def _resolve(path, _readlink=os.readlink, _getcwd=os.getcwd):
    """`path`, relative to the cwd, with every symlink and '..' resolved as the kernel would
    (os.path.realpath, from builtins only); None for a symlink loop or a lost cwd."""
    if path is None:
        return None
    out = []
    if not path.startswith("/"):  # the kernel's cwd has no links or '..' left: not resolved again
        try:
            cwd = _getcwd()
        except OSError:
            return None
        if not cwd.startswith("/"):
            return None
        out = [name for name in cwd.split("/") if name]
    todo, links = path.split("/")[::-1], 0
    while todo:
        name = todo.pop()
        if name == "" or name == ".":
            continue
        if name == "..":
            if out:
                out.pop()
            continue
        out.append(name)
        try:
            target = _readlink("/" + "/".join(out))
        except (OSError, ValueError):  # not a link, or not there (yet)
            continue
        links += 1
        if links > 40:
            return None
        out.pop()
        if target.startswith("/"):
            out = []
        todo.extend(target.split("/")[::-1])
    return "/" + "/".join(out)


def _within(path, roots):
    """Whether the resolved `path` is one of `roots` or below one."""
    if path is None:
        return False
    for root in roots:
        if path == root or path.startswith(root + "/"):
            return True
    return False


def _lands(path, roots, _text=_text, _resolve=_resolve, _within=_within, _int=int, _type=type):
    """Whether `path` (any type) lands inside `roots`: resolved fully, and, for a call on a
    link itself, through its folder with the last name kept."""
    p = _text(path)
    if p is None or not _within(_resolve(p), roots):
        return False
    head, sep, tail = p.rpartition("/")
    if _type(path) is _int or tail in ("", ".", ".."):
        return True
    parent = _resolve((head or "/") if sep else ".")
    return parent is not None and _within(parent.rstrip("/") + "/" + tail, roots)


def _opened(path, flags, home, reads, _text=_text, _resolve=_resolve, _within=_within,
            _lands=_lands, _stat=os.stat, _isdir=stat.S_ISDIR, _writes=WRITES, _tmp=TMPFILE,
            _handles=HANDLES, _devices=DEVICES, _int=int, _type=type, _error=PermissionError):  # fmt: skip
    """Check one "open" event (hook mode): writes inside the temp folder (or a device such as
    /dev/null), no directory descriptors at all, reads only from `reads`."""
    if _type(path) is _int:  # an open descriptor: its access mode was checked when it opened
        return
    p = _text(path)
    where = _resolve(p)
    if where is None:
        raise _error(f"sandbox: open of {p!r} is not allowed")
    if flags & _tmp:
        if not _within(where, home):
            raise _error(f"sandbox: open {p!r} is outside the temp folder")
        return
    try:
        is_dir = _isdir(_stat(where).st_mode)
    except OSError:
        is_dir = False
    if flags & _handles or is_dir:
        raise _error(f"sandbox: open {p!r}: a folder cannot be opened (dir_fd calls)")
    if flags & _writes:
        if where not in _devices and not _lands(path, home):
            raise _error(f"sandbox: open {p!r} is outside the temp folder")
    elif not (_within(where, reads) or where in _devices):
        raise _error(f"sandbox: open {p!r} is outside what programs may read")


def _check(
    event, args, home, reads, protected,
    _blocked=BLOCKED, _modules=MODULES, _builtin=frozenset(sys.builtin_module_names),
    _changes=CHANGES, _reads=READS, _text=_text, _resolve=_resolve, _within=_within,
    _lands=_lands, _opened=_opened, _id=id, _len=len, _error=PermissionError,
):  # fmt: skip
    """Raise PermissionError if the sandbox refuses audit event `event` with `args`."""
    if event in _blocked or event.startswith("ctypes."):
        raise _error(f"sandbox: {event} is not allowed")
    if event == "import":
        name = _text(args[0]) or ""
        file = (_text(args[1]) or "") if args[1] is not None else ""
        stem = file.rpartition("/")[2].partition(".")[0]
        if name.rpartition(".")[2] in _modules or stem in _modules or name in _builtin:
            raise _error(f"sandbox: import {name} is not allowed")
        return
    if event in ("object.__setattr__", "object.__delattr__", "object.__getattr__"):
        if _id(args[0]) in protected:
            raise _error(f"sandbox: {event} on the sandbox's guard is not allowed")
        return
    if event == "socket.__new__":
        if args[1] != 1:  # AF_UNIX only (asyncio's self-pipe); connect and bind stay refused
            raise _error(f"sandbox: {event} of address family {args[1]} is not allowed")
        return
    if not home:  # namespaces mode: the kernel keeps everything but the program's tmpfs read-only
        return
    if event == "open":
        _opened(args[0], args[2], home, reads)
        return
    for name, paths, dir_fds in _changes:
        if event != name:
            continue
        for at in dir_fds:  # there are no folder descriptors (see _opened), so none is valid
            if at < _len(args) and args[at] is not None and args[at] != -1:
                raise _error(f"sandbox: {event} relative to a descriptor is not allowed")
        for at in paths:
            if not _lands(args[at], home):
                raise _error(f"sandbox: {event} {_text(args[at])!r} is outside the temp folder")
        if name == "os.symlink":  # the link's target, from the link's folder
            link, target = _text(args[1]), _text(args[0])
            if link is None or target is None:
                raise _error(f"sandbox: {event} of a non-str path is not allowed")
            if not target.startswith("/") and "/" in link:
                target = link.rpartition("/")[0] + "/" + target
            if not _within(_resolve(target), home):
                raise _error(f"sandbox: {event} {args[0]!r} is outside the temp folder")
        return
    if event in _reads:
        path = args[0] if args and args[0] is not None else "."
        if not _within(_resolve(_text(path)), reads):
            raise _error(f"sandbox: {event} {_text(path)!r} is outside what programs may read")


def _guard(
    event, args, home=(), reads=(), protected=frozenset(),
    _check=_check, _off=gc.disable, _on=gc.enable, _enabled=gc.isenabled,
):  # fmt: skip
    """The audit hook: raise PermissionError for whatever the sandbox refuses (see above).

    No program code may run between a check and the call it clears (it could swap a link in
    the temp folder): there are no threads, signal handlers or other audit hooks, and the
    collector, which could run a program's __del__, is off while the guard runs.
    """
    enabled = _enabled()
    _off()
    try:
        _check(event, args, home, reads, protected)
    finally:
        if enabled:
            _on()


def _take_away() -> None:
    """Remove what the audit hook cannot see: unaudited process calls, a fresh copy of any
    builtin module (`_imp.create_builtin` gives a new `posix`), threads and signal handlers
    (the guard's checks must not race), and shutil's descriptor-relative rmtree (there are
    no folder descriptors)."""
    import _imp
    import _thread

    for name in sys.builtin_module_names:  # every builtin loaded now: none is needed later
        if name not in sys.modules:
            __import__(name)
    del _imp.create_builtin
    for module in ("os", "posix"):
        for name in UNAUDITED:
            if hasattr(sys.modules[module], name):
                setattr(sys.modules[module], name, _refused)
    for module in ("signal", "_signal"):  # no handlers: they could run inside the guard
        if module in sys.modules:
            sys.modules[module].pidfd_send_signal = _refused
            sys.modules[module].signal = _no_handler
    for name in ("start_new_thread", "start_new", "start_joinable_thread"):
        if hasattr(_thread, name):
            setattr(_thread, name, _refused)
    os.supports_dir_fd.discard(os.open)  # shutil then removes trees by path, not by fd


def _arm(home: str, reads: list | None) -> None:
    """Install the guard for a program whose temp folder is `home` (hook mode) or for one in
    namespaces (home None: the kernel confines files, the guard only processes and more)."""
    real = os.path.realpath
    roots = (real(home),) if home else ()
    allowed = ()
    if home:
        allowed = tuple(real(r) for r in reads or ()) + roots + (f"/proc/{os.getpid()}",)
    mine = (_guard, _check, _opened, _lands, _within, _resolve, _text, _fd_path, _refused)
    mine += (_no_handler,)
    _guard.__defaults__ = (roots, allowed, frozenset(map(id, mine))) + _guard.__defaults__[3:]
    sys.addaudithook(_guard)


def main(job: dict) -> None:
    """Run the job's program; write the sentinel and its outcome only if it got to its end."""
    import resource

    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)  # the job came on fd 0; the program reads an empty stdin
    os.closerange(3, 1 << 16)
    report, write, leave = os.dup(1), os.write, os._exit
    os.chdir(job["home"])
    for what, soft, hard in (
        (resource.RLIMIT_AS, job["memory"], job["memory"]),
        (resource.RLIMIT_CPU, job["cpu"], job["cpu"] + 1),
        (resource.RLIMIT_FSIZE, job["fsize"], job["fsize"]),
        (resource.RLIMIT_NPROC, 0, 0),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(what, (soft, hard))
    sys.path.extend(job["path"])
    if job["guard"]:  # without it (namespaces, tests), the kernel alone holds the program
        _take_away()
    try:
        code = compile(job["program"], "<program>", "exec")
        if job["guard"]:
            _arm(job["home"] if job["reads"] is not None else None, job["reads"])
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        outcome = "passed"
    except BaseException as exc:
        try:
            why = str(exc)
        except BaseException:
            why = ""
        outcome = f"failed: {type(exc).__name__}" + (f": {why}" if why else "")
    line = " ".join(outcome.split())[:300]
    write(report, b"\n" + job["sentinel"].encode() + b" " + line.encode(errors="replace") + b"\n")
    leave(0)
