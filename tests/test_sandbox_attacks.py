"""The attacks of issue 22, each in every isolation mode this machine has: namespaces through
bubblewrap and through unshare(2) (with the audit hook, and without it: what the kernel alone
holds) and the in-process hook. After each: the victim folder is unchanged, the bystander
process alive, no runner process left, no secret in any status, no connection made, and the
same sandbox server gives the right results for the next programs."""

import os
import secrets
import socket
import stat
import subprocess
import time

import pytest

import wmtp_sandbox
from wmtp_sandbox import check_program, sandbox_mode, start_sandbox, stop_sandbox

TIMEOUT = 3.0
SECRET = "wJalrXUtnFEMI-" + secrets.token_hex(8)  # what an AWS secret key looks like


def _mode(isolation: str, guard: bool = True):
    """A pytest param (isolation, guard), skipped where this machine lacks `isolation`."""
    name = isolation + ("" if guard else "-kernel-only")
    try:
        sandbox_mode(isolation)
        return pytest.param((isolation, guard), id=name)
    except RuntimeError as exc:
        return pytest.param((isolation, guard), id=name, marks=pytest.mark.skip(reason=str(exc)))


GUARDED = [_mode("bwrap"), _mode("unshare"), _mode("hook")]
MODES = GUARDED + [_mode("bwrap", guard=False), _mode("unshare", guard=False)]


@pytest.fixture(scope="module")
def servers():
    """One sandbox server per mode for this module, restarted if one died."""
    started: dict = {}
    yield started
    for server in started.values():
        stop_sandbox(server)


@pytest.fixture
def sandbox(request, servers):
    """(isolation, guard, a running server) for the test's mode."""
    isolation, guard = request.param
    key = (isolation, guard)
    if key not in servers or servers[key].poll() is not None:
        servers[key] = start_sandbox(isolation, guard=guard)
    return isolation, guard, servers[key]


@pytest.fixture
def bystander():
    """A process of the evaluator's user with a secret in its environment; it must survive."""
    proc = subprocess.Popen(
        ["sleep", "1000"], env={"AWS_SECRET_ACCESS_KEY": SECRET}, start_new_session=True
    )
    yield proc.pid
    assert proc.poll() is None, "a program killed a process outside its sandbox"
    proc.kill()
    proc.wait()


@pytest.fixture
def victim(tmp_path):
    """A folder of the evaluator's: a file, a subfolder, a link; `victim.state()` snapshots it."""
    root = tmp_path / "victim"
    (root / "sub").mkdir(parents=True)
    (root / "keep.txt").write_text("keep")
    (root / "sub" / "deep.txt").write_text("deep")
    os.symlink("keep.txt", root / "link")

    def state() -> dict:
        out = {}
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                data = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
                if stat.S_ISREG(st.st_mode):
                    data = open(path).read()
                out[os.path.relpath(path, root)] = (st.st_mode, st.st_mtime_ns, data)
        return out

    before = state()
    yield str(root)
    assert state() == before, "the victim folder changed"


def _runners() -> list[int]:
    """Pids of sandbox runners alive on this machine (their command line is BOOT) that have
    their job: a server keeps the next job's runner waiting, its stdin still the job's pipe."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"import marshal,os" not in f.read():
                    continue
            if os.readlink(f"/proc/{pid}/fd/0").startswith("pipe:"):
                continue  # waiting for a job (bwrap itself keeps the pipe too)
        except FileNotFoundError:  # gone meanwhile
            continue
        except OSError:
            pass  # not ours to inspect: counted
        found.append(int(pid))
    return found


def _attack(sandbox, source: str, must_fail: bool = True) -> str:
    """Run `source` in `sandbox`; check it failed (where it must), that nothing of it is left
    and that the server's next results are right; its status."""
    isolation, guard, server = sandbox
    passed, status = check_program(source, timeout=TIMEOUT, sandbox=server)
    if must_fail:
        assert not passed, status
    assert SECRET not in status
    deadline = time.monotonic() + 10  # an outside kill is asynchronous: wait for it to land
    while _runners() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _runners() == [], "a process of the program outlived check_program"
    assert check_program("assert 1", timeout=TIMEOUT, sandbox=server) == (True, "passed")
    assert check_program("assert 0", timeout=TIMEOUT, sandbox=server)[0] is False
    return status


DIR_FD = {  # writes relative to a descriptor of a folder outside (the hook sees no dir_fd)
    "create": "os.close(os.open('new', os.O_CREAT | os.O_WRONLY, dir_fd=fd))",
    "mkdir": "os.mkdir('made', dir_fd=fd)",
    "rename": "os.rename('keep.txt', 'moved', src_dir_fd=fd, dst_dir_fd=fd)",
    "remove": "os.remove('keep.txt', dir_fd=fd)",
    "chmod": "os.chmod('keep.txt', 0o777, dir_fd=fd)",
    "symlink": "os.symlink('/etc/passwd', 'planted', dir_fd=fd)",
    "link": "os.link('keep.txt', 'hard', src_dir_fd=fd, dst_dir_fd=fd)",
}


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
@pytest.mark.parametrize("call", list(DIR_FD))
@pytest.mark.parametrize("flags", ["os.O_RDONLY", "os.O_PATH", "os.O_RDONLY | os.O_DIRECTORY"])
def test_writes_relative_to_a_folder_descriptor(sandbox, victim, bystander, call, flags):
    _attack(sandbox, f"import os\nfd = os.open({victim!r}, {flags})\n{DIR_FD[call]}")


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
def test_its_own_folder_descriptor_with_the_cwd_elsewhere(sandbox, victim, bystander):
    # the hook resolves a relative path against the cwd: with a descriptor of a shallower
    # folder, '..' would climb out of the temp folder
    source = (
        "import os\n"
        f"rel = os.path.relpath({victim!r}, os.getcwd())\n"
        "fd = os.open('.', os.O_RDONLY)\n"
        "os.makedirs('a/b/c/d/e/f/g/h')\nos.chdir('a/b/c/d/e/f/g/h')\n"
        "os.close(os.open(rel + '/new', os.O_CREAT | os.O_WRONLY, dir_fd=fd))\n"
    )
    _attack(sandbox, source)


# folder d holds a link to a file of its own, folder e a link to the victim's file, made from
# inside (a relative link that points inside from e/sub/ points outside once moved up to e/):
# swapping d and e between the guard's check of d/l and the call would write to the victim
SWAP = (
    "import os\n"
    "y = os.path.relpath(V + '/keep.txt', os.path.dirname(os.getcwd()))\n"
    "os.makedirs('e/sub')\nos.symlink('../../' + y, 'e/sub/l')\nos.rename('e/sub/l', 'e/l')\n"
    "os.mkdir('d')\nopen('real', 'w').close()\nos.symlink('../real', 'd/l')\n"
    "def swap(*args):\n    os.rename('d', 'old')\n    os.rename('e', 'd')\n"
)
FILES = {  # other ways to make or change files outside
    "mkfifo": "import os\nos.mkfifo(V + '/fifo')",
    "mknod": "import os, stat\nos.mknod(V + '/node', stat.S_IFREG | 0o644)",
    "a device node in its own folder": (
        "import os, stat\nos.mknod('null2', stat.S_IFCHR | 0o666, os.makedev(1, 3))\n"
        "open('null2', 'w').write('x')"
    ),
    "sqlite3.connect outside": "import sqlite3\nsqlite3.connect(V + '/x.db').execute('create table t (x)')",
    "sqlite3 ATTACH outside": (
        "import sqlite3\nsqlite3.connect(':memory:').execute(\"attach database '\" + V + \"/y.db' as y\")"
    ),
    "fchmod on a read-only descriptor": (
        "import os\nos.fchmod(os.open(V + '/keep.txt', os.O_RDONLY), 0o777)"
    ),
    "futimes on a read-only descriptor": (
        "import os\nos.utime(os.open(V + '/keep.txt', os.O_RDONLY), (0, 0))"
    ),
    "chmod through its own link": (
        "import os\nos.symlink(V + '/keep.txt', 'l')\nos.chmod('l', 0o777)"
    ),
    "a str subclass that lies": (
        "class P(str):\n    def startswith(self, *a):\n        return True\n"
        "    def __fspath__(self):\n        return self\n"
        "open(P(V + '/keep.txt'), 'w').write('pwned')"
    ),
    "a PathLike that answers twice": (
        "import os\nclass P(os.PathLike):\n    n = 0\n    def __fspath__(self):\n"
        "        P.n += 1\n        return V + '/keep.txt' if P.n == 1 else 'inside.txt'\n"
        "open(P(), 'w').write('pwned')"
    ),
    "a link swapped by another audit hook": SWAP
    + (
        "import sys\nsys.addaudithook(lambda e, a: swap() if e == 'open' and a[0] == 'd/l' else 0)\n"
        "open('d/l', 'w').write('pwned')"
    ),
    "a link swapped by a signal handler": SWAP
    + (
        "import signal\nsignal.signal(signal.SIGALRM, swap)\n"
        "signal.setitimer(signal.ITIMER_REAL, 1e-4)\n"
        "while True:\n    open('d/l', 'w').write('pwned')"
    ),
    "a link swapped by __del__ while the guard runs": SWAP
    + (
        "import gc\nclass Swap:\n    def __del__(self):\n"
        "        if os.path.exists('e'):\n            swap()\n"
        "        else:\n            c = [Swap()]\n            c.append(c)\n"
        "gc.set_threshold(1)\nc = [Swap()]\nc.append(c)\ndel c\n"
        "while True:\n    open('d/l', 'w').write('pwned')"
    ),
    "monkeypatched os.path and builtins": (
        "import os, builtins\nos.path.realpath = lambda p, **k: os.getcwd()\n"
        "os.path.abspath = os.path.realpath\nbuiltins.isinstance = lambda *a: True\n"
        "open(V + '/keep.txt', 'w').write('pwned')"
    ),
}


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
@pytest.mark.parametrize("name", list(FILES))
def test_files_outside_stay_as_they_were(sandbox, victim, bystander, name):
    # a hook that an audit hook refuses is silently not added: that program then just runs
    must_fail = name != "a link swapped by another audit hook"
    _attack(sandbox, f"V = {victim!r}\n" + FILES[name], must_fail)


def _lib_dynload(name: str) -> str:
    """Program text that finds extension module `name`'s file in lib-dynload."""
    return (
        "import os, sys\n"
        "d = [p for p in sys.path if p.endswith('lib-dynload')][0]\n"
        f"path = os.path.join(d, [f for f in os.listdir(d) if f.startswith({name!r} + '.')][0])\n"
    )


PROCESSES = {  # ways to reach another process, or the guard itself
    "ctypes.pythonapi.kill": "import ctypes\nctypes.pythonapi.kill(PID, 9)",
    "libc kill": "import ctypes\nctypes.CDLL(None).kill(PID, 9)",
    "the guard cleared through gc": (
        "import gc, os\n"
        "for o in gc.get_objects():\n"
        "    if callable(o) and getattr(o, '__name__', '').startswith('_'):\n"
        "        o.__defaults__ = tuple(type(d)() if isinstance(d, (set, frozenset, tuple)) else d\n"
        "                               for d in (o.__defaults__ or ()))\n"
        "os.kill(PID, 9)"
    ),
    "the guard found through frames": (
        "import os, sys\n"
        "f, found = sys._getframe(), []\n"
        "while f is not None:\n"
        "    for scope in (f.f_locals, f.f_globals):\n"
        "        for k, v in list(scope.items()):\n"
        "            if callable(v) and k.startswith('_'):\n"
        "                found.append(k)\n"
        "                try:\n"
        "                    v.__defaults__ = None\n"
        "                except Exception:\n"
        "                    pass\n"
        "                try:\n"
        "                    v.__code__ = (lambda *a, **k: None).__code__\n"
        "                except Exception:\n"
        "                    pass\n"
        "                scope[k] = lambda *a, **k: True\n"
        "    f = f.f_back\n"
        "assert found\n"
        "os.kill(PID, 9)"
    ),
    "the guard's frame from a traceback": (
        "import os, sys\n"
        "try:\n    os.kill(PID, 0)\nexcept PermissionError as e:\n"
        "    tb = e.__traceback__\n"
        "    while tb.tb_next:\n        tb = tb.tb_next\n"
        "    for v in tb.tb_frame.f_locals.values():\n"
        "        if isinstance(v, (set, dict, list)):\n            v.clear()\n"
        "os.kill(PID, 9)"
    ),
    "_imp.create_builtin gives a fresh posix": (
        "import _imp, importlib.machinery as m\n"
        "p = _imp.create_builtin(m.ModuleSpec('posix', None, origin='built-in'))\n"
        "p.setsid()\np.kill(PID, 9)"
    ),
    "posix removed from sys.modules and imported again": (
        "import sys\ndel sys.modules['posix']\nimport posix\nposix.kill(PID, 9)"
    ),
    "_posixsubprocess under another name": _lib_dynload("_posixsubprocess")
    + (
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('x._posixsubprocess', path)\n"
        "importlib.util.module_from_spec(spec)\n"
        "import subprocess\nsubprocess.run(['kill', '-9', str(PID)])"
    ),
    "_posixsubprocess copied and renamed": _lib_dynload("_posixsubprocess")
    + (
        "import importlib.util, shutil\nshutil.copy(path, 'harmless.so')\n"
        "spec = importlib.util.spec_from_file_location('y._posixsubprocess', 'harmless.so')\n"
        "importlib.util.module_from_spec(spec)\n"
        "import subprocess\nsubprocess.run(['kill', '-9', str(PID)])"
    ),
    "a subinterpreter without the hook": (
        "import _xxsubinterpreters as i\ni.run_string(i.create(), 'import os; os.kill(PID, 9)')"
    ),
    "a thread racing the guard": (
        "import threading, os\nthreading.Thread(target=os.kill, args=(PID, 9)).start()"
    ),
    "setpriority of the evaluator's user": "import os\nos.setpriority(os.PRIO_PROCESS, PID, 19)",
    "a double-forked setsid child": (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1000)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
    ),
}


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
@pytest.mark.parametrize("name", list(PROCESSES))
def test_other_processes_are_out_of_reach(sandbox, bystander, name):
    isolation, guard, _ = sandbox
    # without the guard, what a program does inside its namespaces is its own business (a
    # fork where the kernel allows it, a kill of a pid that is not there): what must hold is
    # that nothing outside changes and nothing of it outlives check_program
    must_fail = guard  # e.g. a kill of a pid the namespace does not have returns an error code
    before = os.getpriority(os.PRIO_PROCESS, bystander)
    _attack(sandbox, f"PID = {bystander}\n" + PROCESSES[name], must_fail)
    assert os.getpriority(os.PRIO_PROCESS, bystander) == before


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
def test_secrets_are_out_of_reach(sandbox, bystander, tmp_path):
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    source = (
        "import os, glob\n"
        "seen = [repr(dict(os.environ))]\n"
        f"paths = ['/proc/{os.getpid()}/environ', '/proc/{bystander}/environ', '/proc/1/environ',\n"
        f"         {str(home / '.aws' / 'credentials')!r}, os.path.expanduser('~/.aws/credentials'),\n"
        "         '/root/.aws/credentials']\n"
        "try:\n    paths += glob.glob('/proc/*/environ')\nexcept Exception:\n    pass\n"
        "for path in paths:\n"
        "    try:\n        seen.append(open(path, 'rb').read().decode(errors='replace'))\n"
        "    except Exception as exc:\n        seen.append(type(exc).__name__)\n"
        "found = [s for s in seen if 'wJalr' in s]\n"
        "print(found)\n"
        "raise Exception(' '.join(found) or 'nothing')"
    )
    status = _attack(sandbox, source)
    assert status == "failed: Exception: nothing", status


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
def test_no_connection_leaves_the_sandbox(sandbox, bystander, tmp_path):
    tcp = socket.create_server(("127.0.0.1", 0))
    path = socket.socket(socket.AF_UNIX)
    path.bind(str(tmp_path / "evaluator.sock"))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0wmtp-test-" + secrets.token_hex(8))
    listeners = [tcp, path, abstract]
    for s in listeners:
        s.listen()
        s.setblocking(False)
    addresses = [
        ("socket.AF_INET", tcp.getsockname()),
        ("socket.AF_UNIX", str(tmp_path / "evaluator.sock")),
        ("socket.AF_UNIX", abstract.getsockname()),
    ]
    source = "import socket\nok = []\n"
    for family, address in addresses:
        source += (
            "try:\n"
            f"    s = socket.socket({family})\n    s.connect({address!r})\n    s.sendall(b'leak')\n"
            "    ok.append(1)\n"
            "except Exception:\n    pass\n"
        )
    source += "assert not ok, ok\n"
    try:
        assert _attack(sandbox, source, must_fail=False) == "passed"
        _attack(sandbox, "import socket\nsocket.getaddrinfo('example.com', 80)")
        for s in listeners:
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in listeners:
            s.close()


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
def test_no_program_can_write_another_jobs_reply(sandbox, bystander):
    isolation, guard, server = sandbox
    fake = '{"id": "x", "status": "passed"}\\n' * 3
    source = (
        "import glob, os\n"
        f"targets = glob.glob('/proc/{server.pid}/fd/*') + glob.glob('/proc/*/fd/*')\n"
        "for t in targets:\n"
        "    try:\n"
        f"        with open(t, 'w') as f:\n            f.write('{fake}')\n"
        "    except Exception:\n        pass\n"
        f"for fd in range(1024):\n    try:\n        os.write(fd, b'{fake}')\n    except OSError:\n"
        "        pass\n"
        "assert False\n"
    )
    status = _attack(sandbox, source)
    assert status == "failed: AssertionError", status


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
def test_a_program_can_fake_only_its_own_pass(sandbox, bystander):
    # the documented limit: a pass is decided in the program's process, so a program that
    # reads the runner's sentinel can claim one; nothing of it reaches the next results
    source = (
        "import os, sys\nsentinel = sys._getframe(1).f_locals['job']['sentinel']\n"
        "os.write(1, ('\\n' + sentinel + ' passed\\n').encode())\nos._exit(1)\nassert False"
    )
    assert _attack(sandbox, source, must_fail=False) == "passed"  # its own result only


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
def test_deep_and_wide_temp_folders_are_removed(sandbox, bystander):
    deep = "import os\nfor _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n"
    wide = (
        "import os\nos.makedirs('a/b')\nfor i in range(3000):\n    open(f'a/b/{i}', 'w').close()\n"
        "os.symlink('b', 'a/out')\nos.chmod('a/b', 0)\nos.chmod('a', 0o500)\n"
    )
    for source in (deep, wide):
        assert _attack(sandbox, source, must_fail=False) == "passed"


def test_hook_mode_leaves_no_temp_folder(tmp_path, bystander):
    os.mkdir(tmp_path / "tmp")
    server = start_sandbox("hook", tmp=str(tmp_path / "tmp"))
    try:
        deep = "import os\nfor _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n"
        assert _attack(("hook", True, server), deep, must_fail=False) == "passed"
    finally:
        stop_sandbox(server)
    assert os.listdir(tmp_path / "tmp") == []


def test_remove_tree_never_recurses_follows_or_raises(tmp_path, victim):
    top = tmp_path / "top"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for _ in range(1500):  # deeper than shutil.rmtree or os.makedirs recurse
        os.mkdir("d", dir_fd=fd)
        down = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = down
    os.close(fd)
    os.symlink(victim, top / "out")  # removed as a link, never followed
    (top / "d" / "f").write_text("x")
    os.chmod(top / "d", 0)
    assert wmtp_sandbox._remove_tree(str(top)) is None
    assert not top.exists()
    assert "No such file" in wmtp_sandbox._remove_tree(str(tmp_path / "missing"))
    many = tmp_path / "many"
    many.mkdir()
    for i in range(20):
        (many / str(i)).write_text("")
    assert "more than 10 entries" in wmtp_sandbox._remove_tree(str(many), limit=10)


@pytest.mark.parametrize("sandbox", GUARDED, indirect=True)
def test_no_program_outlives_its_server(sandbox, bystander):
    # the evaluator's worst case: its sandbox server is killed while a program sleeps
    import threading

    isolation, guard, _ = sandbox
    server = start_sandbox(isolation)
    results = []
    worker = threading.Thread(
        target=lambda: results.append(
            check_program("import time\ntime.sleep(1000)", timeout=600, sandbox=server)
        )
    )
    worker.start()
    deadline = time.monotonic() + 30
    while not _runners() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _runners(), "the program never started"
    os.killpg(server.pid, 9)
    worker.join(timeout=60)
    assert results == [(False, "failed: the sandbox stopped")]
    deadline = time.monotonic() + 10
    while _runners() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _runners() == [], "a program outlived its sandbox server"
    stop_sandbox(server)
