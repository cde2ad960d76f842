"""One training step of the MTP loss against its best peers, at the shapes that matter on a GPU.

Variants, each one forward + backward with the gradients already allocated:
- kit: `mtp_loss` H=4 (heads checkpointed, default chunking; `--chunk-rows` adds fixed chunks)
- liger: Liger-Kernel's fused linear cross-entropy, one call per head on checkpointed heads
  (CUDA, when `liger-kernel` is installed: `pip install -e .[gpu]`)
- naive: [B,S,H,V] logits from model(ids), then F.cross_entropy
- kit H=1: `mtp_loss` on a model with the same blocks, only one of them a head

CUDA: bf16 parameters, the 7B_1T_4 and Llama-3-vocabulary shapes, random models built on the
device; variants interleaved, median of `--steps` after `--warmup` steps; peak is
torch.cuda.max_memory_allocated during the step (model and gradients included). CPU (`--cpu`, or
no CUDA): fp32, tiny shapes, no memory figure (bench/bench_loss.py measures CPU memory).

    python bench/bench_gpu_loss.py                  # CUDA: 7b_1t_4 and llama3-vocab
    python bench/bench_gpu_loss.py --shapes llama3-vocab --chunk-rows 1024 4096 8192
    python bench/bench_gpu_loss.py --cpu            # tiny shapes on CPU (what the tests run)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wmtp_loss import IGNORE, default_chunk_rows, mtp_loss, mtp_targets  # noqa: E402
from wmtp_model import MTPModel, ffn_width, llama_config  # noqa: E402

# n_layers counts trunk + head blocks for H=4, as Meta's params.json does; H=1 keeps the total
SHAPES = {
    "7b_1t_4": dict(dim=4096, n_layers=32, n_attn_heads=32, vocab=32000, batch=2, seq=4096),
    "llama3-vocab": dict(dim=4096, n_layers=8, n_attn_heads=32, vocab=128256, batch=1, seq=8192),
    "tiny": dict(dim=64, n_layers=6, n_attn_heads=4, vocab=512, batch=2, seq=64),
    "tiny-vocab": dict(dim=64, n_layers=6, n_attn_heads=4, vocab=8192, batch=1, seq=128),
}
GPU_SHAPES, CPU_SHAPES = ["7b_1t_4", "llama3-vocab"], ["tiny", "tiny-vocab"]
HEADS = 4


def build_model(shape: dict, heads: int, device: torch.device, dtype: torch.dtype) -> MTPModel:
    """A random MTP model of `shape` (init_mtp_model's init), built on `device` directly (a 7B
    model made on the host first would need ~27 GB of host memory). Gradients are allocated."""
    config = llama_config(
        vocab_size=shape["vocab"],
        dim=shape["dim"],
        n_blocks=shape["n_layers"] - heads + 1,
        n_attn_heads=shape["n_attn_heads"],
        n_kv_heads=None,
        ffn_dim=ffn_width(shape["dim"]),
        max_seq_len=shape["seq"],
        rope_theta=10000.0,
        norm_eps=1e-5,
    )
    generator = torch.Generator(device).manual_seed(0)
    with torch.device(device):
        model = MTPModel(config, heads)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=generator)
            p.data = p.data.to(dtype)  # parameters only: the rotary inv_freq stays float32
            p.grad = torch.zeros_like(p)
    return model


def kit_step(model, ids, labels, chunk_rows=None) -> float:
    """`mtp_loss` forward + backward; returns the loss."""
    loss, _ = mtp_loss(model, ids, labels, chunk_size=chunk_rows)
    loss.backward()
    return loss.item()


def liger_step(model, ids, labels, liger_ce) -> float:
    """Liger's fused linear CE once per head (summed, over all valid slots) on checkpointed heads."""
    hidden, ctx = model.run_trunk(ids)
    weight, total = model.lm_head.weight, 0.0
    for k in range(model.n_heads):
        z = checkpoint(model.run_head, k, hidden, ctx, use_reentrant=False)
        total = total + liger_ce(weight, z.flatten(0, 1), labels[..., k].flatten())
    loss = total / (labels != IGNORE).sum()
    loss.backward()
    return loss.item()


def naive_step(model, ids, labels) -> float:
    """Full [B,S,H,V] logits, then F.cross_entropy over every slot."""
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), ignore_index=IGNORE)
    loss.backward()
    return loss.item()


def model_flops(shape: dict, heads: int) -> float:
    """Model FLOPs of one forward + backward: 6 per token per matmul weight (every block once, the
    unembedding once per head) plus causal attention; recomputation not counted."""
    d, tokens = shape["dim"], shape["batch"] * shape["seq"]
    block = 4 * d * d + 3 * d * ffn_width(d)
    matmul = 6 * tokens * (shape["n_layers"] * block + heads * shape["vocab"] * d)
    return matmul + 6 * shape["n_layers"] * tokens * shape["seq"] * d


def time_steps(runs: dict, device: torch.device, warmup: int, steps: int) -> dict[str, dict]:
    """Run the variants interleaved; median seconds, worst peak bytes (CUDA) and the loss of each."""
    cuda = device.type == "cuda"
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    peak = dict.fromkeys(runs, 0)
    loss = {}
    for i in range(warmup + steps):
        for name, run in runs.items():
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            loss[name] = run()
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                seconds[name].append(time.perf_counter() - start)
                if cuda:
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    return {
        name: {
            "s": statistics.median(seconds[name]),
            "peak": peak[name] if cuda else None,
            "loss": loss[name],
        }
        for name in runs
    }


def free(device: torch.device) -> None:
    """Return a dropped model's memory, so the next model's peak starts from the same floor."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def variants(model, ids, labels, chunk_rows: list[int], liger_ce) -> dict:
    """The steps to compare on one model: {name: step()}."""
    if model.n_heads == 1:
        return {"kit H=1": lambda: kit_step(model, ids, labels)}
    runs = {"kit": lambda: kit_step(model, ids, labels)}
    for rows in chunk_rows:
        runs[f"kit, chunk {rows}"] = lambda rows=rows: kit_step(model, ids, labels, rows)
    if liger_ce is not None:
        runs["liger"] = lambda: liger_step(model, ids, labels, liger_ce)
    runs["naive"] = lambda: naive_step(model, ids, labels)
    return runs


def bench_shape(name: str, args, device: torch.device, dtype: torch.dtype, liger_ce) -> dict:
    """Every variant at one shape: {variant: {s, peak, loss, flops}}; the H=4 model, then the H=1."""
    shape = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g).to(device)
    every = torch.ones_like(ids, dtype=torch.bool)
    out = {}
    for heads in (HEADS, 1):
        model = build_model(shape, heads, device, dtype)
        free(device)  # the fp32 parameters it was made from
        labels = mtp_targets(ids, every, heads)
        runs = variants(model, ids, labels, args.chunk_rows, liger_ce)
        for variant, r in time_steps(runs, device, args.warmup, args.steps).items():
            out[variant] = {**r, "flops": model_flops(shape, heads)}
        del model, runs
        free(device)
    return out


def check_losses(name: str, results: dict, dtype: torch.dtype) -> None:
    """The H=4 losses must agree (same model, same slots), or the comparison means nothing."""
    ref = results["naive"]["loss"]
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    for variant, r in results.items():
        if variant != "kit H=1" and abs(r["loss"] - ref) > tol * abs(ref):
            raise SystemExit(f"{name}: {variant} loss {r['loss']:.5f} != naive {ref:.5f}")


def report(name: str, results: dict, device: torch.device) -> None:
    """A markdown table of one shape, ratios against Liger and naive, and the goals."""
    shape, cuda = SHAPES[name], device.type == "cuda"
    liger, naive = results.get("liger"), results["naive"]
    rows = default_chunk_rows(shape["vocab"], shape["dim"], device)
    print(
        f"\n### {name}: dim {shape['dim']}, {shape['n_layers']} blocks ({shape['n_layers'] - HEADS} "
        f"trunk + {HEADS} heads; H=1: {shape['n_layers'] - 1} + 1), V {shape['vocab']}, "
        f"B {shape['batch']} x S {shape['seq']}; default chunk {rows} rows\n"
    )
    print(
        "| variant | s / step | peak GiB | model TFLOP/s | x liger time | x liger peak | x naive time | loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        peak = f"{r['peak'] / 2**30:.1f}" if cuda else "-"
        vs_liger = f"{r['s'] / liger['s']:.3f}" if liger else "-"
        peak_liger = f"{r['peak'] / liger['peak']:.3f}" if liger and cuda else "-"
        print(
            f"| {variant} | {r['s']:.3f} | {peak} | {r['flops'] / r['s'] / 1e12:.3g} | {vs_liger} | "
            f"{peak_liger} | {r['s'] / naive['s']:.3f} | {r['loss']:.4f} |"
        )
    kit = results["kit"]
    goals = [
        f"kit H=4 / H=1 time {kit['s'] / results['kit H=1']['s']:.3f}x (goal <= 1.07 at 7b_1t_4)"
    ]
    goals.append(f"kit / naive time {kit['s'] / naive['s']:.3f}x (goal <= 1.0 at 7b_1t_4)")
    if liger and cuda:
        goals.append(
            f"kit / liger time {kit['s'] / liger['s']:.3f}x (goal <= 1.0), "
            f"peak {kit['peak'] / liger['peak']:.3f}x (goal <= 1.05)"
        )
    print("\n" + "\n".join(f"- {g}" for g in goals))


def load_liger(device: torch.device):
    """Liger's fused linear CE (sum over valid slots), or None with the reason printed."""
    if device.type != "cuda":
        print("liger: not run (its kernels are Triton, CUDA only)")
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        print("liger: not run (liger-kernel is not installed: pip install -e .[gpu])")
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cpu", action="store_true", help="tiny shapes on CPU (the default without CUDA)"
    )
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: by device")
    ap.add_argument("--chunk-rows", type=int, nargs="*", default=[], help="extra kit variants")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = args.shapes or (GPU_SHAPES if cuda else CPU_SHAPES)
    if not cuda:
        torch.set_num_threads(args.threads)
        too_big = [s for s in shapes if s not in CPU_SHAPES]
        if too_big:
            ap.error(f"{too_big} need a GPU; on CPU only {CPU_SHAPES} run")
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.threads} threads"
    print(
        f"{where}; torch {torch.__version__}; {str(dtype).split('.')[1]} parameters; forward + "
        f"backward; median of {args.steps} after {args.warmup} warm-ups, variants interleaved"
    )
    liger_ce = load_liger(device)
    results = {}
    for name in shapes:
        results[name] = bench_shape(name, args, device, dtype, liger_ce)
        check_losses(name, results[name], dtype)
        report(name, results[name], device)
    return results


if __name__ == "__main__":
    main()
