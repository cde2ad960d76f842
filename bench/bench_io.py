"""I/O benchmark for io_stream against the usual alternatives, over a real S3 API (s3rver).

    python bench/bench_io.py                      # full: 1 GiB safetensors, JSONL 100 MiB + 1 GiB
    python bench/bench_io.py --st-mib 64 --jsonl-mib 16 64   # quick
    python bench/bench_io.py --latency-ms 30 --mbps-per-conn 80   # S3 at cloud latency, below

At cloud latency (--latency-ms / --mbps-per-conn), s3rver sits behind bench/shaping_proxy.py
(first byte of every request `latency` ms after it was sent, each connection capped at that many
MB/s) and a `--size-mib` safetensors file is loaded three ways, each in its own process: the
kit's read_safetensors (once per `--concurrency` x `--block-mib` setting), runai-model-streamer's
S3 path (pip-installed into bench/_work/runai on first use, a benchmark-only install) and
fs.get + load_file.

Each figure runs in its own subprocess; peak RSS is resource.getrusage(RUSAGE_SELF).ru_maxrss,
reported as the growth over the process's resident size just before the measured step (imports,
and for writes the tensors, already in place), so the ~300 MiB of `import torch` does not
hide what the I/O itself costs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

BUCKET = "bench"
MiB = 2**20
RUNAI = os.path.join(HERE, "_work", "runai")
RUNAI_VERSION = "0.17.1"
META_7B_1T_4 = 13.5e9  # bytes of Meta's 7B_1T_4 in bf16


def peak_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> float:
    """Restart ru_maxrss from the current RSS (Linux clear_refs "5"); return that RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_mib()


# ---------------------------------------------------------------------------------------------
# measured steps: each runs in a fresh subprocess and prints one JSON line


def make_tensors(total_mib: int) -> dict:
    """Float32 tensors of 128 MiB (or less) adding up to total_mib."""
    import torch

    g = torch.Generator().manual_seed(0)
    out, left, i = {}, total_mib * MiB, 0
    while left > 0:
        n = min(left, 128 * MiB)
        out[f"layers.{i}.weight"] = torch.randn(n // 4, generator=g)
        left -= n
        i += 1
    return out


def measure(step: str, uri: str, work: str) -> dict:
    """Run one benchmark step and return its seconds, RSS growth and count."""
    import safetensors.torch

    import io_stream

    c, b = (
        int(os.environ.get(k) or 0) or None for k in ("BENCH_MAX_CONCURRENCY", "BENCH_BLOCK_SIZE")
    )
    io_stream.configure_s3(max_concurrency=c, block_size=b)  # None: the kit's defaults
    fs = io_stream.s3_filesystem()
    fs.ls(BUCKET)  # open the connection pool before the clock starts
    tensors = make_tensors(int(os.environ["BENCH_WRITE_MIB"])) if step.startswith("write") else None
    base = reset_peak()  # import-time spikes must not count against the step
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    count = 0
    if step == "load-kit":
        count = sum(t.numel() * t.element_size() for t in io_stream.read_safetensors(uri).values())
        setting = [c or io_stream.MAX_IN_FLIGHT, b or io_stream.BLOCK_SIZE]
    elif step == "load-get-file":  # (a) the old cache way: download, then load the local file
        local = os.path.join(work, "download.safetensors")
        fs.get(uri, local)
        loaded = safetensors.torch.load_file(local)
        count = sum(t.numel() * t.element_size() for t in loaded.values())
        os.unlink(local)
    elif step == "load-bytesio":  # (b) whole object into memory, then parse it
        import boto3

        data = boto3.client("s3").get_object(Bucket=BUCKET, Key=uri.split("/", 3)[3])["Body"].read()
        loaded = safetensors.torch.load(data)
        count = sum(t.numel() * t.element_size() for t in loaded.values())
    elif step == "load-runai":  # Run:ai Model Streamer's own S3 client (C++), tensors owned
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_file(uri)
            loaded = dict(streamer.get_tensors())
        count = sum(t.numel() * t.element_size() for t in loaded.values())
    elif step == "load-cat":  # (c) the ceiling: fetch the bytes, build nothing
        count = len(fs.cat_file(uri))
    elif step == "jsonl-kit":
        count = sum(1 for _ in io_stream.iter_records(uri))
    elif step == "jsonl-bytes":  # reading the bytes only, block by block, nothing decoded
        with fs.open(uri, "rb", block_size=8 * MiB, cache_type="none") as f:
            while block := f.read(8 * MiB):
                count += len(block)
    elif step == "write-kit":
        io_stream.write_safetensors(tensors, uri)
        count = io_stream.PART_SIZE  # for the memory goal
    elif step == "write-file-put":  # save locally, then upload the file
        local = os.path.join(work, "upload.safetensors")
        safetensors.torch.save_file(tensors, local)
        fs.put(local, uri)
        os.unlink(local)
    else:
        raise SystemExit(f"unknown step {step!r}")
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0  # all of this process's threads
    out = {"s": seconds, "cpu_s": cpu, "rss_mib": peak_mib() - base, "base_mib": base}
    return {**out, "count": count, **({"setting": setting} if step == "load-kit" else {})}


def run_once(step: str, uri: str, work: str, env: dict) -> dict:
    """Run one step in a fresh process and return its figures."""
    out = subprocess.run(
        [sys.executable, __file__, "--measure", step, "--uri", uri, "--work", work],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_variants(
    variants: dict[str, tuple[str, dict]],
    uri: str,
    work: str,
    repeat: int,
    proxy: dict | None = None,
) -> dict:
    """Run {name: (step, env)} round-robin `repeat` times (so noise hits all alike); fastest time,
    every time, worst RSS and (with the shaping proxy's counters) most connections of each. With
    the proxy, a failed run is counted and reported instead of ending the benchmark."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    failed = dict.fromkeys(variants, 0)
    for _ in range(repeat):
        for name, (step, env) in variants.items():
            before = proxy["connections"] if proxy else 0
            try:
                r = run_once(step, uri, work, env)
            except SystemExit as exc:
                if proxy is None:
                    raise
                failed[name] += 1
                print(f"{name}: a run failed: {str(exc).strip().splitlines()[-1]}", flush=True)
                continue
            runs[name].append({**r, "conns": proxy["connections"] - before if proxy else 0})
    return {
        name: {
            **min(r, key=lambda x: x["s"]),
            "times": [x["s"] for x in r],
            "rss_mib": max(x["rss_mib"] for x in r),
            "conns": max(x["conns"] for x in r),
            "failed": failed[name],
        }
        if r
        else {"failed": failed[name]}
        for name, r in runs.items()
    }


def run_steps(steps: list[str], uri: str, work: str, env: dict, repeat: int) -> dict[str, dict]:
    """Run the steps round-robin with one environment (see run_variants)."""
    return run_variants({s: (s, env) for s in steps}, uri, work, repeat)


# ---------------------------------------------------------------------------------------------
# inputs


def write_safetensors_file(path: str, total_mib: int) -> None:
    """A safetensors file of total_mib float32 data, written by the safetensors library."""
    import safetensors.torch

    safetensors.torch.save_file(make_tensors(total_mib), path)


def write_jsonl_file(path: str, total_mib: int) -> int:
    """MBPP-shaped records (~600 bytes each) up to total_mib; returns the record count."""
    n, size = 0, 0
    with open(path, "w") as f:
        while size < total_mib * MiB:
            line = json.dumps(
                {
                    "task_id": n,
                    "text": f"Write a function to find the {n}-th number in a sequence of squares.",
                    "code": f"def f(n):\n    return sum(i * i for i in range({n % 97}))\n" * 4,
                    "test_list": [
                        f"assert f({i}) == {sum(j * j for j in range(i))}" for i in range(5)
                    ],
                    "test_setup_code": "",
                    "challenge_test_list": [],
                }
            )
            f.write(line + "\n")
            size += len(line) + 1
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# report


def row(what: str, kit: float, other: float, unit: str) -> str:
    return f"| {what} | {kit:,.2f} {unit} | {other:,.2f} {unit} | {kit / other:.2f}x |"


def install_runai() -> str:
    """pip-install runai-model-streamer and its S3 backend into bench/_work/runai unless there (a
    benchmark-only install; torch, numpy and boto3 come from this environment); return the folder."""
    if not os.path.exists(
        os.path.join(RUNAI, "runai_model_streamer/libstreamer/lib/libstreamers3.so")
    ):
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", RUNAI]
        pkgs = [
            f"runai-model-streamer=={RUNAI_VERSION}",
            f"runai-model-streamer-s3=={RUNAI_VERSION}",
        ]
        subprocess.run([*pip, *pkgs, "humanize"], check=True)
    return RUNAI


def cloud_load(args, work: str, env: dict, client) -> None:
    """Load one safetensors file through the shaping proxy: kit settings, Run:ai, fs.get + load_file."""
    from shaping_proxy import start_proxy

    local = os.path.join(work, "cloud.safetensors")
    prepare = [sys.executable, __file__, "--measure", "prepare", "--uri", local]
    subprocess.run([*prepare, "--st-mib", str(args.size_mib)], check=True)
    client.upload_file(local, BUCKET, "cloud.safetensors")
    size = os.path.getsize(local) / MiB
    os.unlink(local)
    uri = f"s3://{BUCKET}/cloud.safetensors"
    run_once("load-kit", uri, work, env)  # unshaped: warms s3rver's page cache, not reported

    endpoint, stats, stop = start_proxy(
        env["AWS_ENDPOINT_URL"],
        latency_ms=args.latency_ms,
        mbps_per_conn=args.mbps_per_conn,
        max_conns=1024,  # Run:ai's S3 client (AWS CRT) opens many connections per worker
        lifetime_s=6 * 3600,
    )
    shaped = {**env, "AWS_ENDPOINT_URL": endpoint}
    variants = {}
    for c in args.concurrency or [None]:
        for b in args.block_mib or [None]:
            setting = {
                "BENCH_MAX_CONCURRENCY": str(c or ""),
                "BENCH_BLOCK_SIZE": str((b or 0) * MiB),
            }
            name = f"kit, max_concurrency {c or 'default'}, block {f'{b} MiB' if b else 'default'}"
            variants[name] = ("load-kit", {**shaped, **setting})
    runai_env = {
        **shaped,
        "PYTHONPATH": os.pathsep.join(p for p in (install_runai(), env.get("PYTHONPATH")) if p),
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for c in args.runai_concurrency or [None]:
        setting = {"RUNAI_STREAMER_CONCURRENCY": str(c)} if c else {}
        variants[f"runai, concurrency {c or 'default'}"] = ("load-runai", {**runai_env, **setting})
    if not args.no_get:
        variants["fs.get + load_file"] = ("load-get-file", shaped)
    try:
        print(f"shaping proxy at {endpoint}", flush=True)
        results = run_variants(variants, uri, work, args.repeat, stats)
    finally:
        stop()

    print(
        f"\n## load a {size:,.0f} MiB safetensors from S3: {args.latency_ms:g} ms to first byte, "
        f"{args.mbps_per_conn:g} MB/s per connection\n"
    )
    ok = {n: r for n, r in results.items() if "s" in r}
    runai_s = min((r["s"] for n, r in ok.items() if n.startswith("runai")), default=math.nan)
    print(
        "| method | time s (all runs) | MiB/s | RSS growth MiB | growth / file size | CPU s / GiB "
        "| connections | time / best Run:ai |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if name not in ok:
            print(f"| {name} | failed in all {r['failed']} runs | | | | | | |")
            continue
        times = ", ".join([f"{t:.2f}" for t in r["times"]] + ["failed"] * r["failed"])
        print(
            f"| {name} | {r['s']:.2f} ({times}) | {size / r['s']:,.0f} | {r['rss_mib']:,.0f} | "
            f"{r['rss_mib'] / size:.3f} | {r['cpu_s'] / size * 1024:.2f} | {r['conns']} | "
            f"{r['s'] / runai_s:.2f}x |"
        )
    same_concurrency(args, ok, size)
    kits = {n: r for n, r in ok.items() if n.startswith("kit")}
    best = min(kits, key=lambda n: kits[n]["s"])
    k = kits[best]
    print(
        f"\nbest kit setting: {best}: time {k['s'] / runai_s:.2f}x the best Run:ai (goal <= 1.0) at "
        f"RSS growth {k['rss_mib'] / size:.3f}x the file (goal <= 1.15)"
    )
    # projection for 7B_1T_4: what this machine moved, what the shaping alone allows (each of c
    # connections: latency + block / rate per GET), and the kit's CPU on its one event-loop thread
    here = size * MiB / k["s"]
    c, block = k["setting"]
    shaped = c * block / (args.latency_ms / 1e3 + block / (args.mbps_per_conn * 1e6 or math.inf))
    cpu = k["cpu_s"] / (size * MiB) * META_7B_1T_4
    print(
        f"projection, Meta 7B_1T_4 ({META_7B_1T_4 / 1e9:.1f} GB bf16), goal < 30 s without a cache: "
        f"{META_7B_1T_4 / here:.1f} s at this run's {here / 1e6:,.0f} MB/s; "
        f"{META_7B_1T_4 / shaped:.1f} s where only the shaping limits ({c} x "
        f"{block / MiB:g} MiB GETs: {shaped / 1e6:,.0f} MB/s); the kit's client CPU "
        f"{cpu:.1f} s (one event-loop thread)"
    )
    print(
        f"proxy: {stats['connections']} connections, {stats['requests']} requests, "
        f"{stats['refused']} connections refused (over its max_conns)"
    )


def same_concurrency(args, ok: dict, size: float) -> None:
    """The kit (default block) against Run:ai at each concurrency both were run at."""
    both = [c for c in args.concurrency or [] if c in (args.runai_concurrency or [])]
    if not both:
        return
    print("\n### kit vs Run:ai at the same concurrency (block: the kit's default)\n")
    print(
        "| concurrency | kit s | Run:ai s | kit / Run:ai time | RSS growth / file kit, Run:ai "
        "| CPU s / GiB kit, Run:ai | connections kit, Run:ai |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c in both:
        k = ok.get(f"kit, max_concurrency {c}, block default")
        r = ok.get(f"runai, concurrency {c}")
        if k is None or r is None:
            secs = ["failed" if x is None else f"{x['s']:.2f}" for x in (k, r)]
            print(f"| {c} | {secs[0]} | {secs[1]} | | | | |")
            continue
        print(
            f"| {c} | {k['s']:.2f} | {r['s']:.2f} | {k['s'] / r['s']:.2f}x "
            f"| {k['rss_mib'] / size:.3f}, {r['rss_mib'] / size:.3f} "
            f"| {k['cpu_s'] / size * 1024:.2f}, {r['cpu_s'] / size * 1024:.2f} "
            f"| {k['conns']}, {r['conns']} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--st-mib", type=int, default=1024, help="safetensors size for load/save (MiB)")
    ap.add_argument(
        "--jsonl-mib", type=int, nargs="+", default=[100, 1024], help="JSONL sizes (MiB)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per figure (fastest time kept)")
    ap.add_argument("--latency-ms", type=float, default=0, help="cloud mode: first-byte latency")
    ap.add_argument(
        "--mbps-per-conn", type=float, default=0, help="cloud mode: MB/s per connection"
    )
    ap.add_argument("--size-mib", type=int, default=2048, help="cloud mode: safetensors size (MiB)")
    ap.add_argument("--concurrency", type=int, nargs="+", help="cloud mode: kit s3.max_concurrency")
    ap.add_argument("--block-mib", type=int, nargs="+", help="cloud mode: kit s3.block_size (MiB)")
    ap.add_argument(
        "--runai-concurrency", type=int, nargs="+", help="cloud mode: RUNAI_STREAMER_CONCURRENCY"
    )
    ap.add_argument("--no-get", action="store_true", help="cloud mode: skip fs.get + load_file")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure == "prepare":
        write_safetensors_file(args.uri, args.st_mib)
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.uri, args.work)))
        return

    # the parent stays small (no torch): a child's ru_maxrss starts from its parent's peak
    import boto3
    from s3rver import S3RVER_ENV, start_s3rver

    os.makedirs(os.path.join(HERE, "_work"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-io-", dir=os.path.join(HERE, "_work"))
    endpoint, stop = start_s3rver(os.path.join(work, "s3"), buckets=(BUCKET,))
    env = {
        **os.environ,
        **S3RVER_ENV,
        "AWS_ENDPOINT_URL": endpoint,
        "BENCH_WRITE_MIB": str(args.st_mib),
    }
    env.pop("AWS_PROFILE", None)
    os.environ.update(env)
    client = boto3.client("s3")
    try:
        print(f"s3rver at {endpoint}; work dir {work}", flush=True)
        if args.latency_ms or args.mbps_per_conn:
            cloud_load(args, work, env, client)
            return
        st_local = os.path.join(work, "model.safetensors")
        prepare = [sys.executable, __file__, "--measure", "prepare", "--uri", st_local]
        subprocess.run([*prepare, "--st-mib", str(args.st_mib)], check=True)
        client.upload_file(st_local, BUCKET, "model.safetensors")
        st_size = os.path.getsize(st_local) / MiB
        os.unlink(st_local)
        st_uri = f"s3://{BUCKET}/model.safetensors"
        run_once("load-cat", st_uri, work, env)  # warm the server's page cache, not reported

        steps = ["load-kit", "load-get-file", "load-bytesio", "load-cat"]
        k, a, b, c = run_steps(steps, st_uri, work, env, args.repeat).values()
        print(f"\n## load a {st_size:,.0f} MiB safetensors from S3\n")
        print("| figure | kit (read_safetensors) | competitor | kit / competitor |")
        print("|---|---|---|---|")
        print(row("time vs (a) fs.get + load_file", k["s"], a["s"], "s") + " goal <= 1.0")
        print(
            row("throughput vs (c) fs.cat_file", st_size / k["s"], st_size / c["s"], "MiB/s")
            + " goal >= 0.8"
        )
        print(row("time vs (b) get_object().read() + load", k["s"], b["s"], "s"))
        print(row("RSS growth vs (a)", k["rss_mib"], a["rss_mib"], "MiB"))
        print(row("RSS growth vs (b)", k["rss_mib"], b["rss_mib"], "MiB"))
        print(
            f"\nRSS growth / file size: kit {k['rss_mib'] / st_size:.3f}x "
            f"(goal <= 1.15x + 64 MiB = {1.15 * st_size + 64:,.0f} MiB), "
            f"(a) {a['rss_mib'] / st_size:.3f}x, (b) {b['rss_mib'] / st_size:.3f}x, (c) {c['rss_mib'] / st_size:.3f}x; "
            f"process baseline before the step {k['base_mib']:,.0f} MiB"
        )

        print("\n## stream JSONL from S3\n")
        print(
            "| size | kit records/s | kit MiB/s | bytes-only MiB/s | kit / bytes-only time | kit RSS growth | bytes-only RSS growth |"
        )
        print("|---|---|---|---|---|---|---|")
        for mib in args.jsonl_mib:
            local = os.path.join(work, f"data-{mib}.jsonl")
            n = write_jsonl_file(local, mib)
            size = os.path.getsize(local) / MiB
            client.upload_file(local, BUCKET, f"data-{mib}.jsonl")
            os.unlink(local)
            uri = f"s3://{BUCKET}/data-{mib}.jsonl"
            run_once("jsonl-bytes", uri, work, env)  # warm-up, not reported
            jsonl = run_steps(["jsonl-kit", "jsonl-bytes"], uri, work, env, args.repeat)
            kj, bj = jsonl["jsonl-kit"], jsonl["jsonl-bytes"]
            assert kj["count"] == n, (kj["count"], n)
            print(
                f"| {size:,.0f} MiB ({n:,} records) | {n / kj['s']:,.0f} | {size / kj['s']:,.1f} | "
                f"{size / bj['s']:,.1f} | {kj['s'] / bj['s']:.2f}x | {kj['rss_mib']:,.1f} MiB | {bj['rss_mib']:,.1f} MiB |"
            )
            client.delete_object(Bucket=BUCKET, Key=f"data-{mib}.jsonl")
        print("\ngoal: kit RSS growth <= 200 MiB at every size")

        out_uri = f"s3://{BUCKET}/written.safetensors"
        write = run_steps(["write-kit", "write-file-put"], out_uri, work, env, args.repeat)
        wk, wp = write["write-kit"], write["write-file-put"]
        print(f"\n## save {args.st_mib:,} MiB of tensors to S3\n")
        print("| figure | kit (write_safetensors) | save_file + fs.put | kit / competitor |")
        print("|---|---|---|---|")
        print(row("time", wk["s"], wp["s"], "s") + " goal <= 1.1")
        print(row("RSS growth over the tensors", wk["rss_mib"], wp["rss_mib"], "MiB"))
        print(f"\ngoal: kit RSS growth <= 2 parts = {2 * wk['count'] / MiB:.0f} MiB")
    finally:
        stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
