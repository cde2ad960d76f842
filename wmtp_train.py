"""What both trainers share beyond the modules below them: the config and S3 at start, the models
they train and read (base, reference, reward), rewards, the LR schedule, throughput."""

from __future__ import annotations

import argparse
import time

import msgspec
import torch
import torch.distributed.checkpoint as dcp
from transformers import get_scheduler

import io_stream
from wmtp import Config, ConfigError, load_config
from wmtp_ckpt import dcp_reader, read_ckpt_meta
from wmtp_cli import config_overrides
from wmtp_dist import is_fsdp, rank0_reads_weights, shard_frozen
from wmtp_eval import causal_lm
from wmtp_model import (
    byte_tokenizer,
    init_mtp_model,
    load_model,
    load_tokenizer,
    same_tokenizer,
    weights_nbytes,
)

# ---------------------------------------------------------------------------------------------
# Start


def setup(args: argparse.Namespace) -> Config:
    """Load the config with overrides and point io_stream at the configured S3."""
    cfg = load_config(args.config, *config_overrides(args))
    io_stream.configure_s3(**msgspec.structs.asdict(cfg.s3))
    return cfg


# ---------------------------------------------------------------------------------------------
# Models


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


def head0_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head 0's final normed hidden state [B,S,D] (what a value head reads), without grad."""

    def run(m, ids, attn):
        h, ctx = m.run_trunk(ids, attn)
        return m.run_head(0, h, ctx)

    with torch.no_grad():
        return model(input_ids, attention_mask, fn=run)


def load_checkpoint_model(path: str):
    """(tokenizer, MTP model, step) of a training checkpoint <run>/step_N, on CPU in eval mode:
    the model its saved config describes, with the checkpoint's weights (one file, or the DCP
    shards of an FSDP run, read here by one process)."""
    meta = read_ckpt_meta(path)

    def plain(node):  # the manifest spells a tuple {"__tuple__": [...]}
        if isinstance(node, dict):
            return (
                node["__tuple__"]
                if node.keys() == {"__tuple__"}
                else {k: plain(v) for k, v in node.items()}
            )
        return node

    cfg = msgspec.convert(plain(meta["config"]), Config, strict=False)
    tokenizer, model = load_base(cfg, None, meta_weights=False)
    if "optimizer_param_groups" in meta:  # DCP shards: loading reshards them to this one process
        state = {"model": model.state_dict()}
        dcp.load(state, storage_reader=dcp_reader(io_stream.join(path, "dcp")))
        model.load_state_dict(state["model"])
    else:
        model.load_state_dict(io_stream.load_ckpt(path)["model"])
    return tokenizer, model.eval(), int(meta["step"])


# ---------------------------------------------------------------------------------------------
# Schedule and throughput


def compile_blocks(model) -> None:
    """train.compile: torch.compile each decoder block in place (trunk and heads), as torchtitan
    does: one graph per block shape is compiled once and reused by every block, while the loss
    (chunked, with its custom autograd) and the FSDP hooks stay eager."""
    for block in [*model.layers, *model.heads]:
        block.compile()


def lr_schedule(opt, schedule: str, warmup: int, total: int):
    """transformers' schedule: linear warmup from 0 over `warmup` optimizer steps, then cosine to
    0 at step `total`, or constant. A LambdaLR whose state is its step count: a resume that loads
    that state continues it exactly."""
    name = "cosine" if schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)


class Throughput:
    """Tokens per second of training steps over the last logging window: time spent on
    checkpoints and evaluations is left out (`exclude`). Counts may be device tensors: they are
    read once, when the rate is."""

    def __init__(self) -> None:
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, n) -> None:
        self.tokens = self.tokens + n

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (a checkpoint, an evaluation) out of the window."""
        self.t0 += seconds

    def rate(self) -> float:
        now = time.perf_counter()
        r = float(self.tokens) / max(now - self.t0, 1e-9)
        self.tokens, self.t0 = 0, now
        return r
