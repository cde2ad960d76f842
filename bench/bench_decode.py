"""Greedy decoding, eager vs compiled (static KV cache, CUDA graphs), plain vs speculative, against
transformers' generate, side by side in one run.

Variants, each decoding the same prompt of a random model (wmtp_decode; greedy, batch `--batch`):
- eager plain: `greedy_decode` (head 0, DynamicCache), the default
- compiled plain: `greedy_decode(..., compile=True)` (StaticKV, `torch.compile(mode=
  "reduce-overhead")`: CUDA graphs on a GPU)
- eager / compiled speculative: the same with `speculative=True` (a forward feeds a token and the
  H-1 drafts, runs trunk + all H heads)
- generate: transformers' `generate` on the LlamaForCausalLM view of the model (wmtp_eval.causal_lm)

ms/token is the decoding time per new token with the prefill taken out: (t[N] - t[1]) / (N - 1),
t[n] the time of decoding n tokens (medians of `--rounds` interleaved rounds). ms/forward is
the same per forward. A random model's greedy text soon repeats one token, which its heads then
predict or not (tok/fwd says which): not a real acceptance rate, so the speculative rows measure
what a forward costs, and "projected" divides the compiled speculative forward by
`--tokens-per-forward` (Meta's 4-head models: about 3 on code). Compile time: the first compiled
decode's wall time minus the second's, with fresh inductor/Triton caches (`--warm-cache` keeps
them). The bandwidth limit: the bytes a plain token reads (trunk, head 0, norm, unembedding, K/V)
over the copy bandwidth measured here. Times: wall on CUDA, this process's CPU time on CPU (1
thread by default: the figures then hold on a machine shared with other jobs).

    python bench/bench_decode.py --device cpu --dim 256           # CPU, fp32, a small model
    python bench/bench_decode.py                                   # CUDA: 7B_1T_4 shapes, bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402

from wmtp_decode import greedy_decode_batch  # noqa: E402
from wmtp_eval import causal_lm  # noqa: E402
from wmtp_model import MTPModel, ffn_width, llama_config  # noqa: E402

VARIANTS = ["eager plain", "compiled plain", "eager spec", "compiled spec", "generate"]


def build_model(args, device: torch.device, dtype: torch.dtype) -> MTPModel:
    """A random MTPModel (init_mtp_model's init) built on `device` directly (a 7B model built on
    the host first would need ~27 GB of host memory)."""
    config = llama_config(
        vocab_size=args.vocab,
        dim=args.dim,
        n_blocks=args.layers - args.heads + 1,
        n_attn_heads=args.attn_heads,
        n_kv_heads=args.kv_heads,
        ffn_dim=ffn_width(args.dim),
        max_seq_len=4096,
        rope_theta=10000.0,
        norm_eps=1e-5,
    )
    generator = torch.Generator(device).manual_seed(0)
    with torch.device(device):
        model = MTPModel(config, args.heads)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=generator)
            p.data = p.data.to(dtype)  # parameters only: the rotary inv_freq stays float32
    return model.eval()


def sync(device: torch.device) -> None:
    """Wait for the device (timings end on it)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device: torch.device) -> float:
    """Wall seconds on CUDA; on CPU this process's CPU seconds, which other jobs on a shared
    machine do not inflate (with 1 thread, what the wall clock shows on an idle machine)."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def decode(variant: str, model, lm, prompts: list[list[int]], n: int) -> tuple[list, int, float]:
    """New tokens, forwards and seconds (`clock`) of one variant decoding n tokens per prompt."""
    device = model.lm_head.weight.device
    sync(device)
    t0 = clock(device)
    if variant == "generate":
        ids = torch.tensor(prompts, device=device)
        with torch.no_grad():
            out = lm.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        sync(device)
        return out[:, ids.shape[1] :].tolist(), n, clock(device) - t0
    outs, stats = greedy_decode_batch(
        model, prompts, n, speculative="spec" in variant, compile="compiled" in variant
    )
    sync(device)
    return outs, stats["forwards"], clock(device) - t0


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), best of 5."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def plain_token_bytes(model, context: int, batch: int) -> int:
    """Bytes one plain decoding step must read: trunk, head 0, norm, unembedding, embedding rows,
    and the K/V of `context` positions in those blocks."""
    blocks = list(model.layers) + [model.heads[0]]
    weights = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
    weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    weights += model.norm.weight.numel() * model.norm.weight.element_size()
    cfg, size = model.config, model.lm_head.weight.element_size()
    kv = 2 * len(blocks) * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return weights + batch * (cfg.hidden_size * size + kv * context * size)


def measure(args, model, prompts) -> tuple[dict, dict, dict]:
    """Medians over interleaved rounds of each variant's t[N] and t[1], first-call times, outputs."""
    lm = causal_lm(model)
    first, outs, times = {}, {}, {(v, n): [] for v in VARIANTS for n in (1, args.new_tokens)}
    for v in VARIANTS:  # warm-up: the compiled variants compile here (wall time: in workers too)
        walls = []
        for _ in range(2):
            t0 = time.perf_counter()
            decode(v, model, lm, prompts, args.new_tokens)
            walls.append(time.perf_counter() - t0)
        first[v] = walls
        decode(v, model, lm, prompts, 1)
    forwards = {}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for v in order:
            for n in (args.new_tokens, 1):
                out, fwd, secs = decode(v, model, lm, prompts, n)
                times[v, n].append(secs)
                forwards[v, n] = fwd
                if n == args.new_tokens:
                    outs[v] = out
    med = {key: statistics.median(t) for key, t in times.items()}
    return med, first, {"outs": outs, "forwards": forwards}


def report(args, model, prompts, device) -> None:
    """Print the side-by-side table, the ratios, compile times and the projections."""
    N = args.new_tokens
    med, first, got = measure(args, model, prompts)
    outs, fwd = got["outs"], got["forwards"]
    ms_tok = {v: 1e3 * (med[v, N] - med[v, 1]) / (N - 1) for v in VARIANTS}
    ms_fwd = {v: 1e3 * (med[v, N] - med[v, 1]) / max(fwd[v, N] - fwd[v, 1], 1) for v in VARIANTS}
    bw = copy_bandwidth(device)
    limit_ms = 1e3 * plain_token_bytes(model, args.prompt_len + N // 2, args.batch) / bw
    base = ms_tok["generate"]
    print(
        f"\n{'variant':16} {'ms/token':>9} {'x generate':>11} {'ms/forward':>11} {'tok/fwd':>8}"
        "  first call    same tokens"
    )
    for v in VARIANTS:
        tpf = args.batch * (N - 1) / max(fwd[v, N] - fwd[v, 1], 1)
        same = "yes" if outs[v] == outs["eager plain"] else "NO"
        print(
            f"{v:16} {ms_tok[v]:9.2f} {ms_tok[v] / base:11.2f} {ms_fwd[v]:11.2f} {tpf:8.2f}"
            f"  {first[v][0]:8.2f} s    {same}"
        )
    for mode in ("eager", "compiled"):
        ratio = ms_fwd[f"{mode} spec"] / ms_fwd[f"{mode} plain"]
        print(f"{mode}: speculative forward / plain forward x{ratio:.2f}")
    plain_c, spec_c = (first[v][0] - first[v][1] for v in ("compiled plain", "compiled spec"))
    print(
        f"compile time (first compiled decode's wall time minus the second's): plain {plain_c:.1f} s,"
        f" speculative {spec_c:.1f} s, {'a fresh' if args.cold else 'the existing'} inductor cache"
    )
    print(
        f"compiled plain / eager plain (ms/token) x{ms_tok['compiled plain'] / ms_tok['eager plain']:.2f}; "
        f"compiled spec / eager spec x{ms_tok['compiled spec'] / ms_tok['eager spec']:.2f}"
    )
    print(
        f"bandwidth limit: {plain_token_bytes(model, args.prompt_len + N // 2, args.batch) / 1e9:.3f}"
        f" GB per plain token / {bw / 1e9:.1f} GB/s copy bandwidth = {limit_ms:.3f} ms;"
        f" eager plain x{ms_tok['eager plain'] / limit_ms:.2f} the limit,"
        f" compiled plain x{ms_tok['compiled plain'] / limit_ms:.2f}"
    )
    T = args.tokens_per_forward
    proj = ms_fwd["compiled spec"] / T
    print(
        f"projected at {T:g} tokens per forward: compiled speculative {proj:.2f} ms/token ="
        f" x{base / proj:.2f} generate's speed, x{ms_tok['compiled plain'] / proj:.2f}"
        f" compiled plain's"
    )


def main() -> None:
    """Parse arguments, build the model and prompts, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--dim", type=int, default=4096, help="7B_1T_4: 4096")
    p.add_argument("--layers", type=int, default=32, help="trunk + head blocks (7B_1T_4: 32)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--attn-heads", type=int, help="default dim / 128 (7B_1T_4: 32)")
    p.add_argument("--kv-heads", type=int, help="default: as attn heads")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens-per-forward", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument(
        "--warm-cache",
        dest="cold",
        action="store_false",
        help="keep inductor's and Triton's on-disk caches (default: fresh ones, a cold compile)",
    )
    args = p.parse_args()
    if args.cold:
        tmp = tempfile.mkdtemp(prefix="bench_decode_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
    device = torch.device(args.device)
    args.attn_heads = args.attn_heads or max(args.dim // 128, 1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = build_model(args, device, dtype)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=g).tolist()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {where},"
        f" {torch.get_num_threads()} threads, {str(dtype).split('.')[1]}, batch {args.batch}"
    )
    print(
        f"model: dim {args.dim}, {args.layers - args.heads} trunk + {args.heads} head blocks,"
        f" {args.attn_heads} attention heads ({args.kv_heads or args.attn_heads} K/V), vocab"
        f" {args.vocab}; prompt {args.prompt_len} tokens, {args.new_tokens} new, {args.rounds} rounds"
    )
    report(args, model, prompts, device)


if __name__ == "__main__":
    main()
