"""tests/gpu_smoke.py, the command users run on a fresh GPU node, kept from rotting: its CPU-sized
variant runs every step here (stage 1, stage 2 under FSDP2 on gloo, a rank dying mid-checkpoint,
--resume auto with equal losses, the final model in transformers), and without CUDA the GPU run
says in one line that no GPU was checked and exits 1.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "tests", "gpu_smoke.py")


def smoke(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    return subprocess.run(
        [sys.executable, SMOKE, *args],
        cwd=ROOT,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_cpu_variant_runs_every_step_and_passes():
    r = smoke("--cpu")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    lines = r.stdout.splitlines()
    verdicts = [ln for ln in lines if ln.startswith(("PASS", "FAIL"))]
    assert [v.split("  ", 1)[0] for v in verdicts] == ["PASS"] * 7, verdicts
    assert "torchrun --nproc_per_node 2 train_critic.py" in verdicts[0]
    assert "rank 1 dies saving step 4: exit 1" in verdicts[2]
    assert verdicts[4].endswith("--resume auto")
    assert "6 steps, max |difference| 0" in verdicts[5]
    steps = [re.findall(r"-?\d+\.\d+", ln) for ln in lines if ln.strip().startswith("step ")]
    assert len(steps) == 6 and all(a == b for a, b in steps)  # printed side by side, equal
    assert "new tokens" in verdicts[6] and "as the kit's" in verdicts[6]
    assert lines[-1].startswith("SUMMARY: PASS (7/7 checks passed")
    work = re.search(r"work dir (\S+)", lines[0])[1]
    assert not os.path.exists(work)  # everything it wrote was in its temp dir, now removed


def test_without_cuda_the_gpu_run_says_no_gpu_was_checked_and_exits_1():
    r = smoke(CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stdout.splitlines() == [
        "gpu_smoke: FAIL: no CUDA device here, no GPU was checked (`--cpu` runs the CPU-sized variant)"
    ]
