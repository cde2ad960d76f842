"""Evaluate a trained model: pass@k on HumanEval and MBPP test, samples and metrics to MLflow.

python eval_mtp.py [--model PATH|runs:/<run_id>/model|models:/<name>/<version>]
    [--data humaneval mbpp] [--n 1] [--k 1] [--temperature 0] [--limit N] [--workers W]
    [--run-id ID] [--out PATH] [--config config.yaml] [--set eval.key=value ...]
"""

from __future__ import annotations

import argparse
import json

from wmtp_cli import run_cli  # the functions import torch & co.: --help answers at once

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
        help="model folder (local or s3://), runs:/ or models:/ URI (default: newest final/)",
    )
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
    p.add_argument("--run-id", dest="run_id", help="MLflow run to log into (default: the model's)")
    p.add_argument("--out", help="folder for samples.jsonl (default: eval/ beside the model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            args.set.append(f"eval.{key}={json.dumps(value)}")
    return args


def newest_final(root: str) -> str:
    """The most recently saved complete <run>/final/ under the checkpoints root."""
    import io_stream
    from wmtp import ConfigError
    from wmtp_model import MTP_JSON

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
    `final_model` tag, or the manifest of a checkpoint beside the folder; None if none is known."""
    import mlflow

    import io_stream

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
    ckpt = io_stream.latest_ckpt(path.rsplit("/", 1)[0])
    if ckpt is None:
        return None
    state = json.loads(io_stream.read_bytes(io_stream.join(ckpt, io_stream.MANIFEST)))["state"]
    return state.get("mlflow_run_id")


def last_step(run_id: str) -> int:
    """The training run's last logged step (0 if it logged no loss): evaluation metrics go there."""
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    return max((m.step for m in history), default=0)


def copy_stream(src: str, dst: str) -> None:
    """Copy a file between local paths and S3 in bounded blocks."""
    import io_stream

    with io_stream.open_stream(src, "rb") as fin, io_stream.open_stream(dst, "wb") as fout:
        while block := fin.read(8 * 2**20):
            fout.write(block)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = parse_args(argv)
    import mlflow
    import torch

    import io_stream
    from wmtp import ConfigError
    from wmtp_model import detect_format, load_model, load_tokenizer
    from wmtp_runs import mlflow_connect, mlflow_start, resolve_mlflow_uri
    from wmtp_train import setup

    cfg = setup(args)
    e = cfg.eval
    for name in e.datasets:
        if name not in cfg.paths.datasets:
            raise ConfigError(
                f"--data {name}: not in paths.datasets ({', '.join(cfg.paths.datasets)})"
            )
    model_arg = args.model or newest_final(cfg.paths.checkpoints)
    if model_arg.startswith(("runs:/", "models:/")):
        mlflow_connect(cfg)
        try:
            path = resolve_mlflow_uri(model_arg)
        except mlflow.exceptions.MlflowException as exc:
            raise ConfigError(f"--model {model_arg}: {str(exc).splitlines()[0]}") from None
        out = args.out or io_stream.join(cfg.paths.checkpoints, "eval", model_arg.split("/")[1])
    else:
        path = io_stream.resolve(model_arg)[1]
        out = args.out or io_stream.join(path.rsplit("/", 1)[0], "eval")
    names = io_stream.list_dir(path)
    if not names:
        raise ConfigError(f"--model {model_arg}: no such model folder ({path})")
    try:
        fmt = detect_format(path, names)
    except ValueError as exc:
        raise ConfigError(f"--model {model_arg}: {exc}") from None

    mlflow_connect(cfg)
    run_id = args.run_id
    if run_id is not None:
        try:
            mlflow.MlflowClient().get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise ConfigError(f"--run-id {run_id}: no such MLflow run") from None
    else:
        run_id = run_of(model_arg, path)
        if run_id is not None:
            try:
                mlflow.MlflowClient().get_run(run_id)
            except mlflow.exceptions.MlflowException:
                run_id = None  # a model copied from another tracking server

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, kind="causal" if fmt == "hf" else "mtp", device=device)
    tokenizer = load_tokenizer(path)
    step = last_step(run_id) if run_id else 0
    if run_id:
        mlflow.start_run(run_id=run_id)
    else:
        parts = path.rstrip("/").rsplit("/", 2)  # <run>/final, or any folder
        mlflow_start(cfg, f"eval-{parts[-2] if parts[-1] == 'final' else parts[-1]}")
    try:
        evaluate_into_run(cfg, model, tokenizer, path, out, step, args.speculative)
    except BaseException:
        mlflow.end_run("FINISHED" if run_id else "FAILED")  # a training run keeps its status
        raise
    mlflow.end_run()


def evaluate_into_run(
    cfg, model, tokenizer, path: str, out: str, step: int, speculative: bool = False
) -> None:
    """Evaluate on every eval dataset; samples.jsonl to `out`, table to stdout, metrics and the
    samples to the active MLflow run. With `speculative`, also the decoding statistics."""
    import mlflow

    import io_stream
    from wmtp_eval import evaluate
    from wmtp_runs import artifact_uri

    e = cfg.eval
    mlflow.set_tags({"eval_model": path, "eval_out": out})
    samples = io_stream.join(out, "samples.jsonl")
    results = {}
    decode_stats: dict = {}
    with io_stream.open_stream(samples, "wb") as f:
        for name in e.datasets:

            def write(sample: dict, name: str = name) -> None:
                f.write((json.dumps({"dataset": name} | sample) + "\n").encode())

            results[name] = evaluate(
                model,
                tokenizer,
                cfg.paths.datasets[name],
                split=e.split,
                n=e.n,
                k=e.k,
                temperature=e.temperature,
                top_p=e.top_p,
                max_new_tokens=e.max_new_tokens,
                limit=e.limit,
                workers=e.workers,
                timeout=e.timeout,
                seed=e.seed,
                batch_size=e.batch_size,
                on_result=write,
                speculative=speculative,
                decode_stats=decode_stats,
            )

    ks = sorted(set(e.k))
    print(
        f"{'dataset':<12}{'problems':>9}{'samples':>9}" + "".join(f"{f'pass@{k}':>9}" for k in ks)
    )
    for name, r in results.items():
        n_problems = len(r["problems"])
        n_samples = sum(n for n, _ in r["problems"].values())
        row = "".join(f"{r['pass@k'][k]:>9.4f}" for k in ks)
        print(f"{name:<12}{n_problems:>9}{n_samples:>9}{row}")
    print(f"samples: {samples}")
    metrics = {f"pass_at_{k}/{name}": r["pass@k"][k] for name, r in results.items() for k in ks}
    if decode_stats:
        rates = decode_stats["head_acceptance"]
        print(
            f"speculative decoding: {decode_stats['tokens_per_forward']:.2f} tokens per forward; "
            "acceptance " + ", ".join(f"head {j + 1} {rate:.2f}" for j, rate in enumerate(rates))
        )
        metrics["decode/tokens_per_forward"] = decode_stats["tokens_per_forward"]
        metrics |= {f"decode/head{j + 1}_acceptance": rate for j, rate in enumerate(rates)}
    mlflow.log_metrics(metrics, step=step)
    if io_stream.resolve(samples)[0] == "local":
        mlflow.log_artifact(samples, "eval")
    elif (art := artifact_uri("eval")) is not None:
        copy_stream(samples, io_stream.join(art, "samples.jsonl"))


if __name__ == "__main__":
    run_cli(main)
