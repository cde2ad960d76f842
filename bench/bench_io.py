"""I/O benchmark for io_stream against the usual alternatives, over a real S3 API (s3rver).

    python bench/bench_io.py                      # full: 1 GiB safetensors, JSONL 100 MiB + 1 GiB
    python bench/bench_io.py --st-mib 64 --jsonl-mib 16 64   # quick

Each figure runs in its own subprocess; peak RSS is resource.getrusage(RUSAGE_SELF).ru_maxrss,
reported as the growth over the process's resident size just before the measured step (imports,
and for writes the tensors, already in place), so the ~300 MiB of `import torch` does not
hide what the I/O itself costs.
"""

from __future__ import annotations

import argparse
import json
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

    fs = io_stream.s3_filesystem()
    fs.ls(BUCKET)  # open the connection pool before the clock starts
    tensors = make_tensors(int(os.environ["BENCH_WRITE_MIB"])) if step.startswith("write") else None
    base = reset_peak()  # import-time spikes must not count against the step
    t0 = time.perf_counter()
    count = 0
    if step == "load-kit":
        count = sum(t.numel() * t.element_size() for t in io_stream.read_safetensors(uri).values())
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
    return {"s": seconds, "rss_mib": peak_mib() - base, "base_mib": base, "count": count}


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


def run_steps(steps: list[str], uri: str, work: str, env: dict, repeat: int) -> dict[str, dict]:
    """Run the steps round-robin `repeat` times (so noise hits all alike); fastest time, worst RSS."""
    runs: dict[str, list[dict]] = {s: [] for s in steps}
    for _ in range(repeat):
        for s in steps:
            runs[s].append(run_once(s, uri, work, env))
    return {
        s: {**min(r, key=lambda x: x["s"]), "rss_mib": max(x["rss_mib"] for x in r)}
        for s, r in runs.items()
    }


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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--st-mib", type=int, default=1024, help="safetensors size for load/save (MiB)")
    ap.add_argument(
        "--jsonl-mib", type=int, nargs="+", default=[100, 1024], help="JSONL sizes (MiB)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per figure (fastest time kept)")
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
