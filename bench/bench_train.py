"""The trainer's optimizer step against a plain loop on the same model, data, optimizer and precision.

    python bench/bench_train.py [--shape tiny|dim512|0.5b|7b_slice] [--algos baseline critic ...]
                                [--rounds 10] [--profile FILE]

"kit" is train_mtp.py's own step (provisional_weight, micro_step, reduce_sums, optimizer_step,
through the Accelerator and its autocast); "plain" is what a hand-written loop does: mtp_loss with
the same weights, backward, clip, AdamW, zero_grad, under the same autocast. Both are built per
algorithm in one process and run interleaved (kit, plain, plain, kit, ...), after warm-up steps,
so that a shared machine's noise falls on both alike. Printed per algorithm: median ms per
optimizer step, tokens/s, model TFLOP/s and MFU against a matmul peak measured in this run
(bf16 on CUDA, fp32 on CPU), peak memory, and on CUDA the host time per step (until the step's
Python returns, before the device is idle); the kit/plain ratio is the median over rounds of the
per-round ratio. --compile compiles the kit's decoder blocks (train.compile: true) against
the eager plain loop. --profile writes torch.profiler's top ops (host and device time) of a few kit
steps. Goals: kit ≤ 1.05× plain everywhere; on an H200 ≥ 40% MFU at 0.5b, ≥ 50% at 7b_slice.
"""

import argparse
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ALGOS = ["baseline", "critic", "rho1-weighted", "rho1-tokenskip"]
# name: (dim, blocks incl. the 4 heads, attention heads, kv heads, ffn, vocab, batch, seq)
SHAPES = {
    "tiny": (64, 6, 4, 2, 176, 259, 4, 128),
    "dim512": (512, 8, 8, 8, 1376, 8000, 4, 256),
    "0.5b": (1536, 20, 12, 4, 4096, 259, 8, 2048),  # tests/gpu_smoke.py's model
    "7b_slice": (4096, 8, 32, 32, 11008, 32000, 2, 4096),  # 7B_1T_4's blocks: 4 trunk + 4 heads
}


def model_flops_per_token(
    dim: int, blocks: int, ffn: int, vocab: int, seq: int, kv: int, heads: int
) -> float:
    """Training FLOPs per token (forward + backward = 6 × the matmul parameters, PaLM's 12·L·D·S
    for attention), each head's unembedding counted; checkpoint recompute is not model FLOPs."""
    attn = dim * dim * 2 + dim * (dim * kv // heads) * 2  # q, o; k, v
    block = attn + 3 * dim * ffn
    return 6 * (blocks * block + 4 * vocab * dim) + 12 * blocks * dim * seq


def matmul_peak(device, dtype) -> float:
    """TFLOP/s of a large square matmul on this device, measured now (the MFU denominator)."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def build(algo: str, shape: tuple, device, compile: bool = False):
    """(kit step, plain step, tokens per step) for `algo`: two copies of the same random model,
    optimizer and batch, one driven by train_mtp's step functions, one by a plain loop."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import train_mtp
    from wmtp import load_config
    from wmtp_dist import make_accelerator
    from wmtp_loss import IGNORE, ValueHead, mtp_loss, mtp_targets, next_token_ce
    from wmtp_model import init_mtp_model
    from wmtp_train import compile_blocks, lr_schedule

    dim, blocks, heads, kv, ffn, vocab, batch, seq = shape
    mp = "bf16" if device.type == "cuda" else "no"
    overrides = [f"train.algo={algo}", "critic.value_coef=0", f"train.mixed_precision='{mp}'"]
    cfg = load_config(os.path.join(ROOT, "config.yaml"), overrides)
    dims = dict(
        vocab_size=vocab, dim=dim, n_layers=blocks, n_heads=4, n_attn_heads=heads, n_kv_heads=kv,
        max_seq_len=seq, ffn_dim=ffn,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[:, : seq // 4] = False  # a prompt
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
    value_head = ValueHead(dim).to(device).requires_grad_(False) if algo == "critic" else None
    ref = None
    if algo.startswith("rho1"):
        rc = LlamaConfig(
            vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=blocks // 2,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=seq,
        )  # fmt: skip
        ref = LlamaForCausalLM(rc).to(device).eval().requires_grad_(False)

    acc = make_accelerator(cfg)
    kit_model = init_mtp_model(**dims, seed=1).float()
    if compile:  # train.compile: the trainer's torch.compile of each decoder block
        compile_blocks(kit_model)
    opt = torch.optim.AdamW(kit_model.parameters(), lr=1e-5)
    kit_model, opt = acc.prepare(kit_model, opt)
    sched = lr_schedule(opt, "constant", 0, 10**9)
    parts = train_mtp.Parts(
        None, kit_model, opt, sched, ref, None, value_head, None, torch.float32, 4
    )

    def kit() -> None:
        provisional = train_mtp.provisional_weight(acc, batch_, 4)
        with acc.accumulate(kit_model):
            micro = train_mtp.micro_step(cfg, acc, parts, batch_, provisional)
            sums = train_mtp.reduce_sums(acc, micro.sums)
            train_mtp.optimizer_step(cfg, acc, parts, sums, provisional)

    plain_model = init_mtp_model(**dims, seed=1).float().to(device)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-5)
    d_ids, d_attn = ids.to(device), batch_["attention_mask"].to(device)
    d_labels = mtp_targets(d_ids, loss_mask.to(device), 4, attention_mask=d_attn)
    assert (d_labels != IGNORE).any()

    def plain() -> None:
        ref_ce = None
        if ref is not None:
            with torch.no_grad():
                ref_ce = next_token_ce(
                    ref(input_ids=d_ids, attention_mask=d_attn).logits.float(), d_ids
                )
        weights = train_mtp.weight_fn(cfg, d_labels, ref_ce, value_head)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mp == "bf16"):
            loss, _ = mtp_loss(plain_model, d_ids, d_labels, weights=weights, attention_mask=d_attn)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    return kit, plain, int(batch_["attention_mask"].sum())


def timed(step, device) -> tuple[float, float]:
    """(seconds until the step is done on the device, seconds until its Python returned)."""
    sync(device)
    t0 = time.perf_counter()
    step()
    host = time.perf_counter() - t0
    sync(device)
    return time.perf_counter() - t0, host


def peak_memory(device) -> str:
    """Peak device memory (CUDA) or peak RSS of this process (CPU), in GiB."""
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def profile(step, device, path: str, steps: int = 3) -> None:
    """torch.profiler's top ops of `steps` kit steps, by host and by device time, to `path`."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    table = prof.key_averages()
    with open(path, "w") as f:
        f.write(table.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
        if device.type == "cuda":
            f.write(table.table(sort_by="self_cuda_time_total", row_limit=30) + "\n")


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; print the table; return {algo: {kit, plain, ratio ...}}."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=ALGOS)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds after --warmup rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", metavar="FILE", help="torch.profiler's top ops of the kit's step")
    p.add_argument("--compile", action="store_true", help="the kit with train.compile: true")
    a = p.parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and a.shape in ("0.5b", "7b_slice"):
        p.error(f"--shape {a.shape} is a GPU shape; on CPU use tiny or dim512")
    shape = SHAPES[a.shape]
    dim, blocks, heads, kv, ffn, vocab, batch, seq = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, dtype)
    per_token = model_flops_per_token(dim, blocks, ffn, vocab, seq, kv, heads)
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"{a.shape}: dim {dim}, {blocks} blocks (4 heads), vocab {vocab}, batch {batch}x{seq}; {name}, "
        f"torch {torch.__version__}; {str(dtype).split('.')[-1]} matmul peak {peak:.1f} TFLOP/s"
    )
    print(
        f"{'algo':15} {'side':6} {'ms/step':>9} {'host ms':>8} {'tok/s':>10} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'kit/plain [p25-p75]':>22} {'peak memory':>16}"
    )
    out = {}
    for algo in a.algos:
        kit, plain, tokens = build(algo, shape, device, a.compile)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = {"kit": [], "plain": []}
        for r in range(a.warmup + a.rounds):
            order = ("kit", "plain") if r % 2 == 0 else ("plain", "kit")
            for side in order:
                t = timed(kit if side == "kit" else plain, device)
                if r >= a.warmup:
                    times[side].append(t)
        ratios = sorted(k[0] / p_[0] for k, p_ in zip(times["kit"], times["plain"]))
        q = (
            statistics.quantiles(ratios, n=4, method="inclusive")
            if len(ratios) > 1
            else [ratios[0]] * 3
        )
        out[algo] = {"ratio": q[1], "p25": q[0], "p75": q[2]}
        for side in ("kit", "plain"):
            step_s = statistics.median(t for t, _ in times[side])
            host_s = statistics.median(h for _, h in times[side])
            tflops = per_token * tokens / step_s / 1e12
            host = f"{host_s * 1e3:8.1f}" if device.type == "cuda" else f"{'n/a':>8}"
            ratio = f"{q[1]:.3f} [{q[0]:.3f}-{q[2]:.3f}]" if side == "kit" else ""
            print(
                f"{algo:15} {side:6} {step_s * 1e3:9.1f} {host} {tokens / step_s:10.0f} {tflops:8.2f} "
                f"{tflops / peak:6.1%} {ratio:>22} {peak_memory(device):>16}"
            )
            out[algo][side] = {"ms": step_s * 1e3, "tflops": tflops, "mfu": tflops / peak}
        if a.profile:
            profile(kit, device, f"{a.profile}.{algo}")
            print(f"profile: {a.profile}.{algo}")
    return out


if __name__ == "__main__":
    main()
