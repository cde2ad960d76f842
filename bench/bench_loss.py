"""Memory and time of one forward + backward of the MTP loss at B=1, S=2048, V=32000, dim 512.

Memory: `mtp_loss` with H=4, `mtp_loss` with H=1 (next-token only, same trunk) and the naive
H=4 loss (full [B,S,H,V] logits, plain F.cross_entropy), and `mtp_loss` H=4 without head
checkpointing, each in its own subprocess, peak RSS (resource.getrusage). Time: one subprocess
alternates naive H=4 and `mtp_loss` H=4 steps (with tensor weights, and with critic and rho1
weight *functions*, which add a CE-only projection pass), and times the weight math alone
(value head + critic_weights; rho1_excess + rho1_weights).

    python bench/bench_loss.py [--seq 2048 --vocab 32000 --dim 512 --trunk 4 --reps 2 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def setup(args, heads: int):
    """A random fp32 MTP model with zeroed gradients already allocated, a batch and its labels."""
    import torch

    from wmtp_loss import mtp_targets
    from wmtp_model import init_mtp_model

    torch.set_num_threads(args.threads)
    model = init_mtp_model(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.trunk + heads,
        n_heads=heads,
        n_attn_heads=args.dim // 64,
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
    labels = mtp_targets(ids, torch.ones_like(ids, dtype=torch.bool), heads)
    return model, ids, labels


def naive_step(model, ids, labels) -> float:
    """Naive weighted MTP loss: full [B,S,H,V] logits, then F.cross_entropy; forward + backward."""
    import torch.nn.functional as F

    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.item()


def mtp_step(model, ids, labels, weights=None, checkpoint_heads: bool = True) -> float:
    """`mtp_loss` forward + backward."""
    from wmtp_loss import mtp_loss

    loss, _ = mtp_loss(model, ids, labels, weights, checkpoint_heads=checkpoint_heads)
    loss.backward()
    return loss.item()


def child_memory(args, what: str) -> dict:
    """Peak RSS of one step of `what` (mtp4, mtp4_nockpt, mtp1, naive4) in this fresh process."""
    model, ids, labels = setup(args, 1 if what == "mtp1" else 4)
    before = peak_rss()
    if what == "naive4":
        naive_step(model, ids, labels)
    else:
        mtp_step(model, ids, labels, checkpoint_heads=what != "mtp4_nockpt")
    return {"peak": peak_rss(), "before": before}


def child_time(args) -> dict:
    """Seconds per step: naive vs mtp_loss (tensor and function weights), and the weight math alone."""
    import torch

    from wmtp_loss import ValueHead, critic_weights, rho1_excess, rho1_weights, uniform_weights

    model, ids, labels = setup(args, 4)
    value_head = ValueHead(args.dim)
    ref_ce = torch.rand(1, args.seq)  # stands in for the reference model's next-token CE
    uniform = uniform_weights(labels)

    def critic(ce, hidden):
        with torch.no_grad():
            return critic_weights(value_head(hidden), labels)

    critic.needs_ce = False  # as train_mtp.py's: it reads only the hidden state, no CE pre-pass

    def rho1_skip(ce, hidden):
        return rho1_weights(rho1_excess(ce, ref_ce), labels, mode="skip")

    def rho1_soft(ce, hidden):
        return rho1_weights(rho1_excess(ce, ref_ce), labels)

    runs = {
        "naive": lambda: naive_step(model, ids, labels),
        "mtp": lambda: mtp_step(model, ids, labels, uniform),
        "mtp_critic": lambda: mtp_step(model, ids, labels, critic),
        "mtp_rho1_skip": lambda: mtp_step(model, ids, labels, rho1_skip),
    }
    runs["mtp"]()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(args.reps):  # interleaved, so that machine noise hits every variant alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    out = {name: statistics.median(t) for name, t in times.items()}

    hidden, ce = torch.randn(1, args.seq, args.dim), torch.rand(1, args.seq, 4)
    for name, fn in (
        ("critic_math", critic),
        ("rho1_skip_math", rho1_skip),
        ("rho1_soft_math", rho1_soft),
    ):
        fn(ce, hidden)
        start = time.perf_counter()
        for _ in range(20):
            fn(ce, hidden)
        out[name] = (time.perf_counter() - start) / 20
    return out


def run_child(args, what: str) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, __file__, "--child", what]
    cmd += ["--seq", str(args.seq), "--vocab", str(args.vocab), "--dim", str(args.dim)]
    cmd += ["--trunk", str(args.trunk), "--reps", str(args.reps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--trunk", type=int, default=4, help="trunk blocks (each head adds one block)"
    )
    parser.add_argument("--reps", type=int, default=2, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child_time(args) if args.child == "time" else child_memory(args, args.child)
        print(json.dumps(result))
        return

    print(
        f"B=1 S={args.seq} V={args.vocab} dim={args.dim}, trunk {args.trunk} blocks + H head blocks, fp32, CPU"
    )
    variants = {
        "mtp4": "mtp_loss H=4",
        "mtp4_nockpt": "mtp_loss H=4, heads not checkpointed",
        "mtp1": "mtp_loss H=1",
        "naive4": "naive H=4",
    }
    mem = {what: run_child(args, what) for what in variants}
    mib = {w: m["peak"] / 2**20 for w, m in mem.items()}
    step = {w: (m["peak"] - m["before"]) / 2**20 for w, m in mem.items()}
    print(
        "peak RSS of one forward+backward, each in its own process:  process peak | above model+grads"
    )
    for w, label in variants.items():
        print(f"  {label:<38} {mib[w]:>6.0f} MiB {step[w]:>6.0f} MiB")
    for w in ("mtp4", "mtp4_nockpt"):
        print(f"  {variants[w]}:")
        print(
            f"    / mtp_loss H=1: {mib[w] / mib['mtp1']:.2f}x process, {step[w] / step['mtp1']:.2f}x step (goal <= 1.3)"
        )
        print(
            f"    / naive H=4:    {mib[w] / mib['naive4']:.2f}x process, {step[w] / step['naive4']:.2f}x step (goal <= 0.35)"
        )

    t = run_child(args, "time")
    print(f"seconds per step (median of {args.reps}, interleaved in one process)")
    print(f"  naive H=4 {t['naive']:.2f} s")
    print(f"  mtp_loss H=4 {t['mtp']:.2f} s = {t['mtp'] / t['naive']:.3f}x naive (goal <= 1.15)")
    for name, label in (
        ("mtp_critic", "critic weight fn (needs_ce=False)"),
        ("mtp_rho1_skip", "rho1 tokenskip fn (70 % of slots kept)"),
    ):
        print(
            f"  mtp_loss + {label}: {t[name]:.2f} s = {t[name] / t['mtp']:.3f}x the tensor-weights step,"
            f" {t[name] / t['naive']:.3f}x naive"
        )
    print("weight math alone, relative to one mtp_loss step (goal <= 5 %)")
    for name, label in (
        ("critic_math", "value head + critic_weights"),
        ("rho1_skip_math", "rho1_excess + rho1_weights skip"),
        ("rho1_soft_math", "rho1_excess + rho1_weights weighted"),
    ):
        print(f"  {label:<36} {t[name] * 1e3:7.2f} ms = {100 * t[name] / t['mtp']:.2f} %")


if __name__ == "__main__":
    main()
