"""Compare algorithms: held-out CE and pass@k with intervals, and paired tests against a baseline.

python compare_mtp.py RUN [RUN ...] [--experiment NAME] [--baseline ALGO|RUN] [--out DIR]
    [--config config.yaml] [--set key=value ...]

RUN is a stage-2 training run id (its latest evaluation is used) or an eval_mtp.py run id;
--experiment adds every stage-2 run of that experiment. Runs are grouped by their `algo` and
`seed` tags. Per algorithm: the final heldout/ce and heldout/ce_head{k} (mean and 95% t-interval
over seeds) and pass@k per dataset with its interval. Against the baseline, on the same problems:
pass@1 as a paired table (both / only A / only B / neither) with McNemar's exact p, pass@k with
n > 1 as a paired bootstrap of the difference, held-out CE as a difference with its interval over
seeds. The report goes to stdout (markdown), to DIR (report.md, heldout_ce.png, pass_at_k.png)
and to a new MLflow run `compare-<UTC time>`. Evaluations of other problems, k, n or temperature
than the baseline's are refused.
"""

from __future__ import annotations

import argparse

from wmtp_cli import run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (argparse exits with code 2 on misuse)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", metavar="RUN", help="training or eval run ids")
    p.add_argument("--experiment", help="every stage-2 run of this MLflow experiment")
    p.add_argument(
        "--baseline", default="baseline", help="the algorithm (or a run) compared against"
    )
    p.add_argument(
        "--out", help="folder for report.md and the figures (default runs/compare-<time>)"
    )
    p.add_argument("--config", default="config.yaml", help="config file (MLflow settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if not args.runs and not args.experiment:
        p.error("name runs, or --experiment")
    return args


if __name__ == "__main__":  # --help and a bad flag answer before mlflow & co. are imported
    parse_args(None)

import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

import io_stream  # noqa: E402
from wmtp import Config, ConfigError  # noqa: E402
from wmtp_runs import figure_class, mlflow_connect, mlflow_start  # noqa: E402
from wmtp_stats import (  # noqa: E402
    mcnemar_exact,
    paired_bootstrap,
    paired_table,
    pass_at_k_interval,
    pass_at_k_per_problem,
    t_interval,
    welch_interval,
)
from wmtp_train import setup  # noqa: E402

SAME = ("n", "k", "temperature")  # eval settings a comparison needs equal (and the problems)

# ---------------------------------------------------------------------------------------------
# What was run


class Entry(NamedTuple):
    """One trained model: its training run's algo, seed and held-out CE history, and its
    evaluation's results.json (None when it has none)."""

    algo: str
    seed: str
    train_id: str | None
    eval_id: str | None
    heldout: dict[str, list[tuple[int, float]]]  # metric -> [(step, value)]
    results: dict | None


def collect(run_ids: list[str], experiment: str | None) -> list[Entry]:
    """The entries for the named runs and the experiment's stage-2 runs, one per (algo, seed):
    the newest wins."""
    client = mlflow.MlflowClient()
    runs = [get_run(client, r) for r in run_ids]
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ConfigError(f"--experiment {experiment}: no such MLflow experiment")
        runs += client.search_runs([exp.experiment_id], "tags.stage = 'mtp'")
    entries: dict[tuple[str, str], tuple[int, Entry]] = {}
    for run in runs:
        entry = entry_of(client, run)
        started = run.info.start_time or 0
        if entry is not None and started >= entries.get((entry.algo, entry.seed), (-1,))[0]:
            entries[(entry.algo, entry.seed)] = (started, entry)
    if not entries:
        raise ConfigError("no stage-2 training or evaluation runs to compare")
    return [e for _, e in sorted(entries.values(), key=lambda x: (x[1].algo, x[1].seed))]


def get_run(client, run_id: str):
    """The MLflow run, or a one-line error naming the id."""
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"{run_id}: no such MLflow run") from None


def entry_of(client, run) -> Entry | None:
    """A training run with its latest evaluation, or an eval run with the training run it is a
    child of; None for a run of another kind."""
    tags = run.data.tags
    if tags.get("stage") == "eval":
        eval_run, train_id = run, tags.get("mlflow.parentRunId")
        train_run = get_run(client, train_id) if train_id else None
    elif tags.get("stage") == "mtp":
        train_run, train_id = run, run.info.run_id
        eval_id = tags.get("latest_eval")
        eval_run = get_run(client, eval_id) if eval_id else None
    else:
        return None
    source = train_run or eval_run
    algo = source.data.tags.get("algo", "?")
    seed = source.data.tags.get("seed", "?")
    heldout = {}
    if train_run is not None:
        for name in sorted(train_run.data.metrics):
            if name.startswith("heldout/"):
                history = client.get_metric_history(train_id, name)
                heldout[name] = sorted((m.step, m.value) for m in history)
    results = None
    if eval_run is not None:
        results = mlflow.artifacts.load_dict(f"runs:/{eval_run.info.run_id}/results.json")
    eval_id = eval_run.info.run_id if eval_run is not None else None
    return Entry(algo, seed, train_id, eval_id, heldout, results)


def check_same_problems(entries: list[Entry], baseline: list[Entry]) -> None:
    """Refuse, in one line, an evaluation whose problems, k, n or temperature differ from the
    baseline's."""
    ref = next((e for e in baseline if e.results is not None), None)
    if ref is None:
        return
    want = ref.results["settings"]
    for e in entries:
        if e.results is None:
            continue
        got = e.results["settings"]
        for key in SAME:
            if got[key] != want[key]:
                raise ConfigError(
                    f"{e.eval_id} ({e.algo}, seed {e.seed}): its eval used {key} {got[key]}, "
                    f"the baseline's {ref.eval_id} used {want[key]}"
                )
        if sorted(e.results["datasets"]) != sorted(ref.results["datasets"]):
            raise ConfigError(
                f"{e.eval_id} ({e.algo}, seed {e.seed}): its eval used datasets "
                f"{sorted(e.results['datasets'])}, the baseline's {sorted(ref.results['datasets'])}"
            )
        for name, r in e.results["datasets"].items():
            theirs = ref.results["datasets"][name]["per_problem"]
            if r["per_problem"].keys() != theirs.keys() or got["sha256"].get(name) != want[
                "sha256"
            ].get(name):
                raise ConfigError(
                    f"{e.eval_id} ({e.algo}, seed {e.seed}): its eval of {name} used other "
                    f"problems than the baseline's {ref.eval_id}"
                )


# ---------------------------------------------------------------------------------------------
# The numbers


def final(entry: Entry, metric: str) -> float:
    """The last logged value of a held-out metric (nan when the run has none)."""
    points = entry.heldout.get(metric)
    return points[-1][1] if points else math.nan


def fmt(mean: float, lo: float, hi: float) -> str:
    """`0.2500 [0.1500, 0.3900]`, or the value alone when there is no interval."""
    if math.isnan(mean):
        return "n/a"
    if math.isnan(lo):
        return f"{mean:.4f} (one seed: no interval)"
    return f"{mean:.4f} [{lo:.4f}, {hi:.4f}]"


def per_algorithm(groups: dict[str, list[Entry]]) -> list[str]:
    """Markdown: each algorithm's held-out CE and pass@k, with 95% intervals."""
    heads = sorted({m for es in groups.values() for e in es for m in e.heldout if "ce_head" in m})
    evals = [e.results for es in groups.values() for e in es if e.results]
    datasets = sorted(evals[0]["datasets"]) if evals else []
    ks = evals[0]["settings"]["k"] if evals else []
    cols = ["heldout/ce", *heads] + [f"pass@{k} {d}" for d in datasets for k in ks]
    lines = ["| algorithm | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for algo, es in groups.items():
        cells = [fmt(*t_interval([final(e, m) for e in es])) for m in ["heldout/ce", *heads]]
        for d in datasets:
            for k in ks:
                # every (problem, seed) as one trial: Wilson for one sample each, else bootstrap
                counts = [
                    c
                    for e in es
                    if e.results
                    for c in e.results["datasets"][d]["per_problem"].values()
                ]
                if not counts:
                    cells.append("n/a")
                    continue
                mean = float(np.mean(pass_at_k_per_problem(counts, k)))
                cells.append(fmt(mean, *pass_at_k_interval(counts, k)))
        lines.append(f"| {algo} | {len(es)} | " + " | ".join(cells) + " |")
    return lines


def pairs(a: list[Entry], b: list[Entry]) -> list[tuple[Entry, Entry]]:
    """Evaluated entries of two algorithms paired by seed (by order where the seeds differ)."""
    a = [e for e in a if e.results]
    b = [e for e in b if e.results]
    by_seed = {e.seed: e for e in b}
    if all(e.seed in by_seed for e in a):
        return [(e, by_seed[e.seed]) for e in a]
    return list(zip(a, b))


def against_baseline(groups: dict[str, list[Entry]], base: str) -> tuple[list[str], dict]:
    """Markdown and numbers: each algorithm against the baseline on the same problems."""
    lines, numbers = [], {}
    for algo, es in groups.items():
        if algo == base:
            continue
        lines.append(f"\n### {algo} vs {base}\n")
        diff, lo, hi = welch_interval(
            [final(e, "heldout/ce") for e in es], [final(e, "heldout/ce") for e in groups[base]]
        )
        lines.append(f"- heldout/ce difference ({algo} − {base}): {fmt(diff, lo, hi)}")
        numbers[algo] = {"heldout_ce_diff": [diff, lo, hi]}
        matched = pairs(es, groups[base])
        if not matched:
            lines.append("- pass@k: no evaluated pair of runs")
            continue
        settings = matched[0][0].results["settings"]
        for d in sorted(matched[0][0].results["datasets"]):
            if settings["n"] == 1:
                table = {"both": 0, "only_a": 0, "only_b": 0, "neither": 0}
                for a, b in matched:  # one pair per problem and seed
                    pa, pb = (x.results["datasets"][d]["per_problem"] for x in (a, b))
                    part = paired_table(
                        {t: c > 0 for t, (_, c) in pa.items()},
                        {t: c > 0 for t, (_, c) in pb.items()},
                    )
                    table = {key: table[key] + part[key] for key in table}
                p = mcnemar_exact(table["only_a"], table["only_b"])
                lines += [
                    f"- {d}, pass@1 on the same problems ({len(matched)} seed pair(s)):",
                    "",
                    f"  | | {base} passes | {base} fails |",
                    "  |---|---|---|",
                    f"  | **{algo} passes** | {table['both']} | {table['only_a']} |",
                    f"  | **{algo} fails** | {table['only_b']} | {table['neither']} |",
                    "",
                    f"  McNemar's exact two-sided p = {p:.4g}",
                ]
                numbers[algo][d] = {"pass@1_table": table, "mcnemar_p": p}
            for k in settings["k"] if settings["n"] > 1 else []:
                xs, ys = [], []
                for a, b in matched:
                    pa, pb = (x.results["datasets"][d]["per_problem"] for x in (a, b))
                    tasks = sorted(pa)
                    xs.append(pass_at_k_per_problem([pa[t] for t in tasks], k))
                    ys.append(pass_at_k_per_problem([pb[t] for t in tasks], k))
                diff, lo, hi = paired_bootstrap(np.mean(xs, axis=0), np.mean(ys, axis=0))
                lines.append(f"- {d}, pass@{k} difference (paired bootstrap): {fmt(diff, lo, hi)}")
                numbers[algo][d] = numbers[algo].get(d, {}) | {f"pass@{k}_diff": [diff, lo, hi]}
    return lines, numbers


# ---------------------------------------------------------------------------------------------
# Figures


def figures(groups: dict[str, list[Entry]], out: str) -> list[str]:
    """heldout_ce.png (per head and their mean against step, one line per algorithm, the band
    between its seeds' lowest and highest) and pass_at_k.png (bars with intervals); their paths."""
    Figure = figure_class()
    metrics = sorted({m for es in groups.values() for e in es for m in e.heldout})
    written = []
    if metrics:
        fig = Figure(figsize=(4 * len(metrics), 3.2), layout="constrained")
        for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
            for algo, es in groups.items():
                curves = [dict(e.heldout.get(metric, [])) for e in es]
                steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
                if not steps:
                    continue
                values = np.array([[c[s] for s in steps] for c in curves])
                ax.plot(steps, values.mean(0), label=algo)
                if len(curves) > 1:
                    ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
            ax.set(title=metric, xlabel="optimizer step", ylabel="cross-entropy")
            ax.legend(fontsize="small")
        written.append(io_stream.join(out, "heldout_ce.png"))
        fig.savefig(written[-1])
    bars = [
        (algo, d, k, e.results["datasets"][d])
        for algo, es in groups.items()
        for e in es[:1]
        if e.results
        for d in sorted(e.results["datasets"])
        for k in e.results["settings"]["k"]
    ]
    if bars:
        fig = Figure(figsize=(max(4, 0.8 * len(bars)), 3.2), layout="constrained")
        ax = fig.subplots()
        for i, (_, _, k, r) in enumerate(bars):
            value, (lo, hi) = r["pass@k"][str(k)], r["interval"][str(k)]
            err = [[max(0.0, value - lo)], [max(0.0, hi - value)]]  # float noise at 0 or 1
            ax.bar(i, value, yerr=err, capsize=4)
        ax.set_xticks(range(len(bars)), [f"{a}\n{d} pass@{k}" for a, d, k, _ in bars], fontsize=7)
        ax.set(ylabel="pass@k (95% interval; first seed)", ylim=(0, 1))
        written.append(io_stream.join(out, "pass_at_k.png"))
        fig.savefig(written[-1])
    return written


# ---------------------------------------------------------------------------------------------
# The report


def report(cfg: Config, entries: list[Entry], baseline: str, out: str) -> tuple[str, dict]:
    """Write report.md and the figures to `out`; returns the markdown and the numbers."""
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.algo, []).append(e)
    if baseline not in groups:
        raise ConfigError(f"--baseline {baseline}: no runs of it among {sorted(groups)}")
    for es in groups.values():
        check_same_problems(es, groups[baseline])
    vs, numbers = against_baseline(groups, baseline)
    lines = [
        "# Comparison of algorithms",
        "",
        f"Baseline: {baseline}. Intervals are 95%. Held-out CE: Student's t over seeds (none for one",
        "seed). pass@k: over every problem of every seed (Wilson with one sample per problem, else a",
        "bootstrap over problems).",
        "heldout/ce is plain per-head cross-entropy on a split no algorithm trained or was evaluated on.",
        "",
        *per_algorithm(groups),
        "",
        "## Against the baseline, on the same problems",
        *vs,
        "",
        "Runs: "
        + ", ".join(
            f"{e.algo}/seed {e.seed}: {e.train_id or '-'} (eval {e.eval_id or '-'})"
            for e in entries
        ),
    ]
    text = "\n".join(lines) + "\n"
    io_stream.write_bytes(text.encode(), io_stream.join(out, "report.md"))
    files = figures(groups, out)
    return text, {"numbers": numbers, "files": [io_stream.join(out, "report.md"), *files]}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = parse_args(argv)
    cfg = setup(args)
    mlflow_connect(cfg)
    entries = collect(args.runs, args.experiment)
    baseline = args.baseline
    if baseline not in {e.algo for e in entries}:  # a run id: its algorithm
        named = [e for e in entries if baseline in (e.train_id, e.eval_id)]
        baseline = named[0].algo if named else baseline
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    root = os.path.dirname(cfg.paths.checkpoints.rstrip("/")) or "."
    out = args.out or io_stream.join(root, f"compare-{stamp}")
    text, result = report(cfg, entries, baseline, out)
    print(text)
    mlflow_start(cfg, f"compare-{stamp}")
    mlflow.set_tags({"stage": "compare", "baseline": baseline})
    mlflow.log_params(
        {"runs": ",".join(e.train_id or e.eval_id for e in entries)[:6000], "baseline": baseline}
    )
    for file in result["files"]:
        if io_stream.resolve(file)[0] == "local":
            mlflow.log_artifact(file)
    mlflow.log_dict(result["numbers"], "comparison.json")
    mlflow.end_run()


if __name__ == "__main__":
    run_cli(main)
