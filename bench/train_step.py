"""Optimizer-step time and peak RSS of each algorithm relative to baseline, on the same model and batch.

    python bench/train_step.py [--dim 256 --layers 8 --vocab 8000 --batch 4 --seq 256 --steps 5 --repeat 2]

Each (algorithm, repeat) runs in its own subprocess, round-robin; time is the fastest repeat's
median step, RSS the largest peak. A step is exactly what train_mtp.py does per optimizer step:
targets, the algorithm's weights (via the trainer's own weight function), mtp_loss, backward, clip,
AdamW. For rho1 the reference model's forward is timed on its own and reported separately.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ALGOS = ["baseline", "critic", "rho1-weighted", "rho1-tokenskip"]


def one(algo: str, a: argparse.Namespace) -> dict:
    """Time `a.steps` optimizer steps of `algo` in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from train_mtp import make_weight_fn
    from wmtp import load_config
    from wmtp_data import ValueHead, mtp_loss, mtp_targets, next_token_ce
    from wmtp_model import init_mtp_model

    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "config.yaml"), [f"train.algo={algo}"])
    model = init_mtp_model(
        vocab_size=a.vocab,
        dim=a.dim,
        n_layers=a.layers,
        n_heads=4,
        n_attn_heads=a.dim // 64,
        max_seq_len=a.seq,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    value_head = ValueHead(a.dim) if algo == "critic" else None
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
    ids = torch.randint(3, a.vocab, (a.batch, a.seq))
    attn = torch.ones_like(ids)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[:, : a.seq // 4] = False  # a prompt
    times, ref_times = [], []
    for i in range(a.steps + 2):
        t0 = time.perf_counter()
        labels = mtp_targets(ids, loss_mask, 4)
        ref_ce = None
        if ref is not None:
            r0 = time.perf_counter()
            with torch.no_grad():
                ref_ce = next_token_ce(ref(input_ids=ids, attention_mask=attn).logits.float(), ids)
            ref_times.append(time.perf_counter() - r0)
        weights = make_weight_fn(cfg, labels, ref_ce, value_head, False, {})
        loss, _ = mtp_loss(model, ids, labels, weights=weights, attention_mask=attn)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    return {
        "step_s": statistics.median(times),
        "ref_s": statistics.median(ref_times[2:]) if ref_times else 0.0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8, help="trunk + 4 head blocks (Meta's counting)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--one", choices=ALGOS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a)))
        return
    args = [f"--{k}={v}" for k, v in vars(a).items() if k != "one"]
    runs: dict[str, list[dict]] = {algo: [] for algo in ALGOS}
    for _ in range(a.repeat):
        for algo in ALGOS:
            out = subprocess.run(
                [sys.executable, __file__, "--one", algo, *args],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[algo].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {
        algo: min(r, key=lambda x: x["step_s"])
        | {"peak_rss_mib": max(x["peak_rss_mib"] for x in r)}
        for algo, r in runs.items()
    }
    base = best["baseline"]
    print(
        f"model dim {a.dim}, {a.layers} blocks (4 heads), vocab {a.vocab}, batch {a.batch}x{a.seq}; median of {a.steps} steps, best of {a.repeat}"
    )
    print(
        f"{'algo':16} {'step s':>8} {'x base':>7} {'ref fwd s':>9} {'(step-ref) x base':>18} {'peak RSS MiB':>13} {'x base':>7}"
    )
    for algo, r in best.items():
        own = (r["step_s"] - r["ref_s"]) / base["step_s"]
        print(
            f"{algo:16} {r['step_s']:8.3f} {r['step_s'] / base['step_s']:7.2f} {r['ref_s']:9.3f} {own:18.2f} "
            f"{r['peak_rss_mib']:13.0f} {r['peak_rss_mib'] / base['peak_rss_mib']:7.2f}"
        )


if __name__ == "__main__":
    main()
