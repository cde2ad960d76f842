"""Run plumbing shared by train_critic.py and train_mtp.py: CLI, Accelerator, data batches, MLflow, checkpoints."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import msgspec
import torch
from accelerate.logging import get_logger

import io_stream
from wmtp import Config, ConfigError, config_params, load_config, redact
from wmtp_cli import LOGGER, parse_args, run_cli  # noqa: F401 (callers import these from here too)
from wmtp_data import Example, collate, encode, iter_dataset
from wmtp_model import (
    MTPModel,
    byte_tokenizer,
    init_mtp_model,
    load_model,
    load_tokenizer,
    same_tokenizer,
    weights_nbytes,
)

# ---------------------------------------------------------------------------------------------
# Messages (the CLI, parse_args and run_cli, lives in wmtp_cli: it imports nothing heavy)

log = get_logger(LOGGER)  # INFO on rank 0 only; run_cli prints it, --quiet silences it


def quiet() -> bool:
    """--quiet: the kit's logger is set above INFO (then no progress bar either)."""
    return log.logger.level > logging.INFO


def setup(args: argparse.Namespace) -> Config:
    """Load the config with overrides and point io_stream at the configured S3."""
    overrides = list(args.set)
    if getattr(args, "algo", None):
        overrides.append(f"train.algo={args.algo}")
    cfg = load_config(args.config, overrides)
    io_stream.configure_s3(
        cfg.s3.endpoint_url,
        cfg.s3.region,
        cfg.s3.profile,
        max_concurrency=cfg.s3.max_concurrency,
        block_size=cfg.s3.block_size,
        connect_timeout=cfg.s3.connect_timeout,
        read_timeout=cfg.s3.read_timeout,
        retries=cfg.s3.retries,
        fallback_root=cfg.s3.fallback_root,
    )
    return cfg


def make_accelerator(cfg: Config, grad_accum: int = 1):
    """Accelerator with mixed precision from config (auto = bf16 on GPU, fp32 on CPU). Without a GPU,
    processes started by torchrun form a gloo group (`accelerate launch --cpu` starts only one)."""
    from accelerate import Accelerator

    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(
        mixed_precision=mp,
        gradient_accumulation_steps=grad_accum,
        cpu=not torch.cuda.is_available(),
    )


# ---------------------------------------------------------------------------------------------
# Models


def rank0_reads_weights(acc) -> bool:
    """True when FSDP's cpu_ram_efficient_loading broadcasts rank 0's weights to the other ranks."""
    return is_fsdp(acc) and bool(acc.state.fsdp_plugin.cpu_ram_efficient_loading)


def load_base(cfg: Config, acc, *, meta_weights: bool | None = None):
    """(tokenizer, MTP model): from paths.models.base, or a random model + byte tokenizer.
    Under FSDP with cpu_ram_efficient_loading only rank 0 reads the weights (meta_weights: whether
    this rank builds the model without reading them; the random model is always built)."""
    if cfg.paths.models.base is None:
        m = cfg.model
        tok = byte_tokenizer()
        if m.vocab_size < tok.vocab_size:
            raise ConfigError(
                f"model.vocab_size {m.vocab_size} is smaller than the byte tokenizer's {tok.vocab_size}"
            )
        model = init_mtp_model(**msgspec.structs.asdict(m), seed=cfg.train.seed)
        return tok, model
    path = cfg.paths.models.base
    meta = meta_weights
    if meta is None:
        meta = rank0_reads_weights(acc) and not acc.is_main_process
    return load_tokenizer(path), load_model(
        path, kind="mtp", n_heads=cfg.model.n_heads, meta_weights=meta
    )


def load_base_ref(cfg: Config, acc):
    """paths.models.ref: base — a frozen next-token copy (trunk + head 0) of the base model as it
    is at step 0, read the way load_base reads it, in eval mode. Under FSDP it is sharded like the
    trained model when its weights exceed train.shard_frozen_over_gib GiB (only rank 0 then reads
    them), else every rank holds a full copy, as load_frozen decides for a reference model."""
    from wmtp_eval import causal_lm

    _, shapes = load_base(cfg, acc, meta_weights=True)
    nbytes = sum(p.numel() * p.element_size() for p in causal_lm(shapes).parameters())
    shard = is_fsdp(acc) and nbytes > cfg.train.shard_frozen_over_gib * 2**30
    meta = shard and rank0_reads_weights(acc) and not acc.is_main_process
    model = causal_lm(load_base(cfg, acc, meta_weights=meta)[1]).requires_grad_(False)
    return shard_frozen(acc, model) if shard else model.to(acc.device)


def load_frozen(acc, path: str, kind: str, tokenizer, role: str, shard_over_gib: float):
    """A frozen reference/reward model on the training device. Its tokenizer must match the base's.
    Under FSDP it is sharded like the base when its weights exceed `shard_over_gib` GiB (then only
    rank 0 reads them), else every rank holds a full copy."""
    other = load_tokenizer(path)
    if not same_tokenizer(tokenizer, other):
        raise ValueError(
            f"{path}: the {role} model's tokenizer differs from the base model's; its tokens would not line up"
        )
    shard = is_fsdp(acc) and weights_nbytes(path) > shard_over_gib * 2**30
    meta = shard and rank0_reads_weights(acc) and not acc.is_main_process
    model = load_model(path, kind=kind, meta_weights=meta)
    model.eval().requires_grad_(False)
    return shard_frozen(acc, model) if shard else model.to(acc.device)


def shard_frozen(acc, model):
    """FSDP2-shard a frozen model the way accelerate shards the trained one (no optimizer needed)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(acc, model)


# ---------------------------------------------------------------------------------------------
# Data: streamed, sharded by rank, shuffled in a bounded buffer, resumable by batch count

SHUFFLE_BUFFER = 10_000


def is_heldout(example_id: str, fraction: float) -> bool:
    """Deterministic held-out membership by a hash of the example's problem: the id, or for a
    CodeContests solution (`{name}/solutions/{i}`, `{name}/incorrect_solutions/{i}`) the problem
    name, so that all solutions of a problem fall on the same side."""
    parts = str(example_id).rsplit("/", 2)
    solution = len(parts) == 3 and parts[1] in ("solutions", "incorrect_solutions")
    problem = parts[0] if solution else str(example_id)
    h = int.from_bytes(hashlib.sha1(problem.encode()).digest()[:4], "little")
    return h % 10_000 < fraction * 10_000


def iter_examples(cfg: Config, part: str = "all") -> Iterator[Example]:
    """Examples of every dataset in data.train; part = all | train | heldout."""
    for name in cfg.data.train:
        for ex in iter_dataset(cfg.paths.datasets[name], cfg.data.split):
            if part == "all" or is_heldout(ex.id, cfg.data.heldout_fraction) == (part == "heldout"):
                yield ex


def _shuffled(items: Iterator, rng: random.Random, buffer: int) -> Iterator:
    """Approximate shuffle with bounded memory (a reservoir of `buffer` items)."""
    pool = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            i = rng.randrange(len(pool))
            pool[i], pool[-1] = pool[-1], pool[i]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


def iter_batches(
    cfg: Config,
    tokenizer,
    batch_size: int,
    *,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    skip_examples: int = 0,
    part: str = "all",
    shuffle: bool | None = None,
    drop_last: bool = True,
) -> Iterator[dict]:
    """Collated batches for this rank: every rank gets different examples and the same batch count.

    The shuffled stream is the same for any world size; each group of batch_size x world examples
    is split between the ranks, and `skip_examples` skips the start of the stream (resume).
    The last incomplete group is dropped, or with drop_last=False (evaluation: every example once)
    split as evenly as the ranks allow; a rank left without an example then gets a one-example
    batch whose loss_mask is all False, so that every rank runs the same number of forwards."""

    def make(mine: list[Example]) -> dict:
        encoded = [
            encode(tokenizer, e, cfg.data.max_length, prompt_loss=cfg.data.prompt_loss)
            for e in mine
        ]
        batch = collate(encoded, tokenizer.pad_id)
        batch["n_cut"] = sum(cut for _, _, cut in encoded)
        if all(e.label is not None for e in mine):
            batch["label"] = torch.tensor([float(e.label) for e in mine])
        return batch

    examples = iter_examples(cfg, part)
    if cfg.data.shuffle if shuffle is None else shuffle:
        examples = _shuffled(examples, random.Random(f"{cfg.train.seed}/{epoch}"), SHUFFLE_BUFFER)
    for _ in zip(range(skip_examples), examples):
        pass
    group = []
    for ex in examples:
        group.append(ex)
        if len(group) == batch_size * world:
            yield make(group[rank * batch_size : (rank + 1) * batch_size])
            group = []
    if group and not drop_last:
        share = -(-len(group) // world)  # ceil
        mine = group[rank * share : (rank + 1) * share]
        batch = make(mine or group[:1])
        if not mine:
            batch["loss_mask"][:] = False
            batch["n_cut"] = 0
        yield batch


def batch_rewards(batch: dict, rm, device) -> torch.Tensor:
    """Sequence rewards [B]: from the reward model when there is one, else the dataset labels."""
    if rm is not None:
        with torch.no_grad():
            return rm(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
    if "label" not in batch:
        raise ValueError(
            "the data has no labels and paths.models.rm is not set: no rewards for the value head"
        )
    return batch["label"].to(device)


def shared_value(acc, compute: Callable):
    """compute() on rank 0, the same value on every rank."""
    if acc.num_processes == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    box = [compute() if acc.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def all_reduce_grads(acc, module: torch.nn.Module) -> None:
    """Average a replicated module's gradients over the ranks (for the small value head)."""
    if acc.num_processes == 1:
        return
    import torch.distributed as dist

    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= acc.num_processes


def head0_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head 0's final normed hidden state [B,S,D] (what a value head reads), without grad."""

    def run(m, ids, attn):
        h, ctx = m.run_trunk(ids, attn)
        return m.run_head(0, h, ctx)

    with torch.no_grad():
        return model(input_ids, attention_mask, fn=run)


# ---------------------------------------------------------------------------------------------
# Schedules


def lr_schedule(opt, schedule: str, warmup: int, total: int):
    """transformers' schedule: linear warmup from 0 over `warmup` optimizer steps, then cosine to
    0 at step `total`, or constant. A LambdaLR whose state is its step count: a resume that loads
    that state continues it exactly."""
    from transformers import get_scheduler

    name = "cosine" if schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)


# ---------------------------------------------------------------------------------------------
# MLflow (rank 0 only)


def mlflow_connect(cfg: Config) -> str:
    """Point MLflow at the configured tracking (and registry) server (MLFLOW_TRACKING_URI wins) and
    return the experiment's id, creating it if needed. On SQLite this runs under a file lock: the
    schema migration of a fresh store fails when several first runs start at once."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
    if cfg.s3.endpoint_url:  # MLflow's own S3 client (artifacts, models) reads only the environment
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", cfg.s3.endpoint_url)
    mlflow.set_tracking_uri(uri)
    if cfg.mlflow.registry_uri:
        mlflow.set_registry_uri(cfg.mlflow.registry_uri)
    db = uri[len("sqlite:///") :].split("?")[0] if uri.startswith("sqlite:///") else ""
    with file_lock(db + ".lock") if db else contextlib.nullcontext():
        exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        if exp is not None:
            return exp.experiment_id
        return mlflow.create_experiment(
            cfg.mlflow.experiment, artifact_location=cfg.mlflow.artifact_location
        )


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive flock on the file `path` (created here, deleted on release)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder deleted this file while we waited: lock the new one
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def mlflow_start(cfg: Config, run_name: str, run_id: str | None = None):
    """Start (or continue) the MLflow run and log the config (secrets removed) as params."""
    import mlflow

    exp_id = mlflow_connect(cfg)
    run = mlflow.start_run(
        run_id=run_id,
        experiment_id=exp_id,
        run_name=None if run_id else run_name,
        # CPU, memory, disk, network (and GPU with nvidia-ml-py) unless the env var says otherwise
        log_system_metrics=None if "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" in os.environ else True,
    )
    if run_id is None:
        mlflow.log_params(config_params(cfg))
    return run


def artifact_uri(subpath: str) -> str | None:
    """Where io_stream can write an artifact of the active run directly (local or S3), else None."""
    import mlflow

    uri = mlflow.get_artifact_uri()
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri and not uri.startswith("s3://"):
        return None  # e.g. mlflow-artifacts:/ through a tracking server: log via the client instead
    return io_stream.join(uri, subpath)


def resolve_mlflow_uri(uri: str) -> str:
    """runs:/<run_id>/<path> or models:/<name>/<version> -> where its files are (local path or
    s3:// URI). For the kit's MLflow models, the weights: the final MTP model's folder (which its
    MLflow model points at) or the value head file inside its MLflow model; for any other MLflow
    model its folder, for a run's plain artifact its place in the artifact store."""
    import mlflow

    try:
        info = mlflow.models.get_model_info(uri)
    except (mlflow.exceptions.MlflowException, OSError):
        if not uri.startswith("runs:/"):
            raise
        run_id, _, sub = uri[len("runs:/") :].partition("/")
        base = mlflow.MlflowClient().get_run(run_id).info.artifact_uri.removeprefix("file://")
        return io_stream.join(base, sub) if sub else base
    pyfunc = info.flavors.get("python_function", {})
    if (pyfunc.get("config") or {}).get("final_model"):
        return pyfunc["config"]["final_model"]
    model = mlflow.MlflowClient().get_logged_model(info.model_id)
    folder = model.artifact_location.removeprefix("file://")
    value_head = (pyfunc.get("artifacts") or {}).get("value_head")
    return io_stream.join(folder, value_head["path"]) if value_head else folder


# wmtp_pyfunc.py's code: the kit's modules it imports, and what they import (this environment's versions)
PYFUNC_CODE = ("io_stream.py", "wmtp_data.py", "wmtp_model.py", "wmtp_eval.py")
PYFUNC_DEPS = (
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "sentencepiece",
    "tokenizers",
    "fsspec",
    "s3fs",
    "msgspec",
)


def log_pyfunc(name: str, registered: str, config: dict, artifacts: dict | None = None) -> str:
    """Log MLflow pyfunc model `name` of the active run from wmtp_pyfunc.py (models-from-code: the
    kit's modules as its code, this environment's versions as its requirements, nothing pickled)
    and register it as a new version of `registered`; returns that version."""
    import importlib.metadata

    import mlflow

    here = os.path.dirname(os.path.abspath(__file__))
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=os.path.join(here, "wmtp_pyfunc.py"),
        code_paths=[os.path.join(here, f) for f in PYFUNC_CODE],
        artifacts=artifacts,
        model_config=config,
        pip_requirements=[
            f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in PYFUNC_DEPS
        ],
        registered_model_name=registered,
    )
    return str(info.registered_model_version)


def run_link(run) -> str:
    """Where to see an MLflow run: its page on a tracking server, or the `mlflow ui` to start."""
    import mlflow

    uri = redact(mlflow.get_tracking_uri())
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def log_startup(acc, cfg: Config, run, models: dict) -> None:
    """The run's summary on rank 0: device and world size, parameter counts, data, MLflow run."""
    log.info(
        "device %s, world size %d, mixed precision %s",
        acc.device,
        acc.num_processes,
        acc.mixed_precision,
    )
    for role, model in models.items():
        if model is not None:
            n = sum(p.numel() for p in model.parameters())
            k = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log.info("%s: %s parameters, %s trained", role, f"{n:,}", f"{k:,}")
    for name in cfg.data.train:
        log.info(
            "data %s: %s (split %s), streamed: counted when the epoch ends",
            name,
            cfg.paths.datasets[name],
            cfg.data.split,
        )
    log.info(
        "MLflow run %s (%s) in experiment %r; see it with %s",
        run.info.run_id,
        run.info.run_name,
        cfg.mlflow.experiment,
        run_link(run),
    )


# ---------------------------------------------------------------------------------------------
# Plots (MLflow figures, rank 0)

HIST_BINS = 40


def weight_histogram(w: torch.Tensor, valid: torch.Tensor, top: float) -> torch.Tensor:
    """Counts [H, HIST_BINS] of each head's weights on its valid slots, bins spanning [0, top]."""
    return torch.stack(
        [
            torch.histc(w[..., k][valid[..., k]].float(), HIST_BINS, 0, top).cpu()
            for k in range(w.shape[-1])
        ]
    )


def log_head_plots(run_id: str, step: int, n_heads: int, hist: torch.Tensor | None, top: float):
    """MLflow figures: every head's CE curve so far (plots/ce_heads.png, from the run's ce_head{k}
    metrics, so a resumed run's curve starts at step 0) and, when the algo weights slots, a
    histogram per head of its weights since the last plot (plots/weights_step_<N>.png)."""
    if "matplotlib" not in sys.modules and "MPLCONFIGDIR" not in os.environ:
        # matplotlib keeps its font list in ~/.cache: give it a folder that goes at exit
        folder = tempfile.mkdtemp(prefix="wmtp-matplotlib-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["MPLCONFIGDIR"] = folder
    import mlflow
    from matplotlib.figure import Figure

    client = mlflow.MlflowClient()
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for k in range(n_heads):
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"ce_head{k}"))
        ax.plot([s for s, _ in points], [v for _, v in points], label=f"head {k} (t+{k + 1})")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy", title=f"per-head CE to step {step}")
    ax.legend()
    mlflow.log_figure(fig, "plots/ce_heads.png")
    if hist is None:
        return
    fig = Figure(figsize=(3 * n_heads, 3), layout="constrained")
    edges = torch.linspace(0, top, HIST_BINS + 1).tolist()
    for k, ax in enumerate(fig.subplots(1, n_heads, sharey=True, squeeze=False)[0]):
        ax.stairs(hist[k].tolist(), edges, fill=True)
        ax.set(title=f"head {k}", xlabel="weight", ylabel="valid slots" if k == 0 else None)
    fig.suptitle(f"weights of rank 0's valid slots since the previous figure, to step {step}")
    mlflow.log_figure(fig, f"plots/weights_step_{step:06d}.png")


# ---------------------------------------------------------------------------------------------
# Checkpoints and RNG


def rng_state() -> dict:
    """Every RNG a training step might touch, on this process."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def is_fsdp(acc) -> bool:
    """True for an FSDP run (accelerate launch --config_file fsdp.yaml)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def is_sharded(model) -> bool:
    """True for an FSDP2-sharded model (its checkpoints go through torch.distributed.checkpoint)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def end_distributed() -> None:
    """Leave the process group once every rank is done (a process that exits with the group's
    threads still alive can abort with "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _unwrap(model):
    """The module inside a DistributedDataParallel wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _crash_hook(step: int, rank: int) -> None:
    """Test hook: WMTP_TEST_CRASH=STEP:RANK makes that rank die mid-checkpoint, before the manifest."""
    if os.environ.get("WMTP_TEST_CRASH") == f"{step}:{rank}":
        raise RuntimeError(f"WMTP_TEST_CRASH: rank {rank} stops while saving step {step}")


_fallback_ckpts: list[str] = []  # checkpoints this process wrote under s3.fallback_root


def save_train_state(path: str, model, opt, state: dict, *, fallback: bool = False) -> str:
    """Checkpoint at `path` from every rank: model + optimizer (DCP shards when FSDP-sharded, else
    rank 0 alone), then `state` and, after a barrier, the manifest written last by rank 0.
    With `fallback` (train.checkpoint_fallback), a checkpoint that S3 cannot take for a reason
    retries cannot fix is written whole under s3.fallback_root instead. Returns where it went."""
    import torch.distributed as dist

    rank, world = _rank_world()
    rngs = [rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
    state = {**state, "rng": rngs, "world_size": world}
    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    mirror = io_stream.fallback_path(path, writing=True) if fallback else None
    outage = _write_train_state(path, model, opt, state, vote=mirror is not None)
    if outage is None:
        return path
    if rank == 0:
        run = path.rsplit("/", 1)[0]
        sync = f"python migrate.py sync-checkpoints {os.path.dirname(mirror)} {run}"
        for line in (
            f"checkpoint step {state['step']} is NOT on S3: {outage}",
            f"it is written whole to {mirror} instead (train.checkpoint_fallback);",
            f"`--resume auto` finds it there; once S3 is back, upload it: {sync}",
        ):
            print(f"warning: !!! {line}", file=sys.stderr)
    _write_train_state(mirror, model, opt, state, vote=False)
    _fallback_ckpts.append(mirror)
    return mirror


def _write_train_state(path: str, model, opt, state: dict, *, vote: bool) -> ConnectionError | None:
    """save_train_state's writes at `path`. With `vote`, an S3 failure that retries cannot fix is
    not raised: the barriers become votes, and every rank returns the first rank's failure."""
    import torch.distributed as dist

    rank, world = _rank_world()
    state = dict(state)
    failed: list[str] = []  # this rank's S3 outage

    def attempt(write: Callable[[], None]) -> None:
        if failed:
            return
        try:
            write()
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            outage = io_stream.s3_outage(path, exc) if vote else None
            if outage is None:
                raise
            failed.append(str(outage))

    def barrier() -> ConnectionError | None:
        if not vote:
            _barrier()
            return None
        votes = [failed[0] if failed else None]
        if world > 1:
            votes = [None] * world
            dist.all_gather_object(votes, failed[0] if failed else None)
        first = next((v for v in votes if v), None)
        return ConnectionError(first) if first else None

    if is_sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        shards = {"model": msd, "optim": osd["state"]}
        manifest = io_stream.join(path, io_stream.MANIFEST)
        if rank == 0 and io_stream.exists(manifest):  # a re-save: the old manifest must not
            attempt(lambda: io_stream.remove(manifest))  # vouch for half-written new shards
        _barrier()
        attempt(lambda: dcp.save(shards, storage_writer=dcp_writer(io_stream.join(path, "dcp"))))
        state["optimizer_param_groups"] = osd["param_groups"]
    elif rank == 0:
        state["model"] = _unwrap(model).state_dict()
        state["optimizer"] = opt.state_dict()
    _crash_hook(state["step"], rank)
    voted: list[ConnectionError | None] = []

    def before_manifest() -> None:  # every rank wrote its part, or some rank's S3 went down
        voted.append(barrier())
        if voted[0] is not None:
            raise voted[0]

    if rank == 0:
        attempt(lambda: io_stream.save_ckpt(state, path, before_manifest=before_manifest))
    if not voted:
        barrier()
    return barrier()


def load_train_state(path: str, model, opt) -> dict:
    """Restore model and optimizer in place from a checkpoint (either layout) on every rank;
    returns the rest of the state. DCP reshards when the world size differs."""
    state = io_stream.load_ckpt(path)
    opt = getattr(opt, "optimizer", opt)
    if "optimizer_param_groups" in state:  # DCP shards; loading reshards to this world size
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, opt)
        shards = {"model": msd, "optim": osd["state"]}
        dcp.load(shards, storage_reader=dcp_reader(io_stream.join(path, "dcp")))
        groups = state["optimizer_param_groups"]
        set_state_dict(
            model,
            opt,
            model_state_dict=shards["model"],
            optim_state_dict={"state": shards["optim"], "param_groups": groups},
        )
    elif "model" not in state:
        raise ValueError(f"{path}: no model state in this checkpoint")
    elif is_sharded(model):  # a single-process checkpoint resumed under FSDP
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        full = StateDictOptions(full_state_dict=True)
        set_state_dict(
            model,
            opt,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=full,
        )
    else:
        own = _unwrap(model).state_dict()
        for key, saved in state["model"].items():
            if key in own and saved.shape != own[key].shape:
                raise ValueError(
                    f"{path}: checkpoint has {key} of shape {list(saved.shape)}, "
                    f"the model has {list(own[key].shape)}"
                )
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    rank, world = _rank_world()
    if len(state.get("rng") or []) == world:
        set_rng_state(state["rng"][rank])
    return state


def dcp_writer(path: str):
    """A torch.distributed.checkpoint writer for a local folder or S3 prefix (no fsync on S3)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    kind, p = io_stream.resolve(path)
    if kind == "local":
        return FileSystemWriter(p)
    return FsspecWriter(p, sync_files=False, **io_stream.s3_options())


def dcp_reader(path: str):
    """A torch.distributed.checkpoint reader for a local folder or S3 prefix."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    kind, p = io_stream.resolve(path)
    return FileSystemReader(p) if kind == "local" else FsspecReader(p, **io_stream.s3_options())


def full_model_on_rank0(model):
    """The whole model on CPU on rank 0 (gathered from FSDP shards when sharded), None elsewhere."""
    rank, _ = _rank_world()
    if not is_sharded(model):
        return _unwrap(model) if rank == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank != 0:
        return None
    with torch.device("meta"):
        full = MTPModel(model.config, model.n_heads)
    full.load_state_dict(sd, assign=True)
    return full


def prune_ckpts(root: str, keep_last: int, *, fallback: bool = False) -> None:
    """Delete all but the newest `keep_last` complete checkpoints under root; with `fallback`
    (train.checkpoint_fallback) those in its s3.fallback_root mirror count too, by step, and a
    checkpoint that S3 is down to delete stays for a later save to prune."""
    steps = _ckpt_steps(root, mirror=fallback)
    for step in sorted(steps)[:-keep_last] if keep_last > 0 else []:
        for old in steps[step]:
            try:
                io_stream.remove_ckpt(old)
            except ConnectionError as exc:
                if not fallback:
                    raise
                print(f"warning: {exc}; {old} stays for a later save to prune", file=sys.stderr)


def _ckpt_steps(run_dir: str, *, mirror: bool) -> dict[int, list[str]]:
    """Complete checkpoints of a run folder by step; with `mirror`, also those in its
    s3.fallback_root mirror (listed after the S3 one; S3 being down then only warns)."""
    places = [run_dir]
    local = io_stream.fallback_path(run_dir, writing=True) if mirror else None
    if local is not None:
        places.append(local)
    steps: dict[int, list[str]] = {}
    for place in places:
        try:
            found = io_stream.list_ckpts(place)
        except ConnectionError as exc:
            if local is None:
                raise
            print(f"warning: {exc}; looking for checkpoints in {local} only", file=sys.stderr)
            continue
        for path in found:
            steps.setdefault(int(path.rsplit("_", 1)[1]), []).append(path)
    return steps


def fallback_tags() -> dict[str, str]:
    """MLflow tags naming the inputs read from, and the checkpoints written to, s3.fallback_root
    in this process ({} when S3 never failed)."""
    tags = {}
    reads = [f"{uri} <- {local}" for uri, local in io_stream.fallback_used()]
    for key, items in (("s3_fallback_reads", reads), ("s3_fallback_checkpoints", _fallback_ckpts)):
        text = "; ".join(items)
        if text:  # MLflow caps a tag value at 8000 characters
            tags[key] = text if len(text) <= 8000 else f"{text[:7900]} ... ({len(items)} in all)"
    return tags


def run_name_for(acc, run_name: str | None, algo: str) -> str:
    """train.run_name, or <algo>-<UTC timestamp> chosen on rank 0 and shared with every rank."""
    if run_name:
        return check_run_name(run_name)
    from accelerate.utils import broadcast_object_list

    name = [f"{algo}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"]
    if acc.num_processes > 1:
        broadcast_object_list(name, from_process=0)
    return name[0]


def find_resume(resume: str | None, root: str, run_name: str | None, algo: str) -> str | None:
    """--resume auto: the newest complete checkpoint of train.run_name, or of the latest <algo>-* run
    that has one, on S3 or in its s3.fallback_root mirror (train.checkpoint_fallback writes there
    while S3 is down; the mirror's copy wins a tie); --resume PATH: that checkpoint, which must be
    complete."""
    if resume is None:
        return None
    if resume != "auto":
        if not io_stream.exists(io_stream.join(resume, io_stream.MANIFEST)):
            raise FileNotFoundError(
                f"{resume}: not a complete checkpoint (no {io_stream.MANIFEST})"
            )
        return resume
    if run_name:
        names = [check_run_name(run_name)]
    else:  # timestamped names sort by time
        local = io_stream.fallback_path(root, writing=True)
        try:
            names = io_stream.list_dir(root)
        except ConnectionError as exc:
            if local is None:
                raise
            print(f"warning: {exc}; looking for runs in {local} only", file=sys.stderr)
            names = []
        names += io_stream.list_dir(local) if local else []
        names = [n for n in sorted(set(names), reverse=True) if n.startswith(f"{algo}-")]
    for name in names:
        steps = _ckpt_steps(io_stream.join(root, name), mirror=True)
        if steps:
            return steps[max(steps)][-1]
    return None


def config_dict(cfg: Config) -> dict:
    """The config as plain JSON types for checkpoints, credentials in its strings masked (redact)."""

    def clean(node: object) -> object:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return redact(node) if isinstance(node, str) else node

    return clean(msgspec.to_builtins(cfg))


# ---------------------------------------------------------------------------------------------
# Run folders: safe names, one trainer at a time, an honest MLflow status, checked resumes

LOCK = ".lock"
_held_locks: dict[str, dict] = {}  # lock path -> {"record", "created"}; released by tracked_run
# config keys a resume may change without --resume-with-changes: where things go, not what is trained
FREE_KEYS = (
    "s3.",
    "mlflow.",
    "paths.checkpoints",
    "train.run_name",
    "train.log_every",
    "train.plot_every",
    "train.save_every",
    "train.keep_last",
    "train.shard_frozen_over_gib",
    "train.checkpoint_fallback",
)


def check_run_name(name: str) -> str:
    """A run name is one plain folder name inside paths.checkpoints."""
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(
            f"train.run_name {name!r}: must be one folder name inside paths.checkpoints "
            "(no '/', '\\', '..' or absolute path)"
        )
    return name


def _read_lock(path: str) -> tuple[dict | None, bytes | str | None]:
    """(holder record, version) of a run lock; (None, None) when there is none. The version is the
    local file's bytes or the S3 object's ETag; an unreadable record is {} (an unknown holder)."""
    kind, p = io_stream.resolve(path)
    try:
        if kind == "local":
            with open(p, "rb") as f:
                raw = version = f.read()
        else:
            fs = io_stream.s3_filesystem()
            version = fs.info(p)["ETag"]  # before the body: a replace then fails if it changed
            raw = fs.cat_file(p)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    try:
        holder = json.loads(raw)
    except (ValueError, RecursionError):
        holder = {}
    return holder if isinstance(holder, dict) else {}, version


def _write_lock(path: str, data: bytes, version: bytes | str | None) -> bool:
    """Create the lock (version None: local O_EXCL, S3 If-None-Match: *) or replace it if it is still
    at `version` (S3 If-Match); False when another trainer got there first."""
    kind, p = io_stream.resolve(path)
    if kind == "local" and version is None:
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if kind == "local":
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # replacers take turns, each checking what is there now
            with open(p, "rb") as f:
                if f.read() != version:
                    return False
            io_stream.write_bytes(data, p)  # temp file + rename: never a half-written lock
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)
    cond = {"mode": "create"} if version is None else {"IfMatch": version}
    try:
        io_stream.s3_filesystem().pipe_file(p, data, **cond)
    except FileExistsError:  # If-None-Match failed: the lock exists
        return False
    except OSError as exc:
        code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise type(exc)(f"{path}: {exc}") from None
    return True


def _alive(holder: dict) -> bool:
    """False only for a holder on this host whose process is gone; elsewhere nobody can tell."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or type(pid) is not int or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def lock_run_dir(run_dir: str, *, force: bool = False) -> dict | None:
    """Take `<run_dir>/.lock` for this process (local: exclusive create; S3: PUT If-None-Match: *).
    A live holder is refused with FileExistsError naming its MLflow run; one whose process is gone
    (same host), or any with force, is replaced. Returns the replaced holder's record, else None."""
    path = io_stream.join(run_dir, LOCK)
    kind, p = io_stream.resolve(run_dir)
    created = None  # the topmost folder made here, removed again if the run leaves it empty
    if kind == "local":
        while not os.path.exists(p):
            created, p = p, os.path.dirname(p)
        os.makedirs(io_stream.resolve(run_dir)[1], exist_ok=True)
    record = {
        "run_id": None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "token": uuid.uuid4().hex,
    }
    data = json.dumps(record).encode()
    for _ in range(5):
        holder, version = _read_lock(path)
        if holder is not None and not force and _alive(holder):
            who = f"MLflow run {holder['run_id']}" if holder.get("run_id") else "a starting trainer"
            raise FileExistsError(
                f"{run_dir} is in use by {who} (host {holder.get('host')}, pid {holder.get('pid')},"
                f" since {holder.get('since')}); choose another train.run_name, or pass"
                " --force-unlock if that trainer is gone"
            )
        if _write_lock(path, data, version):
            _held_locks[path] = {"record": record, "created": created}
            return holder
    raise FileExistsError(f"{run_dir}: its lock keeps changing hands; another trainer is starting")


def set_lock_run_id(run_dir: str, run_id: str) -> None:
    """Write the MLflow run id into this process's lock on run_dir, for a refused trainer to name."""
    path = io_stream.join(run_dir, LOCK)
    held = _held_locks[path]
    held["record"]["run_id"] = run_id
    holder, version = _read_lock(path)
    if holder and holder.get("token") == held["record"]["token"]:
        _write_lock(path, json.dumps(held["record"]).encode(), version)


def release_run_locks() -> None:
    """Delete the run locks this process holds (if still its own) and run folders made just for them
    that stayed empty (a start that failed leaves nothing behind)."""
    for path in list(_held_locks):
        held = _held_locks.pop(path)
        holder, _ = _read_lock(path)
        if holder and holder.get("token") == held["record"]["token"]:
            io_stream.remove(path)
        folder = os.path.dirname(path)
        while held["created"]:
            try:
                os.rmdir(folder)
            except OSError:
                break
            if folder == held["created"]:
                break
            folder = os.path.dirname(folder)


def claim_run(cfg: Config, run_dir: str, resumed_run_id: str | None, *, force: bool) -> None:
    """Lock the run folder (rank 0). MLflow runs that cannot be alive any more, the replaced dead
    holder's and the resumed checkpoint's, are marked KILLED when they are still RUNNING."""
    previous = lock_run_dir(run_dir, force=force)
    dead = {resumed_run_id, (previous or {}).get("run_id")} - {None}
    if not dead:
        return
    import mlflow

    mlflow_connect(cfg)
    client = mlflow.MlflowClient()
    for run_id in dead:
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
        except mlflow.exceptions.MlflowException:
            pass  # a run of another tracking server


def tracked_run(train_fn: Callable) -> Callable:
    """Decorate a trainer's train function: SIGTERM stops it like Ctrl-C; on an exception the active
    MLflow run ends FAILED (KILLED on SIGINT/SIGTERM); run locks are released however it ends."""

    @functools.wraps(train_fn)
    def run(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:
            previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return train_fn(*args, **kwargs)
        except BaseException as exc:
            mlflow = sys.modules.get("mlflow")
            if mlflow is not None and mlflow.active_run() is not None:
                status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
                try:
                    mlflow.end_run(status)
                except Exception as end:  # the run's own error is the one to report
                    print(f"warning: MLflow run not marked {status}: {end!r:.200}", file=sys.stderr)
            raise
        finally:
            try:
                release_run_locks()
            except Exception as end:
                print(f"warning: run lock not released: {end!r:.200}", file=sys.stderr)
            if main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return run


def _terminate(signum: int, frame) -> None:
    """SIGTERM: unwind like an exception, so that the run is marked and its lock released."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise SystemExit(128 + signum)


def read_ckpt_meta(path: str) -> dict:
    """A checkpoint's small fields (run_name, mlflow_run_id, step, config) from its manifest alone."""
    manifest = io_stream.join(path, io_stream.MANIFEST)
    try:
        meta = json.loads(io_stream.read_bytes(manifest))["state"]
        if isinstance(meta["run_name"], str) and isinstance(meta["config"], dict):
            return meta
    except (ValueError, KeyError, TypeError, RecursionError):
        pass
    raise ValueError(f"{manifest}: not a training checkpoint's manifest")


def _flat(node: dict, schema: type = Config, prefix: str = "") -> dict:
    """`section.key -> value` for the config fields present in `node` (a config as JSON types)."""
    out = {}
    for f in msgspec.structs.fields(schema):
        if f.name not in node:
            continue
        key, value = prefix + f.name, node[f.name]
        if (
            isinstance(f.type, type)
            and issubclass(f.type, msgspec.Struct)
            and isinstance(value, dict)
        ):
            out |= _flat(value, f.type, key + ".")
        elif isinstance(value, dict) and value.keys() == {"__tuple__"}:
            out[key] = value["__tuple__"]  # a tuple as a checkpoint manifest spells it
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _shown(value) -> str:
    """A config value for a message; locations (which may carry credentials) are not repeated."""
    if isinstance(value, dict) or (isinstance(value, str) and ("/" in value or ":" in value)):
        return "(a location)"
    return value if isinstance(value, str) else json.dumps(value)


def describe_changes(changes: dict[str, tuple]) -> str:
    """`key old -> new, ...` for a message or an MLflow tag."""
    return ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in changes.items())


def resume_changes(ckpt: str, saved: dict, cfg: Config, allow: bool) -> dict[str, tuple]:
    """{key: (checkpoint's, config's)} for what a resume changes, FREE_KEYS aside. A changed model
    shape or algo is refused; other changes are unless `allow` (--resume-with-changes)."""
    old, new = _flat(saved), _flat(config_dict(cfg))
    changes = {
        k: (old[k], v)
        for k, v in new.items()
        if k in old and old[k] != v and not k.startswith(FREE_KEYS)
    }
    fixed = [
        f"checkpoint has {k.rsplit('.', 1)[-1]} {_shown(a)}, config has {_shown(b)}"
        for k, (a, b) in changes.items()
        if k.startswith("model.") or k == "train.algo"
    ]
    if fixed:
        raise ConfigError(f"{ckpt}: {'; '.join(fixed)} (a resumed run keeps its model and algo)")
    if changes and not allow:
        raise ConfigError(
            f"{ckpt}: the config changes {describe_changes(changes)}; pass --resume-with-changes"
            " to resume with these changes (they are recorded in MLflow)"
        )
    return changes


def apply_hparams(cfg: Config, opt, sched, value_opt=None) -> None:
    """After a resume with changes: the optimizers take the config's lr, betas and weight decay (and
    critic.value_lr) rather than the checkpoint's, which loading their state brought back."""
    t = cfg.train
    sched.base_lrs = [t.lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas):
        group.update(
            initial_lr=t.lr,
            lr=t.lr * factor(sched.last_epoch),
            betas=tuple(t.betas),
            weight_decay=t.weight_decay,
        )
    for group in value_opt.param_groups if value_opt is not None else []:
        group["lr"] = cfg.critic.value_lr


class Throughput:
    """Tokens per second over the last logging window."""

    def __init__(self) -> None:
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, n: int) -> None:
        self.tokens += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.tokens / max(now - self.t0, 1e-9)
        self.tokens, self.t0 = 0, now
        return r
