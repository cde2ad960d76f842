"""Optimizer-step time and peak RSS of each algorithm relative to baseline, on the same model and batch.

    python bench/train_step.py [--dim 256 --layers 8 --vocab 8000 --batch 4 --seq 256 --rounds 15]

Time: one process builds all four setups and runs them in rounds, one optimizer step of each
algorithm per round in a rotating order, so that the noise of a shared machine falls on all of them
alike; each ratio is the median over rounds of (step / baseline's step in the same round), with
the 25th–75th percentile beside it. Peak RSS: each algorithm in its own subprocess (`ru_maxrss`).
A step is train_mtp.py's own step functions (provisional_weight, micro_step, reduce_sums,
optimizer_step): targets, the algorithm's weights, mtp_loss, backward, rescale, clip, AdamW. For rho1 the reference
model's forward is timed on its own and "(step − ref) / base" is the goal's figure.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ALGOS = ["baseline", "critic", "rho1-weighted", "rho1-tokenskip"]


def make_step(algo: str, a: argparse.Namespace) -> Callable[[], tuple[float, float]]:
    """Build `algo`'s model, optimizer and batch; return a function running one optimizer step of
    the trainer's own step functions (train_mtp.micro_step, optimizer_step) and returning
    (step seconds, reference-forward seconds)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import train_mtp
    from wmtp import load_config
    from wmtp_dist import make_accelerator
    from wmtp_loss import ValueHead, next_token_ce
    from wmtp_model import init_mtp_model
    from wmtp_train import lr_schedule

    torch.manual_seed(0)
    cfg = load_config(
        os.path.join(ROOT, "config.yaml"), [f"train.algo={algo}", "critic.value_coef=0"]
    )
    model = init_mtp_model(
        vocab_size=a.vocab,
        dim=a.dim,
        n_layers=a.layers,
        n_heads=4,
        n_attn_heads=a.dim // 64,
        max_seq_len=a.seq,
    )
    acc = make_accelerator(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = acc.prepare(model, opt)
    sched = lr_schedule(opt, "constant", 0, 10**9)
    value_head = ValueHead(a.dim).requires_grad_(False) if algo == "critic" else None
    ref = None
    if algo.startswith("rho1"):
        rc = LlamaConfig(
            vocab_size=a.vocab,
            hidden_size=a.dim,
            intermediate_size=4 * a.dim,
            num_hidden_layers=a.layers // 2,
            num_attention_heads=a.dim // 64,
            max_position_embeddings=a.seq,
        )
        ref = LlamaForCausalLM(rc).eval().requires_grad_(False)
    parts = train_mtp.Parts(None, model, opt, sched, ref, None, value_head, None, torch.float32, 4)
    ids = torch.randint(3, a.vocab, (a.batch, a.seq))
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[:, : a.seq // 4] = False  # a prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}

    def reference_forward() -> None:
        with torch.no_grad():
            next_token_ce(
                ref(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float(), ids
            )

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        ref_s = 0.0
        if ref is not None:  # timed on its own: micro_step runs it again inside the step
            reference_forward()
            ref_s = time.perf_counter() - t0
            t0 = time.perf_counter()
        provisional = train_mtp.provisional_weight(acc, batch, 4)
        with acc.accumulate(model):
            micro = train_mtp.micro_step(cfg, acc, parts, batch, provisional)
            sums = train_mtp.reduce_sums(acc, micro.sums)
            train_mtp.optimizer_step(cfg, acc, parts, sums, provisional)
        return time.perf_counter() - t0, ref_s

    return step


def peak_rss(algo: str, a: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a process that runs 3 steps of `algo`."""
    step = make_step(algo, a)
    for _ in range(3):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """25th percentile, median, 75th percentile."""
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8, help="trunk + 4 head blocks (Meta's counting)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=15, help="timed rounds after 2 warm-up rounds")
    p.add_argument("--rss", choices=ALGOS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rss:
        print(json.dumps(peak_rss(a.rss, a)))
        return
    args = [f"--{k}={v}" for k, v in vars(a).items() if k != "rss"]
    rss = {
        algo: json.loads(
            subprocess.run(
                [sys.executable, __file__, "--rss", algo, *args],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()[-1]
        )
        for algo in ALGOS
    }
    steps = {algo: make_step(algo, a) for algo in ALGOS}
    times: dict[str, list[tuple[float, float]]] = {algo: [] for algo in ALGOS}
    for r in range(a.rounds + 2):
        order = ALGOS[r % len(ALGOS) :] + ALGOS[: r % len(ALGOS)]
        for algo in order:
            t = steps[algo]()
            if r >= 2:
                times[algo].append(t)
    base = [t for t, _ in times["baseline"]]
    print(
        f"model dim {a.dim}, {a.layers} blocks (4 heads), vocab {a.vocab}, batch {a.batch}x{a.seq}; "
        f"{a.rounds} interleaved rounds"
    )
    print(
        f"{'algo':16} {'step s':>7} {'ref s':>6} {'x base':>6} "
        f"{'(step-ref) x base [p25-p75]':>28} {'peak RSS MiB':>13} {'x base':>6}"
    )
    for algo in ALGOS:
        ts = times[algo]
        total = statistics.median(t for t, _ in ts)
        ref = statistics.median(r for _, r in ts)
        lo, mid, hi = quartiles([(t - r) / b for (t, r), b in zip(ts, base)])
        print(
            f"{algo:16} {total:7.3f} {ref:6.3f} {total / statistics.median(base):6.2f} "
            f"{mid:15.2f} [{lo:.2f}-{hi:.2f}] {rss[algo]:13.0f} {rss[algo] / rss['baseline']:6.2f}"
        )


if __name__ == "__main__":
    main()
