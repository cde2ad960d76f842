"""Self-speculative vs plain greedy decoding on CPU, batch 1, same KV cache (wmtp_decode).

(a) The tests' corpus model (dim 64, 2 trunk + 4 head blocks, byte vocabulary) trained here with
`mtp_loss` on a repeated fixed text until its heads predict it, decoding prompts from that text;
and the same with a deeper trunk (`--deep-trunk`, 12 blocks: heads are a smaller share of a forward,
as in 7B_1T_4's 28 + 4). (b) The default trained model: config.yaml's `model:` shape trained by
`train_mtp.py` with the shipped defaults (100 steps on HumanEval) in a temp dir, or `--model PATH`
(e.g. runs/checkpoints/<run>/final), decoding MBPP test prompts from ../shared. Plain and
speculative decoding of all prompts alternate round by round; the speedup is the median over
rounds of plain seconds / speculative seconds, by the wall clock and by this process's CPU time
(which a machine shared with other jobs does not inflate; with --threads 1 it is what the wall
clock shows on an idle machine). The CPU cost of one forward, plain (1 token, trunk + head 0) vs
speculative (H tokens, trunk + H heads), says how far CPU can go: speedup ~ tokens per forward
/ (speculative forward / plain forward).

    python bench/bench_decode.py [--threads 1 --new-tokens 64 --prompts 8 --rounds 5 --model PATH]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import wmtp  # noqa: E402
from wmtp_data import prompt_ids  # noqa: E402
from wmtp_decode import greedy_decode  # noqa: E402

CORPUS = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"  # as tests/test_decode.py


def corpus_model(steps: int, seq: int, n_prompts: int, new_tokens: int, n_trunk: int = 2):
    """The tests' corpus model (n_trunk trunk blocks) trained on windows of `seq` tokens, and
    prompts from the corpus."""
    tok = wmtp.byte_tokenizer()
    text = torch.tensor(tok.encode(CORPUS * (seq // len(CORPUS) + 2)))
    model = wmtp.init_mtp_model(
        vocab_size=tok.vocab_size,
        dim=64,
        n_layers=n_trunk + 4,
        n_heads=4,
        n_attn_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        seed=0,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(CORPUS), (8,), generator=g).tolist()
        x = torch.stack([text[s : s + seq] for s in starts])
        labels = wmtp.mtp_targets(x, torch.ones_like(x, dtype=torch.bool), 4)
        loss, _ = wmtp.mtp_loss(model, x, labels, checkpoint_heads=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prompt_len = seq - new_tokens  # stay inside the trained positions
    step = len(CORPUS) // n_prompts
    prompts = [text[i * step : i * step + prompt_len].tolist() for i in range(n_prompts)]
    return model.eval(), prompts, f"loss {loss.item():.3f} after {steps} steps"


def default_model(path: str | None, n_prompts: int, data: str):
    """The default trained model (train_mtp.py defaults in a temp dir unless `path`) and MBPP prompts."""
    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        cmd = [sys.executable, os.path.join(ROOT, "train_mtp.py"), "--config"]
        cmd += [os.path.join(ROOT, "config.yaml"), "--set", "train.run_name=bench-decode"]
        subprocess.run(cmd, cwd=tmp.name, check=True, capture_output=True)
        path = glob.glob(os.path.join(tmp.name, "runs", "checkpoints", "*", "final"))[0]
        how = "trained here by train_mtp.py with config.yaml's defaults (100 steps, HumanEval)"
    else:
        how = f"loaded from {path}"
    model = wmtp.load_model(path, dtype=torch.float32).eval()
    tok = wmtp.load_tokenizer(path)
    examples = list(wmtp.iter_dataset(data, "test"))[:n_prompts]
    prompts = [prompt_ids(tok, ex.prompt, 256) for ex in examples]
    if tmp is not None:
        tmp.cleanup()
    return model, prompts, how


def run(model, prompts, new_tokens: int, speculative: bool) -> tuple[list, dict, float, float]:
    """Decode each prompt alone; outputs, summed statistics, wall and CPU seconds."""
    drafts = [0] * (model.n_heads - 1)
    outs, total = [], {"forwards": 0, "tokens": 0, "proposed": drafts, "accepted": list(drafts)}
    wall, cpu = time.perf_counter(), time.process_time()
    for p in prompts:
        stats = {}
        outs.append(greedy_decode(model, p, new_tokens, speculative=speculative, stats=stats)[0])
        total["forwards"] += stats["forwards"]
        total["tokens"] += stats["tokens"]
        for k, (a, n) in enumerate(zip(stats["accepted"], stats["proposed"])):
            total["accepted"][k] += a
            total["proposed"][k] += n
    return outs, total, time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def step_ms(model, cache_len: int, reps: int) -> dict[tuple[int, int], float]:
    """Median CPU ms of a decoding forward over a cache_len-token cache, by (tokens fed, heads run).

    The four kinds (1 or H tokens; head 0 only or all H heads) take turns.
    """
    H = model.n_heads
    kinds = [(1, 1), (H, 1), (1, H), (H, H)]
    ids = torch.randint(0, model.config.vocab_size, (1, cache_len + H))
    pos = torch.arange(cache_len, cache_len + H).unsqueeze(0)
    caches = {}
    for kind in kinds:
        caches[kind] = DynamicCache()
        hidden, ctx = model.run_trunk(ids[:, :cache_len], cache=caches[kind])
        for k in range(kind[1]):
            model.run_head(k, hidden, ctx)
    times = {kind: [] for kind in kinds}
    for _ in range(reps):
        for n_fed, n_heads in kinds:
            t0 = time.process_time()
            hidden, ctx = model.run_trunk(
                ids[:, cache_len : cache_len + n_fed],
                cache=caches[n_fed, n_heads],
                position_ids=pos[:, :n_fed],
            )
            model.lm_head(model.run_head(0, hidden, ctx)).argmax(-1)
            for k in range(1, n_heads):
                model.lm_head(model.run_head(k, hidden, ctx)[:, -1]).argmax(-1)
            times[n_fed, n_heads].append(time.process_time() - t0)
            caches[n_fed, n_heads].crop(-n_fed)
    return {kind: 1e3 * statistics.median(t) for kind, t in times.items()}


def report(name: str, model, prompts, new_tokens: int, rounds: int) -> None:
    """Print plain vs speculative: tokens per forward, tokens/s, speedup, identical text, step cost."""
    outs, stats = {}, {}
    secs = {(spec, clock): [] for spec in (False, True) for clock in ("wall", "cpu")}
    for r in range(rounds):
        for speculative in (r % 2 == 0, r % 2 == 1):
            outs[speculative], stats[speculative], wall, cpu = run(
                model, prompts, new_tokens, speculative
            )
            secs[speculative, "wall"].append(wall)
            secs[speculative, "cpu"].append(cpu)
    H = model.n_heads
    cache_len = sum(map(len, prompts)) // len(prompts) + new_tokens // 2
    ms = step_ms(model, cache_len, 30)
    spec = stats[True]
    tpf = spec["tokens"] / spec["forwards"]
    acc = [a / max(n, 1) for a, n in zip(spec["accepted"], spec["proposed"])]
    print(f"\n{name}: {len(prompts)} prompts x {new_tokens} new tokens, {rounds} rounds")
    print(f"{'':12} {'tok/fwd':>8} {'tok/s wall':>11} {'tok/s CPU':>10}")
    for label, sp in (("plain", False), ("speculative", True)):
        n = stats[sp]["tokens"] * rounds
        print(
            f"{label:12} {stats[sp]['tokens'] / stats[sp]['forwards']:8.2f}"
            f" {n / sum(secs[sp, 'wall']):11.0f} {n / sum(secs[sp, 'cpu']):10.0f}"
        )
    for clock in ("wall", "cpu"):
        ratios = [a / b for a, b in zip(secs[False, clock], secs[True, clock])]
        print(
            f"speedup ({clock}) x{statistics.median(ratios):.2f}"
            f" (median of {rounds} rounds; min {min(ratios):.2f}, max {max(ratios):.2f})"
        )
    print(
        f"identical text: {outs[True] == outs[False]}"
        f"; head 1..{H - 1} acceptance: {', '.join(f'{a:.2f}' for a in acc)}"
    )
    cost = ms[H, H] / ms[1, 1]
    print(
        f"CPU ms per forward over a {cache_len}-token cache: plain (1 token, head 0)"
        f" {ms[1, 1]:.2f}; {H} tokens, head 0 {ms[H, 1]:.2f}; 1 token, {H} heads {ms[1, H]:.2f};"
        f" speculative ({H} tokens, {H} heads) {ms[H, H]:.2f} = x{cost:.2f} plain;"
        f" tokens/forward / that = x{tpf / cost:.2f}"
    )


def shape(model) -> str:
    """dim, blocks and vocabulary of an MTPModel, for the report."""
    n_trunk, H = len(model.layers), model.n_heads
    return f"dim {model.config.hidden_size}, {n_trunk}+{H} blocks, vocab {model.config.vocab_size}"


def main() -> None:
    """Parse arguments, build both models, print both reports."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--corpus-steps", type=int, default=150)
    p.add_argument("--deep-steps", type=int, default=250)
    p.add_argument("--corpus-seq", type=int, default=96, help="training window (tokens)")
    p.add_argument(
        "--deep-trunk",
        type=int,
        default=12,
        help="also a corpus model with this many trunk blocks (0: skip)",
    )
    p.add_argument("--model", help="a trained model folder; default: train one with train_mtp.py")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "mbpp"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU, fp32, batch 1")
    for n_trunk in [2] + [args.deep_trunk] * (args.deep_trunk > 0):
        steps = args.corpus_steps if n_trunk == 2 else args.deep_steps
        model, prompts, how = corpus_model(
            steps, args.corpus_seq, args.prompts, args.new_tokens, n_trunk
        )
        name = f"(a) corpus model, {shape(model)} ({how})"
        report(name, model, prompts, args.new_tokens, args.rounds)
    model, prompts, how = default_model(args.model, args.prompts, args.data)
    report(
        f"(b) default model, {shape(model)} ({how})", model, prompts, args.new_tokens, args.rounds
    )


if __name__ == "__main__":
    main()
