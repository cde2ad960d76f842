"""GPU-node smoke test: the kit end to end on this machine's GPUs, in a temp dir, PASS or FAIL.

    python tests/gpu_smoke.py          # every local GPU: a ~0.5 B random MTP model, FSDP2 (fsdp.yaml)
    python tests/gpu_smoke.py --cpu    # the same steps on CPU: a tiny model, 2 processes over gloo

Steps: stage 1 (train_critic.py) and stage 2 (train_mtp.py --algo critic) through
`accelerate launch --config_file fsdp.yaml` on all local GPUs; the same stage-2 run again with its
last rank dying in the middle of the step-4 checkpoint (WMTP_TEST_CRASH), then `--resume auto`, whose
per-step losses must equal the uninterrupted run's; the final model generating with transformers
(`AutoModelForCausalLM.from_pretrained(final).generate`, greedy, equal to the kit's own decoding of
the MTP model); peak GPU memory and tokens/s. The trainers run with `train.deterministic: true`
(deterministic kernels, cuBLAS workspace, no flash-attention backward), so the resumed losses must
be bit-identical on GPU as on CPU. Everything goes to one temp dir (HF, Triton and bytecode caches
too), removed at the end unless --keep. Without CUDA (and without --cpu) it says in one line that
no GPU was checked and exits 1, so a pre-flight check of the exit code fails on a node whose GPUs
are missing. Exit code 0: PASS, 1: FAIL.

On CPU, accelerate turns FSDP on only on GPUs, so `--cpu` runs stage 2 through tests/fsdp_train.py
(fsdp.yaml's FSDP2 plugin on a gloo Accelerator) under torchrun, and stage 1 under torchrun (DDP).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the kit's modules, for the final model's check in this process
CRASH_STEP = 4
LAUNCH_TIMEOUT = (
    3600  # seconds one trainer may take before the smoke test kills it (a hung NCCL job)
)

# --set values: (GPU, CPU). GPU: 20 Llama blocks of dim 1536 (16 trunk + 4 heads), GQA 12/4 heads,
# FFN 4096 -> 0.50 B parameters over the byte tokenizer's 259 tokens; CPU: the tests' tiny model.
MODEL = {
    "model.vocab_size": (259, 259),
    "model.dim": (1536, 32),
    "model.n_layers": (20, 5),
    "model.n_heads": (4, 4),
    "model.n_attn_heads": (12, 2),
    "model.n_kv_heads": (4, 1),
    "model.max_seq_len": (1024, 128),
    "data.max_length": (512, 96),
    "train.batch_size": (8, 2),
    "train.max_steps": (8, 6),
    "critic.batch_size": (8, 2),
    "critic.max_steps": (4, 4),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """--cpu, --nproc, --keep, --loss-tol."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the CPU-sized variant (tiny model, gloo)")
    p.add_argument(
        "--nproc", type=int, default=None, help="processes (default: every GPU; 2 with --cpu)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (its path is printed)")
    p.add_argument(
        "--loss-tol",
        type=float,
        default=0.0,
        help="largest |resumed - uninterrupted| loss accepted (default 0: bit-identical)",
    )
    return p.parse_args(argv)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(path: str, n: int = 600) -> None:
    """Code-like prompt/completion records with 0/1 labels (stage 1's rewards), a few hundred
    bytes each."""
    with open(path, "w") as f:
        for i in range(n):
            body = "".join(
                f"    x{j} = x{j - 1} * {i % 7 + j} + {j}\n" for j in range(1, 4 + i % 9)
            )
            rec = {
                "prompt": f"# task {i}: fold the numbers up to {i}\ndef f{i}(x0):\n",
                "completion": f"{body}    return x{3 + i % 9 - 1}\n",
                "label": float(i % 3 != 0),
            }
            f.write(json.dumps(rec) + "\n")


def settings(work: str, cpu: bool, run_name: str | None = None) -> list[str]:
    """The trainers' --config and --set arguments: everything under `work`."""
    sets = [f"{k}={v[1 if cpu else 0]}" for k, v in MODEL.items()]
    sets += [
        f"paths.datasets={{smoke: {work}/data.jsonl}}",
        "data.heldout=[]",
        "data.train=[smoke]",
        f"paths.checkpoints={work}/ckpt",
        f"paths.value_head={work}/value_head.safetensors",
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        f"mlflow.artifact_location={work}/mlartifacts",
        "train.save_every=2",
        "train.keep_last=10",
        "train.log_every=1",
        "train.warmup_steps=2",
        "train.lr=3e-4",
        "critic.eval_every=2",
        "train.deterministic=true",  # bit-identical resumed losses on GPU too
    ]
    if run_name:
        sets.append(f"train.run_name={run_name}")
    return ["--config", os.path.join(ROOT, "config.yaml"), *(a for s in sets for a in ("--set", s))]


def child_env(work: str, cpu: bool) -> dict[str, str]:
    """The launched trainers' environment: caches inside `work`, no MLflow URI from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cache = os.path.join(work, "cache")
    env |= {
        "PYTHONPATH": ROOT,
        "PYTHONDONTWRITEBYTECODE": "1",
        "HF_HOME": os.path.join(cache, "hf"),
        "XDG_CACHE_HOME": cache,
        "TRITON_CACHE_DIR": os.path.join(cache, "triton"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # deterministic cuBLAS: resumed losses bit-equal
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cpu:
        env["OMP_NUM_THREADS"] = "1"
    return env


def launch(script: str, args: list[str], work: str, cpu: bool, nproc: int, log: str, **env):
    """Run a trainer as a user would on this node; returns (exit code, seconds, command shown)."""
    if cpu:
        script = "tests/fsdp_train.py" if script == "train_mtp.py" else script
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        cmd += ["--master_port", str(free_port())]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        cmd += [os.path.join(ROOT, "fsdp.yaml"), "--num_processes", str(nproc)]
        cmd += ["--main_process_port", str(free_port())]
    cmd += [os.path.join(ROOT, script), *args]
    launcher = (
        "torchrun --nproc_per_node"
        if cpu
        else "accelerate launch --config_file fsdp.yaml --num_processes"
    )
    shown = f"{launcher} {nproc} {script}" + (" --resume auto" if "--resume" in args else "")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=work, env=child_env(work, cpu) | env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers too can be stopped as one group
        )  # fmt: skip
        try:
            code = proc.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = f"none: killed after {LAUNCH_TIMEOUT} s"
    return code, time.perf_counter() - t0, shown


def watch_gpu_memory(stop: threading.Event, peak: dict[int, int]) -> None:
    """Poll nvidia-smi until `stop`: the most memory each GPU had in use, in MiB."""
    query = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]
    while not stop.wait(0.2):
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return
        for line in out.strip().splitlines():
            index, used = (int(x) for x in line.split(","))
            peak[index] = max(peak.get(index, 0), used)


def run_metrics(work: str) -> dict[str, dict[str, dict[int, float]]]:
    """{run name: {metric: {step: last logged value}}} from the smoke test's MLflow store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("wmtp")
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        metrics = {}
        for name in ("train/loss", "time/tokens_per_s"):
            history = sorted(
                client.get_metric_history(run.info.run_id, name), key=lambda m: m.timestamp
            )
            metrics[name] = {m.step: m.value for m in history}
        out[run.info.run_name] = metrics
    return out


def check_generation(final: str, device: str) -> tuple[bool, str]:
    """The final folder in transformers (AutoTokenizer, AutoModelForCausalLM.generate, greedy)
    against the kit's own greedy decoding of the MTP model loaded from the same folder, both in
    float64 so that no rounding difference between the two paths flips an argmax."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import wmtp
    from wmtp_decode import greedy_decode

    transformers.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("def add(a, b):\n", return_tensors="pt").input_ids.to(device)
    hf = AutoModelForCausalLM.from_pretrained(final).to(device, torch.float64).eval()
    with torch.no_grad():
        out = hf.generate(
            ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    kit = wmtp.load_model(final).to(device, torch.float64).eval()
    mine, _ = greedy_decode(kit, ids[0].tolist(), 24, eos_id=tok.eos_token_id)
    n_params = sum(p.numel() for p in kit.parameters())
    text = tok.decode(new, skip_special_tokens=True)
    detail = f"{len(new)} new tokens {text!r}, as the kit's; {n_params / 1e6:,.1f} M parameters"
    if not new or new != mine:
        return False, f"transformers {new} != the kit's greedy {mine}"
    return True, detail


def main(argv: list[str] | None = None) -> int:
    """Run every step, print a PASS/FAIL line for each and a summary; 0 when all pass."""
    args = parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(
            "gpu_smoke: FAIL: no CUDA device here, no GPU was checked (`--cpu` runs the CPU-sized variant)"
        )
        return 1
    nproc = args.nproc or (2 if args.cpu else torch.cuda.device_count())
    work = tempfile.mkdtemp(prefix="wmtp-gpu-smoke-")
    for name, value in child_env(work, args.cpu).items():  # this process's own caches too
        if name not in ("PYTHONPATH", "OMP_NUM_THREADS"):
            os.environ[name] = value
    sys.dont_write_bytecode = True
    if args.cpu:
        where = f"CPU, {nproc} process(es) over gloo"
    else:
        gpus = {torch.cuda.get_device_name(i) for i in range(nproc)}
        where = f"{nproc} x {', '.join(sorted(gpus))}, CUDA {torch.version.cuda}"
    print(f"gpu_smoke: {where}, torch {torch.__version__}; work dir {work}", flush=True)
    write_data(os.path.join(work, "data.jsonl"))
    results: list[tuple[str, bool, str]] = []

    def step(name: str, script: str, extra: list[str], crash: str = "", **env) -> bool:
        """One launch; it passes when it exits 0, or (crash) when it dies with the crash hook's
        message in its log."""
        log = os.path.join(work, f"{len(results) + 1}-{name.split()[0]}.log")
        code, secs, shown = launch(script, extra, work, args.cpu, nproc, log, **env)
        with open(log, errors="replace") as f:
            text = f.read()
        ok = (isinstance(code, int) and code != 0 and crash in text) if crash else code == 0
        detail = f"exit {code} in {secs:.0f} s: {shown}"
        if not ok:
            detail += f"\n--- last lines of {log}:\n{text[-2000:]}"
        results.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        return ok

    stop, peak = threading.Event(), {}
    watcher = None
    if not args.cpu and shutil.which("nvidia-smi"):
        watcher = threading.Thread(target=watch_gpu_memory, args=(stop, peak), daemon=True)
        watcher.start()
    try:
        ok = step("stage 1 (value head)", "train_critic.py", settings(work, args.cpu))
        stage2 = [*settings(work, args.cpu, "full"), "--algo", "critic"]
        ok = ok and step("stage 2, uninterrupted", "train_mtp.py", stage2)
        cut = [*settings(work, args.cpu, "cut"), "--algo", "critic"]
        crash = f"{CRASH_STEP}:{nproc - 1}"
        ok = ok and step(
            f"stage 2, rank {nproc - 1} dies saving step {CRASH_STEP}", "train_mtp.py", cut,
            crash="WMTP_TEST_CRASH", WMTP_TEST_CRASH=crash,
        )  # fmt: skip
        if ok:
            step_dir = os.path.join(work, "ckpt", "cut", f"step_{CRASH_STEP}")
            half = not os.path.exists(os.path.join(step_dir, "manifest.json"))
            results.append(("the crashed checkpoint is incomplete", half, step_dir))
            print(f"{'PASS' if half else 'FAIL'}  no manifest in {step_dir}", flush=True)
        ok = ok and step("stage 2, --resume auto", "train_mtp.py", [*cut, "--resume", "auto"])
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()

    if ok:
        metrics = run_metrics(work)
        full, resumed = metrics["full"]["train/loss"], metrics["cut"]["train/loss"]
        diff = max((abs(full[s] - resumed.get(s, float("inf"))) for s in full), default=0.0)
        same = sorted(full) == sorted(resumed) and diff <= args.loss_tol
        early = [s for s in full if s <= CRASH_STEP - 2 and full[s] != resumed.get(s)]
        detail = f"{len(full)} steps, max |difference| {diff:.3g}"
        if not same and early:
            detail += f" (steps {early}, before any resume, differ too: nondeterministic kernels)"
        results.append(("resumed losses equal the uninterrupted run's", same, detail))
        print(
            f"{'PASS' if same else 'FAIL'}  resumed losses equal the uninterrupted run's: {detail}"
        )
        for s in sorted(full):
            print(f"      step {s}: {full[s]:.6f}  resumed run {resumed.get(s, float('nan')):.6f}")
        try:
            good, detail = check_generation(
                os.path.join(work, "ckpt", "cut", "final"), "cpu" if args.cpu else "cuda"
            )
        except Exception as exc:  # any failure of the final model is this check's FAIL
            good, detail = False, f"{type(exc).__name__}: {exc}"
        results.append(("final model generates in transformers", good, detail))
        print(f"{'PASS' if good else 'FAIL'}  final model generates in transformers: {detail}")
        speeds = [v for s, v in metrics["full"]["time/tokens_per_s"].items() if s > 1]
        if speeds:
            print(
                f"tokens/s: {statistics.median(speeds):,.0f} (all {nproc} processes, median of {len(speeds)} steps)"
            )
    if not args.cpu and not peak:
        print("peak GPU memory: n/a (no nvidia-smi)")
    if peak:
        top = max(peak, key=peak.get)
        print(
            f"peak GPU memory: {peak[top] / 1024:.1f} GiB on GPU {top} "
            f"(nvidia-smi, CUDA context included; all GPUs: {[round(v / 1024, 1) for v in peak.values()]})"
        )
    passed = sum(good for _, good, _ in results)
    verdict = "PASS" if results and passed == len(results) and ok else "FAIL"
    print(f"SUMMARY: {verdict} ({passed}/{len(results)} checks passed; {where})")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
