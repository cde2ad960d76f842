"""Run plumbing shared by train_critic.py and train_mtp.py: CLI, Accelerator, data batches, MLflow, checkpoints."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator

import msgspec
import torch

import io_stream
from wmtp import Config, ConfigError, config_params, load_config
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
# CLI


def parse_args(
    argv: list[str] | None, description: str, with_algo: bool, with_resume: bool = True
) -> argparse.Namespace:
    """The trainers' common command line (argparse exits with code 2 on misuse)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--config", default="config.yaml", help="config file, local or s3:// (default: config.yaml)"
    )
    if with_algo:
        p.add_argument("--algo", choices=["baseline", "critic", "rho1-weighted", "rho1-tokenskip"])
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.lr=1e-5",
    )
    if with_resume:
        p.add_argument(
            "--resume",
            default=None,
            metavar="auto|PATH",
            help="resume from the newest complete checkpoint, or a given one",
        )
    return p.parse_args(argv)


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a trainer; user errors become one line on stderr and a non-zero exit (2 for bad config/CLI)."""
    try:
        main(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, PermissionError, ConnectionError, ValueError, KeyError) as exc:
        if os.environ.get("WMTP_DEBUG"):
            raise
        msg = str(exc).strip("'\"").splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)


def setup(args: argparse.Namespace) -> Config:
    """Load the config with overrides and point io_stream at the configured S3."""
    overrides = list(args.set)
    if getattr(args, "algo", None):
        overrides.append(f"train.algo={args.algo}")
    cfg = load_config(args.config, overrides)
    io_stream.configure_s3(cfg.s3.endpoint_url, cfg.s3.region, cfg.s3.profile)
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


def load_base(cfg: Config, acc):
    """(tokenizer, MTP model): from paths.models.base, or a random model + byte tokenizer.
    Under FSDP with cpu_ram_efficient_loading only rank 0 reads the weights."""
    if cfg.paths.models.base is None:
        m = cfg.model
        tok = byte_tokenizer()
        if m.vocab_size < tok.vocab_size:
            raise ConfigError(
                f"model.vocab_size {m.vocab_size} is smaller than the byte tokenizer's {tok.vocab_size}"
            )
        model = init_mtp_model(
            vocab_size=m.vocab_size,
            dim=m.dim,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            n_attn_heads=m.n_attn_heads,
            n_kv_heads=m.n_kv_heads,
            max_seq_len=m.max_seq_len,
            seed=cfg.train.seed,
        )
        return tok, model
    path = cfg.paths.models.base
    meta = rank0_reads_weights(acc) and not acc.is_main_process
    return load_tokenizer(path), load_model(
        path, kind="mtp", n_heads=cfg.model.n_heads, meta_weights=meta
    )


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
    """Deterministic held-out membership by a hash of the example id."""
    h = int.from_bytes(hashlib.sha1(str(example_id).encode()).digest()[:4], "little")
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
) -> Iterator[dict]:
    """Collated batches for this rank: every rank gets different examples and the same batch count.

    The shuffled stream is the same for any world size; each group of batch_size x world examples
    is split between the ranks, and `skip_examples` skips the start of the stream (resume)."""
    examples = iter_examples(cfg, part)
    if cfg.data.shuffle if shuffle is None else shuffle:
        examples = _shuffled(examples, random.Random(f"{cfg.train.seed}/{epoch}"), SHUFFLE_BUFFER)
    for _ in zip(range(skip_examples), examples):
        pass
    group = []
    for ex in examples:
        group.append(ex)
        if len(group) < batch_size * world:
            continue
        mine, group = group[rank * batch_size : (rank + 1) * batch_size], []
        encoded = [
            encode(tokenizer, e, cfg.data.max_length, prompt_loss=cfg.data.prompt_loss)
            for e in mine
        ]
        batch = collate(encoded, tokenizer.pad_id)
        batch["n_cut"] = sum(cut for _, _, cut in encoded)
        if all(e.label is not None for e in mine):
            batch["label"] = torch.tensor([float(e.label) for e in mine])
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


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """Linear warmup over `warmup` optimizer steps, then cosine to 0 at `total` or constant."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------------------------------------
# MLflow (rank 0 only)


def mlflow_connect(cfg: Config) -> None:
    """Point MLflow at the configured tracking (and registry) server; MLFLOW_TRACKING_URI wins."""
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri)
    if cfg.mlflow.registry_uri:
        mlflow.set_registry_uri(cfg.mlflow.registry_uri)


def mlflow_start(cfg: Config, run_name: str, run_id: str | None = None):
    """Start (or continue) the MLflow run and log the config (secrets removed) as params."""
    import mlflow

    mlflow_connect(cfg)
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        exp_id = mlflow.create_experiment(
            cfg.mlflow.experiment, artifact_location=cfg.mlflow.artifact_location
        )
    else:
        exp_id = exp.experiment_id
    run = mlflow.start_run(
        run_id=run_id, experiment_id=exp_id, run_name=None if run_id else run_name
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
    """runs:/<id>/<path> or models:/<name>/<version> -> the artifact's local path or s3:// URI."""
    import mlflow

    client = mlflow.MlflowClient()
    if uri.startswith("models:/"):
        name, _, version = uri[len("models:/") :].partition("/")
        source = client.get_model_version(name, version).source
        return (
            resolve_mlflow_uri(source)
            if source.startswith(("runs:/", "models:/"))
            else source.removeprefix("file://")
        )
    run_id, _, sub = uri[len("runs:/") :].partition("/")
    base = client.get_run(run_id).info.artifact_uri.removeprefix("file://")
    return io_stream.join(base, sub) if sub else base


def register_artifact(name: str, run_id: str, subpath: str) -> str:
    """Register runs:/<run>/<subpath> as a new version of model `name`; returns the version."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    return client.create_model_version(
        name, source=f"runs:/{run_id}/{subpath}", run_id=run_id
    ).version


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


def _unwrap(model):
    """The module inside a DistributedDataParallel wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _crash_hook(step: int, rank: int) -> None:
    """Test hook: WMTP_TEST_CRASH=STEP:RANK makes that rank die mid-checkpoint, before the manifest."""
    if os.environ.get("WMTP_TEST_CRASH") == f"{step}:{rank}":
        raise RuntimeError(f"WMTP_TEST_CRASH: rank {rank} stops while saving step {step}")


def save_train_state(path: str, model, opt, state: dict) -> None:
    """Checkpoint at `path` from every rank: model + optimizer (DCP shards when FSDP-sharded, else
    rank 0 alone), then `state` and, after a barrier, the manifest written last by rank 0."""
    import torch.distributed as dist

    rank, world = _rank_world()
    rngs = [rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
    state = {**state, "rng": rngs, "world_size": world}
    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    if is_sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.save(
            {"model": msd, "optim": osd["state"]},
            storage_writer=dcp_writer(io_stream.join(path, "dcp")),
        )
        state["optimizer_param_groups"] = osd["param_groups"]
    elif rank == 0:
        state["model"] = _unwrap(model).state_dict()
        state["optimizer"] = opt.state_dict()
    _crash_hook(state["step"], rank)
    if rank == 0:
        io_stream.save_ckpt(state, path, before_manifest=_barrier)
    else:
        _barrier()
    _barrier()


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


def prune_ckpts(root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints under root."""
    for old in io_stream.list_ckpts(root)[:-keep_last] if keep_last > 0 else []:
        io_stream.remove_ckpt(old)


def run_name_for(acc, run_name: str | None, algo: str) -> str:
    """train.run_name, or <algo>-<UTC timestamp> chosen on rank 0 and shared with every rank."""
    if run_name:
        return run_name
    from accelerate.utils import broadcast_object_list

    name = [f"{algo}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"]
    if acc.num_processes > 1:
        broadcast_object_list(name, from_process=0)
    return name[0]


def find_resume(resume: str | None, root: str, run_name: str | None, algo: str) -> str | None:
    """--resume auto: the newest complete checkpoint of train.run_name, or of the latest <algo>-* run
    that has one; --resume PATH: that checkpoint, which must be complete."""
    if resume is None:
        return None
    if resume != "auto":
        if not io_stream.exists(io_stream.join(resume, io_stream.MANIFEST)):
            raise FileNotFoundError(
                f"{resume}: not a complete checkpoint (no {io_stream.MANIFEST})"
            )
        return resume
    if run_name:
        return io_stream.latest_ckpt(io_stream.join(root, run_name))
    for name in reversed(io_stream.list_dir(root)):  # timestamped names sort by time
        if name.startswith(f"{algo}-"):
            found = io_stream.latest_ckpt(io_stream.join(root, name))
            if found:
                return found
    return None


def config_dict(cfg: Config) -> dict:
    """The config as plain JSON types, for checkpoints."""
    return msgspec.to_builtins(cfg)


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
