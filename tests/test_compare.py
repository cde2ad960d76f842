"""compare_mtp.py: the report from real tiny runs (paired table equal to one computed from the
samples), the numbers on hand-made evaluations, and refusing evaluations that do not pair."""

import json
import os

import mlflow
import pytest
from helpers import TINY_MODEL

import compare_mtp
import eval_mtp
import io_stream
import train_mtp
from wmtp import ConfigError, load_config
from wmtp_stats import mcnemar_exact, wilson_interval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")
TINY = [
    *TINY_MODEL,
    "model.n_layers=3",
    "model.n_heads=2",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.heldout_every=1",
    "eval.max_new_tokens=8",
    "eval.limit=3",
    "mlflow.mtp_model=cmp_model",
]

pytestmark = pytest.mark.usefixtures("clean_mlflow")


def overrides(tmp_path, *extra: str) -> list[str]:
    """Outputs and MLflow under tmp_path; the shipped datasets."""
    return [
        *TINY,
        f"paths.checkpoints={tmp_path / 'ckpt'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"mlflow.artifact_location={tmp_path / 'mlartifacts'}",
        *extra,
    ]


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def passed_by_problem(out: str, dataset: str) -> dict[str, bool]:
    """task id -> passed, from an evaluation's samples.jsonl (one sample per problem)."""
    rows = [json.loads(line) for line in io_stream.read_bytes(f"{out}/samples.jsonl").splitlines()]
    return {r["task_id"]: r["passed"] for r in rows if r["dataset"] == dataset}


def test_report_from_two_tiny_runs_and_refusal_of_other_problems(tmp_path, capsys):
    runs = {}
    for algo in ("baseline", "rho1-weighted"):
        extra = [f"train.algo={algo}", f"train.run_name={algo}", "train.save_every=100"]
        runs[algo] = train_mtp.train(load_config(CONFIG, overrides(tmp_path, *extra)))
        model = io_stream.join(runs[algo]["run_dir"], "final")
        eval_mtp.main(["--config", CONFIG, "--model", model, *sets(overrides(tmp_path))])
    capsys.readouterr()
    out = tmp_path / "report"
    compare_mtp.main(
        ["--config", CONFIG, *(r["run_id"] for r in runs.values()), "--out", str(out)]
        + sets(overrides(tmp_path))
    )
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert printed.strip() == text.strip()
    assert (out / "heldout_ce.png").stat().st_size > 0 and (
        out / "pass_at_k.png"
    ).stat().st_size > 0
    client = mlflow.MlflowClient()
    evals = {
        a: client.get_run(client.get_run(r["run_id"]).data.tags["latest_eval"])
        for a, r in runs.items()
    }
    for dataset in ("humaneval", "mbpp"):
        a = passed_by_problem(evals["rho1-weighted"].data.tags["eval_out"], dataset)
        b = passed_by_problem(evals["baseline"].data.tags["eval_out"], dataset)
        assert len(a) == 3 and a.keys() == b.keys()
        both = sum(a[t] and b[t] for t in a)
        only_a = sum(a[t] and not b[t] for t in a)
        only_b = sum(b[t] and not a[t] for t in a)
        neither = sum(not a[t] and not b[t] for t in a)
        assert f"| **rho1-weighted passes** | {both} | {only_a} |" in text
        assert f"| **rho1-weighted fails** | {only_b} | {neither} |" in text
        assert f"p = {mcnemar_exact(only_a, only_b):.4g}" in text
    for algo, r in runs.items():  # the final held-out CE of each run, in its row
        ce = client.get_run(r["run_id"]).data.metrics["heldout/ce"]
        assert f"| {algo} | 1 | {ce:.4f} (one seed: no interval)" in text
    [cmp] = [
        r
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
        if r.data.tags.get("stage") == "compare"
    ]
    assert {"report.md", "heldout_ce.png", "pass_at_k.png", "comparison.json"} <= {
        a.path for a in client.list_artifacts(cmp.info.run_id)
    }

    # the baseline evaluated again on fewer problems: refused, naming the difference
    model = io_stream.join(runs["baseline"]["run_dir"], "final")
    eval_mtp.main(
        ["--config", CONFIG, "--model", model, "--limit", "2", *sets(overrides(tmp_path))]
    )
    with pytest.raises(ConfigError, match="other problems than the baseline's"):
        compare_mtp.main(
            ["--config", CONFIG, *(r["run_id"] for r in runs.values())] + sets(overrides(tmp_path))
        )
    eval_mtp.main(
        ["--config", CONFIG, "--model", model, "--n", "2", "--temperature", "0.8"]
        + sets(overrides(tmp_path))
    )
    with pytest.raises(ConfigError, match="its eval used n 1, the baseline's .* used 2"):
        compare_mtp.main(
            ["--config", CONFIG, *(r["run_id"] for r in runs.values())] + sets(overrides(tmp_path))
        )


def entry(algo: str, seed: str, passed: list[bool], ce: float, n: int = 1) -> compare_mtp.Entry:
    """A hand-made evaluated run: pass/fail per problem p0.. of one dataset, a final held-out CE."""
    per_problem = {f"p{i}": [n, int(ok) * n] for i, ok in enumerate(passed)}
    results = {
        "settings": {"n": n, "k": [1], "temperature": 0.0, "sha256": {"d": "x"}},
        "datasets": {
            "d": {
                "pass@k": {"1": sum(passed) / len(passed)},
                "interval": {"1": [0.0, 1.0]},
                "per_problem": per_problem,
            }
        },
    }
    heldout = {"heldout/ce": [(1, ce + 1), (2, ce)], "heldout/ce_head0": [(2, ce)]}
    return compare_mtp.Entry(algo, seed, f"t-{algo}-{seed}", f"e-{algo}-{seed}", heldout, results)


def test_paired_numbers_on_hand_made_evaluations(tmp_path):
    # 20 problems: A passes 8 that B fails, B passes 2 that A fails, both pass 5, neither 5
    a = [True] * 5 + [True] * 8 + [False] * 2 + [False] * 5
    b = [True] * 5 + [False] * 8 + [True] * 2 + [False] * 5
    entries = [
        entry("baseline", "1", b, 2.0),
        entry("baseline", "2", b, 2.2),
        entry("rho1-weighted", "1", a, 1.8),
        entry("rho1-weighted", "2", a, 1.9),
    ]
    cfg = load_config(CONFIG)
    text, result = compare_mtp.report(cfg, entries, "baseline", str(tmp_path))
    numbers = result["numbers"]["rho1-weighted"]
    # two seed pairs pooled: each problem counts once per seed
    assert numbers["d"]["pass@1_table"] == {"both": 10, "only_a": 16, "only_b": 4, "neither": 10}
    assert numbers["d"]["mcnemar_p"] == pytest.approx(mcnemar_exact(16, 4))
    diff, lo, hi = numbers["heldout_ce_diff"]
    assert diff == pytest.approx(1.85 - 2.1) and lo < diff < hi
    assert "| rho1-weighted | 2 | 1.8500 [" in text
    lo, hi = wilson_interval(26, 40)  # pass@1 pools every problem of both seeds: 13 of 20 each
    assert f"| 0.6500 [{lo:.4f}, {hi:.4f}] |" in text
    with pytest.raises(ConfigError, match="its eval used temperature 0.7"):
        other = entry("critic", "1", a, 1.0)
        other.results["settings"]["temperature"] = 0.7
        compare_mtp.report(cfg, [*entries, other], "baseline", str(tmp_path))
