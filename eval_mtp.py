"""Evaluate a trained model: pass@k with intervals on HumanEval and MBPP test, as an MLflow run of its own.

python eval_mtp.py [--model PATH|<run>/step_N|runs:/<run_id>/model|models:/<name>/<version>]
    [--samples samples.jsonl] [--data humaneval mbpp] [--n 1] [--k 1] [--temperature 0]
    [--limit N] [--workers W] [--speculative] [--run-id ID] [--out DIR] [--quiet]
    [--config config.yaml] [--set eval.key=value ...]

Each call is a new MLflow run `eval-<model run name>-<UTC time>`, a child of the training run that
made the model (which it never modifies but for the tag `latest_eval`). Its folder (--out, or
<run>/eval/<label>-<UTC time>) holds settings.json, samples.jsonl (one line per checked sample)
and results.json; run again with the same --out, an interrupted evaluation keeps its finished
samples and generates the rest. --samples re-scores saved completions without a model.
"""

from __future__ import annotations

import argparse
import json

from wmtp_cli import PRINT_CONFIG_HELP, print_config, run_cli

FLAGS = {  # CLI flag -> eval.<key> (the config's eval: section holds the defaults)
    "data": "datasets",
    "n": "n",
    "k": "k",
    "temperature": "temperature",
    "top_p": "top_p",
    "max_new_tokens": "max_new_tokens",
    "limit": "limit",
    "workers": "workers",
    "timeout": "timeout",
    "seed": "seed",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (argparse exits with code 2 on misuse)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config.yaml", help="config file, local or s3://")
    p.add_argument(
        "--model",
        help="model folder (local or s3://), a checkpoint <run>/step_N, runs:/ or models:/ URI "
        "(default: the newest <run>/final)",
    )
    p.add_argument("--samples", help="re-score this samples.jsonl (no model is loaded)")
    p.add_argument("--data", nargs="+", metavar="NAME", help="datasets from paths.datasets")
    p.add_argument("--n", type=int, help="samples per problem")
    p.add_argument("--k", type=int, nargs="+", help="pass@k for each k (k <= n)")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-p", dest="top_p", type=float, help="nucleus sampling")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--limit", type=int, help="first N problems of each dataset")
    p.add_argument("--workers", type=int, help="programs checked at a time")
    p.add_argument("--timeout", type=float, help="seconds per program")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--speculative",
        action="store_true",
        help="greedy decoding drafted by the MTP heads (same text, fewer forwards)",
    )
    p.add_argument("--run-id", dest="run_id", help="the training run this evaluation belongs to")
    p.add_argument("--out", help="the evaluation's folder (an interrupted one there continues)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no summary")
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    args = p.parse_args(argv)
    args.flags = {}  # config key -> the flag that set it, so that errors name the flag
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            args.set.append(f"eval.{key}={json.dumps(value)}")
            args.flags[f"eval.{key}"] = "--" + flag.replace("_", "-")
    if args.print_config:
        print_config(args)
    return args


if __name__ == "__main__":  # --help and a bad flag answer before torch & co. are imported
    parse_args(None)

import os  # noqa: E402
import secrets  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import mlflow  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import io_stream  # noqa: E402
from wmtp import CREDENTIALS_HINT, Config, ConfigError, redact  # noqa: E402
from wmtp_data import dataset_file  # noqa: E402
from wmtp_eval import evaluate, load_problems, score  # noqa: E402
from wmtp_model import MTP_JSON, detect_format, load_model, load_tokenizer  # noqa: E402
from wmtp_runs import (  # noqa: E402
    artifact_uri,
    log_inputs,
    mlflow_connect,
    mlflow_start,
    resolve_mlflow_uri,
)
from wmtp_sandbox import sandbox_mode  # noqa: E402
from wmtp_stats import pass_at_k, pass_at_k_interval  # noqa: E402
from wmtp_train import load_checkpoint_model, setup  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Which model, which training run


def check_arguments(args: argparse.Namespace) -> None:
    """Locations on the command line are checked as the config's are: no credentials inside
    (user:password@, a signed query, a key id), which would end up in tags, paths and messages."""
    for flag in ("model", "out", "samples"):
        value = getattr(args, flag)
        if value and redact(value) != value:
            raise ConfigError(
                f"--{flag}: credentials inside the value (user:password@, a signed query or a key "
                f"id); {CREDENTIALS_HINT}"
            )


def newest_final(root: str) -> str:
    """The most recently saved complete <run>/final/ under the checkpoints root."""
    found = []
    for run in io_stream.list_dir(root):
        marker = io_stream.join(root, run, "final", MTP_JSON)
        if io_stream.exists(marker):
            saved = json.loads(io_stream.read_bytes(marker)).get("saved_at", 0)
            found.append((saved, run, io_stream.join(root, run, "final")))
    if not found:
        raise ConfigError(
            f"no trained model under {root} (no <run>/final/{MTP_JSON}): run "
            "`python train_mtp.py` first or pass --model"
        )
    return max(found)[2]


def run_of(model: str, path: str) -> str | None:
    """The MLflow run that produced the model: from a runs:/ or models:/ URI, the training run's
    `final_model` tag, or the manifest of a checkpoint in or beside the folder; None if unknown."""
    if model.startswith("runs:/"):
        return model[len("runs:/") :].split("/")[0]
    if model.startswith("models:/"):
        name, _, version = model[len("models:/") :].partition("/")
        return mlflow.MlflowClient().get_model_version(name, version).run_id
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.final_model = '{path}'",
        output_format="list",
    )
    if runs:
        return runs[0].info.run_id
    manifest = io_stream.join(path, io_stream.MANIFEST)
    if not io_stream.exists(manifest):
        ckpt = io_stream.latest_ckpt(path.rsplit("/", 1)[0])
        if ckpt is None:
            return None
        manifest = io_stream.join(ckpt, io_stream.MANIFEST)
    return json.loads(io_stream.read_bytes(manifest))["state"].get("mlflow_run_id")


def existing_run(run_id: str | None):
    """The MLflow run with that id, or None (e.g. a model copied from another tracking server)."""
    if run_id is None:
        return None
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None


def open_model(cfg: Config, model_arg: str) -> tuple:
    """(model, tokenizer, path, step, label) of --model: a final/ or HF folder, a checkpoint
    <run>/step_N (its model restored from the train state), or a runs:/ / models:/ URI. `label`
    names it in the default output folder (a models:/ URI keeps its version)."""
    label = "model"
    if model_arg.startswith(("runs:/", "models:/")):
        mlflow_connect(cfg)
        try:
            path = resolve_mlflow_uri(model_arg)
        except mlflow.exceptions.MlflowException as exc:
            raise ConfigError(f"--model {model_arg}: {str(exc).splitlines()[0]}") from None
        if model_arg.startswith("models:/"):
            label = "-v".join(model_arg[len("models:/") :].split("/")[:2])
    else:
        path = io_stream.resolve(model_arg)[1]
    names = io_stream.list_dir(path)
    if not names:
        raise ConfigError(f"--model {model_arg}: no such model folder ({path})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # a folder that is not a loadable model is bad input (exit 2); S3 being down is not
        if io_stream.MANIFEST in names:  # a training checkpoint
            tokenizer, model, step = load_checkpoint_model(path)
            label = path.rstrip("/").rsplit("/", 1)[-1]
            return model.to(device).eval(), tokenizer, path, step, label
        fmt = detect_format(path, names)
        model = load_model(path, kind="causal" if fmt == "hf" else "mtp", device=device)
        tokenizer = load_tokenizer(path)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"--model {model_arg}: {str(exc).splitlines()[0]}") from None
    if label == "model":
        label = path.rstrip("/").rsplit("/", 1)[-1]
    return model, tokenizer, path, None, label


# ---------------------------------------------------------------------------------------------
# The evaluation's folder: settings, samples kept across an interruption, results


def settings_of(cfg: Config, model: str, step: int | None, speculative: bool) -> dict:
    """Everything that decides the numbers: datasets (with each problem file's sha256), sampling,
    limits, the model and its step."""
    e = cfg.eval
    files = {name: dataset_file(cfg.paths.datasets[name], e.split) for name in e.datasets}
    return {
        "datasets": list(e.datasets),
        "split": e.split,
        "sha256": {name: io_stream.file_sha256(file) for name, file in files.items()},
        "n": e.n,
        "k": sorted(set(e.k)),
        "temperature": e.temperature,
        "top_p": e.top_p,
        "max_new_tokens": e.max_new_tokens,
        "limit": e.limit,
        "seed": e.seed,
        "speculative": speculative,
        "compile": cfg.decode.compile,
        "timeout": e.timeout,
        "sandbox": sandbox_mode(e.sandbox)[0],
        "model": redact(model),
        "step": step,
    }


def kept_samples(out: str, settings: dict) -> dict[tuple[str, str], list[dict]]:
    """The samples an interrupted evaluation in `out` finished, by (dataset, task id), when its
    settings are these; {} for a new folder. Different settings are refused."""
    saved = io_stream.join(out, "settings.json")
    if not io_stream.exists(saved):
        return {}
    old = json.loads(io_stream.read_bytes(saved))
    same_tokens = ("model", "step", "compile", "sandbox")  # the same tokens, the same checks
    differ = [k for k in settings if k not in same_tokens and old.get(k) != settings[k]]
    if differ:
        raise ConfigError(
            f"--out {out}: holds an evaluation with other settings ({', '.join(differ)}); "
            "choose another --out"
        )
    kept: dict[tuple[str, str], list[dict]] = {}
    samples = io_stream.join(out, "samples.jsonl")
    if io_stream.exists(samples):
        try:
            for rec in io_stream.iter_records(samples):
                kept.setdefault((rec["dataset"], rec["task_id"]), []).append(rec)
        except ValueError:  # the line being written when it stopped
            pass
    return {key: recs for key, recs in kept.items() if len(recs) == settings["n"]}


def read_samples(path: str) -> dict[str, dict[str, list[dict]]]:
    """{dataset: {task id: [sample records in sample order]}} of a samples.jsonl."""
    out: dict[str, dict[str, list[dict]]] = {}
    for rec in io_stream.iter_records(path):
        for key in ("dataset", "task_id", "sample", "completion"):
            if key not in rec:
                raise ValueError(
                    f"{path}: a sample without {key!r}: not an eval_mtp.py samples file"
                )
        out.setdefault(rec["dataset"], {}).setdefault(rec["task_id"], []).append(rec)
    for tasks in out.values():
        for recs in tasks.values():
            recs.sort(key=lambda r: r["sample"])
    return out


def summarize(counts: dict[str, tuple[int, int]], ks: list[int], seed: int) -> dict:
    """results.json's entry for one dataset: problems, samples, pass@k, its 95% interval and
    each problem's (n, correct)."""
    values = list(counts.values())
    return {
        "problems": len(counts),
        "samples": sum(n for n, _ in values),
        "pass@k": {
            str(k): sum(pass_at_k(n, c, k) for n, c in values) / max(len(values), 1) for k in ks
        },
        "interval": {str(k): list(pass_at_k_interval(values, k, seed=seed)) for k in ks},
        "per_problem": {task: [n, c] for task, (n, c) in counts.items()},
    }


# ---------------------------------------------------------------------------------------------
# The run


def start_eval_run(cfg: Config, parent, label: str, settings: dict):
    """A new MLflow run `eval-<model run name>-<UTC time>`: a child of the training run (in its
    experiment, `mlflow.parentRunId`) with that run's algo and seed tags, or stand-alone."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if parent is not None:
        name = f"eval-{parent.info.run_name}-{stamp}"
        tags = {"mlflow.parentRunId": parent.info.run_id, "eval_of": parent.info.run_id}
        tags |= {k: parent.data.tags[k] for k in ("algo", "seed", "stage") if k in parent.data.tags}
        tags["stage"] = "eval"
        run = mlflow.start_run(experiment_id=parent.info.experiment_id, run_name=name, tags=tags)
    else:
        run = mlflow_start(cfg, f"eval-{label}-{stamp}")
        mlflow.set_tag("stage", "eval")
    params = {k: v for k, v in settings.items() if k != "sha256"}
    params |= {f"sha256/{name}": digest for name, digest in settings["sha256"].items()}
    mlflow.log_params(
        {k: json.dumps(v) if not isinstance(v, str) else v for k, v in params.items()}
    )
    e = cfg.eval
    mlflow.set_tag(
        "mlflow.note.content",
        f"Evaluation of {settings['model']}: pass@{','.join(map(str, settings['k']))} with n {e.n} "
        f"at temperature {e.temperature:g} on {', '.join(e.datasets)} (split {e.split}"
        f"{f', first {e.limit} problems' if e.limit else ''}).",
    )
    log_inputs(
        {f"{n}/{e.split}": dataset_file(cfg.paths.datasets[n], e.split) for n in e.datasets},
        "evaluation",
    )
    return run


def print_table(results: dict, ks: list[int]) -> None:
    """One row per dataset: problems, samples, pass@k [95% interval] for each k."""
    for name, r in results.items():
        cells = "  ".join(
            f"pass@{k} {r['pass@k'][str(k)]:.4f} [{r['interval'][str(k)][0]:.4f}, "
            f"{r['interval'][str(k)][1]:.4f}]"
            for k in ks
        )
        print(f"{name:<12} {r['problems']:>4} problems {r['samples']:>5} samples  {cells}")


def log_results(results: dict, ks: list[int], decode_stats: dict, out: str) -> None:
    """Metrics pass_at_<k>/<dataset> with their interval, decoding statistics, and the folder's
    samples.jsonl and results.json as artifacts of the active run."""
    metrics = {}
    for name, r in results.items():
        for k in ks:
            lo, hi = r["interval"][str(k)]
            metrics[f"pass_at_{k}/{name}"] = r["pass@k"][str(k)]
            metrics[f"pass_at_{k}_ci_low/{name}"] = lo
            metrics[f"pass_at_{k}_ci_high/{name}"] = hi
    if decode_stats:
        metrics["decode/tokens_per_forward"] = decode_stats["tokens_per_forward"]
        rates = decode_stats["head_acceptance"]
        metrics |= {f"decode/head{j + 1}_acceptance": rate for j, rate in enumerate(rates)}
    mlflow.log_metrics(metrics)
    for file in ("samples.jsonl", "results.json"):
        src = io_stream.join(out, file)
        if io_stream.resolve(src)[0] == "local":
            mlflow.log_artifact(src)
        elif (art := artifact_uri(file)) is not None:
            with io_stream.open_stream(src, "rb") as fin, io_stream.open_stream(art, "wb") as fout:
                while block := fin.read(8 * 2**20):
                    fout.write(block)


def evaluate_all(cfg: Config, model, tokenizer, out: str, settings: dict, quiet: bool) -> tuple:
    """Generate and check every dataset's samples (keeping those an interrupted run in `out`
    finished), writing samples.jsonl as they come; returns ({dataset: counts}, decode stats)."""
    e = cfg.eval
    kept = kept_samples(out, settings)
    io_stream.write_bytes(
        json.dumps(settings, indent=1).encode(), io_stream.join(out, "settings.json")
    )
    counts: dict[str, dict[str, tuple[int, int]]] = {}
    decode_stats: dict = {}
    with io_stream.open_stream(io_stream.join(out, "samples.jsonl"), "wb") as f:
        for name in e.datasets:
            done = {task: recs for (ds, task), recs in kept.items() if ds == name}
            counts[name] = {t: (len(r), sum(x["passed"] for x in r)) for t, r in done.items()}
            for recs in done.values():
                for rec in recs:
                    f.write((json.dumps(rec) + "\n").encode())
            _, problems = load_problems(cfg.paths.datasets[name], e.split, e.limit)
            todo = len(problems) - len(done)
            gen = tqdm(total=todo, desc=f"generate {name}", disable=quiet, leave=False)
            run = tqdm(total=todo * e.n, desc=f"check {name}", disable=quiet, leave=False)

            def write(sample: dict, name: str = name, run: tqdm = run) -> None:
                f.write((json.dumps({"dataset": name} | sample) + "\n").encode())
                run.update(1)

            result = evaluate(
                model, tokenizer, cfg.paths.datasets[name], split=e.split, n=e.n, k=e.k,
                temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                limit=e.limit, workers=e.workers, timeout=e.timeout, seed=e.seed,
                batch_size=e.batch_size, on_result=write, speculative=settings["speculative"],
                decode_stats=decode_stats, skip=set(done), on_generated=gen.update,
                compile=cfg.decode.compile, isolation=e.sandbox,
            )  # fmt: skip
            gen.close()
            run.close()
            counts[name] |= result["problems"]
    return counts, decode_stats


def rescore(cfg: Config, samples: str, out: str, quiet: bool) -> dict[str, dict]:
    """Check saved completions again (no model): {dataset: counts}; samples.jsonl rewritten in `out`."""
    e = cfg.eval
    saved = read_samples(samples)
    counts = {}
    with io_stream.open_stream(io_stream.join(out, "samples.jsonl"), "wb") as f:
        for name, tasks in saved.items():
            if name not in cfg.paths.datasets:
                raise ConfigError(f"--samples {samples}: dataset {name!r} is not in paths.datasets")
            _, problems = load_problems(cfg.paths.datasets[name], e.split)
            by_id = {p.id: p for p in problems}
            missing = sorted(set(tasks) - set(by_id))
            if missing:
                raise ConfigError(f"--samples {samples}: {name} has no problem {missing[0]!r}")
            bar = tqdm(total=sum(map(len, tasks.values())), desc=f"check {name}", disable=quiet)

            def write(sample: dict, name: str = name, bar: tqdm = bar) -> None:
                f.write((json.dumps({"dataset": name} | sample) + "\n").encode())
                bar.update(1)

            pairs = ((by_id[t], [r["completion"] for r in recs]) for t, recs in tasks.items())
            result = score(
                pairs, k=e.k, workers=e.workers, timeout=e.timeout, on_result=write,
                isolation=e.sandbox,
            )  # fmt: skip
            bar.close()
            counts[name] = result["problems"]
    return counts


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = parse_args(argv)
    check_arguments(args)
    cfg = setup(args)
    e = cfg.eval
    if args.speculative and e.temperature != 0:
        raise ConfigError(
            f"--speculative is greedy decoding: it needs temperature 0, not {e.temperature}"
        )
    for name in e.datasets:
        if name not in cfg.paths.datasets:
            raise ConfigError(
                f"--data {name}: not in paths.datasets ({', '.join(cfg.paths.datasets)})"
            )
    mlflow_connect(cfg)
    # a folder of its own even for two evaluations in the same second
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)
    if args.samples:
        model = tokenizer = step = None
        path, label = args.samples, "samples"
        parent = existing_run(args.run_id)
        out = args.out or io_stream.join(
            os.path.dirname(io_stream.resolve(args.samples)[1]), f"rescore-{stamp}"
        )
    else:
        model_arg = args.model or newest_final(cfg.paths.checkpoints)
        model, tokenizer, path, step, label = open_model(cfg, model_arg)
        positions = model.config.max_position_embeddings
        if e.max_new_tokens >= positions:
            raise ConfigError(
                f"--max-new-tokens {e.max_new_tokens}: does not fit in the model's {positions} positions"
            )
        parent = existing_run(args.run_id or run_of(model_arg, path))
        if args.run_id and parent is None:
            raise ConfigError(f"--run-id {args.run_id}: no such MLflow run")
        out = args.out or io_stream.join(
            path.rstrip("/").rsplit("/", 1)[0], "eval", f"{label}-{stamp}"
        )
    if step is None and parent is not None:
        history = mlflow.MlflowClient().get_metric_history(parent.info.run_id, "train/loss")
        step = max((m.step for m in history), default=0)
    settings = settings_of(cfg, path, step, args.speculative)
    run = start_eval_run(cfg, parent, label, settings)
    mode, why = sandbox_mode(e.sandbox)
    mlflow.log_param("sandbox_why", why)
    if mode == "hook":
        print(f"warning: sandbox: {why}", file=sys.stderr)
    try:
        if args.samples:
            counts, decode_stats = rescore(cfg, args.samples, out, args.quiet), {}
            mlflow.log_param("samples", redact(args.samples))
        else:
            counts, decode_stats = evaluate_all(cfg, model, tokenizer, out, settings, args.quiet)
        ks = settings["k"]
        results = {name: summarize(c, ks, e.seed) for name, c in counts.items()}
        doc = {"settings": settings, "datasets": results, "run_id": run.info.run_id}
        io_stream.write_bytes(
            json.dumps(doc, indent=1).encode(), io_stream.join(out, "results.json")
        )
        log_results(results, ks, decode_stats, out)
        mlflow.set_tags({"eval_out": redact(out), "eval_model": redact(path)})
    except BaseException as exc:
        mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run()
    if parent is not None:  # the one change to the training run: which evaluation is its newest
        mlflow.MlflowClient().set_tag(parent.info.run_id, "latest_eval", run.info.run_id)
    print_table(results, ks)
    if not args.quiet:
        if decode_stats:
            rates = decode_stats["head_acceptance"]
            print(
                f"speculative decoding: {decode_stats['tokens_per_forward']:.2f} tokens per forward; "
                "acceptance " + ", ".join(f"head {j + 1} {r:.2f}" for j, r in enumerate(rates))
            )
        print(f"eval run {run.info.run_id}; samples and results in {redact(out)}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
