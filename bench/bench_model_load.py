"""Load a Meta-native MTP model (~1 GiB by default) from S3 (s3rver): `load_model` against the old way
(download the folder to disk, `torch.load`, `load_state_dict` into an already-built model) and
against fetching the raw bytes with `cat_file`. Each figure runs in its own subprocess so that
peak RSS (resource.getrusage) is its own.

    python bench/bench_model_load.py [--dim 2048 --n-layers 8 --heads 4 --vocab 32000 --repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

BUCKET = "bench"
URI = f"s3://{BUCKET}/meta-mtp"


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_model(uri: str, *, dim: int, n_layers: int, heads: int, vocab: int) -> int:
    """Write params.json + consolidated.00.pth (bf16 random weights) to uri; return the weight bytes."""
    import torch

    import io_stream
    from wmtp_model import ffn_width

    hidden, g = ffn_width(dim), torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    block = {
        "attention.wq.weight": (dim, dim),
        "attention.wk.weight": (dim, dim),
        "attention.wv.weight": (dim, dim),
        "attention.wo.weight": (dim, dim),
        "feed_forward.w1.weight": (hidden, dim),
        "feed_forward.w2.weight": (dim, hidden),
        "feed_forward.w3.weight": (hidden, dim),
        "attention_norm.weight": (dim,),
        "ffn_norm.weight": (dim,),
    }
    sd = {"tok_embeddings.weight": w(vocab, dim)}
    for i in range(n_layers - heads + 1):
        sd |= {f"layers.{i}.{k}": w(*s) for k, s in block.items()}
    for j in range(heads - 1):
        sd |= {f"extra_heads.{j}.{k}": w(*s) for k, s in block.items()}
    sd |= {"norm.weight": w(dim), "output.weight": w(vocab, dim)}
    params = {"dim": dim, "n_layers": n_layers, "n_heads": dim // 128, "vocab_size": vocab}
    params |= {
        "multiple_of": 256,
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "n_future_tokens": heads,
    }
    io_stream.write_bytes(json.dumps(params).encode(), io_stream.join(uri, "params.json"))
    with io_stream.open_stream(io_stream.join(uri, "consolidated.00.pth"), "wb") as f:
        torch.save(sd, f)
    return sum(t.numel() * t.element_size() for t in sd.values())


def child(what: str, uri: str) -> None:
    """Run one measurement in this process and print it as JSON."""
    import psutil
    import torch
    from accelerate import init_empty_weights

    import io_stream
    from wmtp_model import MTPModel, load_model, meta_names, permute_rotary

    fs = io_stream.s3_filesystem()
    fs.ls(uri, refresh=True)  # open the connection pool first: every method starts warm
    start = psutil.Process().memory_info().rss
    extra = {}
    if what == "kit":
        t0 = time.perf_counter()
        model = load_model(uri)
        seconds = time.perf_counter() - t0
    elif what == "cat_file":
        t0 = time.perf_counter()
        data = fs.cat_file(io_stream.join(uri, "consolidated.00.pth"))
        seconds = time.perf_counter() - t0
        extra["bytes"] = len(data)
    elif what == "old":
        # the old way: build the model first (not timed), then download, torch.load, load_state_dict
        params = json.loads(io_stream.read_bytes(io_stream.join(uri, "params.json")))
        probe = load_model_config(params)
        torch.set_default_dtype(torch.bfloat16)
        with init_empty_weights():
            model = MTPModel(probe, params["n_future_tokens"])
        model.to_empty(device="cpu")
        torch.set_default_dtype(torch.float32)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            fs.get(uri + "/", tmp + "/", recursive=True)
            extra["download_s"] = time.perf_counter() - t0
            sd = torch.load(
                os.path.join(tmp, "consolidated.00.pth"), map_location="cpu", weights_only=True
            )
            H, n_trunk = params["n_future_tokens"], params["n_layers"] - params["n_future_tokens"]
            names, n_attn = meta_names(n_trunk, H), params["n_heads"]
            converted = {}
            for key, t in sd.items():
                if key.endswith(("wq.weight", "wk.weight")):
                    t = permute_rotary(t, n_attn)
                converted[names[key]] = t
            model.load_state_dict(converted, strict=True)
            seconds = time.perf_counter() - t0
        del sd, converted
    else:
        raise ValueError(what)
    if what != "cat_file":
        extra["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss(), "start_rss": start, **extra}))


def load_model_config(params: dict):
    """The LlamaConfig the loader derives from params.json (for building the old way's model)."""
    from wmtp_model import ffn_width, llama_config

    H = params["n_future_tokens"]
    return llama_config(
        vocab_size=params["vocab_size"],
        dim=params["dim"],
        n_blocks=params["n_layers"] - H + 1,
        n_attn_heads=params["n_heads"],
        n_kv_heads=None,
        ffn_dim=ffn_width(params["dim"], params["multiple_of"]),
        max_seq_len=4096,
        rope_theta=params["rope_theta"],
        norm_eps=params["norm_eps"],
    )


def measure(what: str, env: dict, argv: tuple[str, ...] = ()) -> dict:
    """One measurement in a fresh subprocess (ru_maxrss survives fork, so the parent stays small)."""
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--child", what],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument(
        "--n-layers", type=int, default=8, help="trunk + head blocks, Meta's convention"
    )
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "write":
        size = write_model(
            URI, dim=args.dim, n_layers=args.n_layers, heads=args.heads, vocab=args.vocab
        )
        return print(json.dumps({"bytes": size}))
    if args.child:
        return child(args.child, URI)

    from s3rver import S3RVER_ENV, start_s3rver

    os.makedirs(os.path.join(HERE, "_work"), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(HERE, "_work")) as data:
        endpoint, stop = start_s3rver(data, buckets=(BUCKET,))
        try:
            env = {**os.environ, **S3RVER_ENV, "AWS_ENDPOINT_URL": endpoint}
            shape = (
                "--dim",
                str(args.dim),
                "--n-layers",
                str(args.n_layers),
                "--heads",
                str(args.heads),
            )
            size = measure("write", env, (*shape, "--vocab", str(args.vocab)))["bytes"]
            print(
                f"Meta-native model: dim {args.dim}, n_layers {args.n_layers}, H {args.heads}, "
                f"vocab {args.vocab}, bf16, {size / 2**30:.3f} GiB of weights, on s3rver"
            )
            runs: dict[str, list[dict]] = {}
            for _ in range(args.repeat):  # interleaved, so machine noise hits every method alike
                for what in ("kit", "old", "cat_file"):
                    runs.setdefault(what, []).append(measure(what, env))
        finally:
            stop()
    print(
        f"{'method':<10}{'time s':>8}{'peak RSS GiB':>14}{'RSS growth GiB':>16}{'growth/weights':>16}"
    )
    summary = {}
    for what, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        peak = max(r["peak_rss"] for r in rs)
        growth = max(r["peak_rss"] - r["start_rss"] for r in rs)
        summary[what] = (seconds, peak, growth)
        print(
            f"{what:<10}{seconds:>8.2f}{peak / 2**30:>14.2f}{growth / 2**30:>16.2f}{growth / size:>16.2f}"
        )
    (kt, kp, kg), (ot, op, og), (rt, _, _) = summary["kit"], summary["old"], summary["cat_file"]
    print(f"time:       kit / old way = {kt / ot:.2f}x   (kit / raw cat_file = {kt / rt:.2f}x)")
    print(
        f"peak RSS:   kit / old way = {kp / op:.2f}x   RSS growth: kit / old way = {kg / og:.2f}x"
    )
    print(
        f"RSS growth / weight bytes: kit {kg / size:.2f}x, old way {og / size:.2f}x (goal: kit <= 1.3x)"
    )


if __name__ == "__main__":
    main()
