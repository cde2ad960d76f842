"""The accelerator and the distributed helpers: rank-0 messages, shared values, FSDP checks,
the value head's DDP wrapper, gathering a sharded model. Every function works on one process too
(world size 1)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, broadcast_object_list
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from wmtp_cli import LOGGER
from wmtp_model import MTPModel

if TYPE_CHECKING:
    from wmtp import Config


# ---------------------------------------------------------------------------------------------
# Messages (rank 0)


log = get_logger(LOGGER)  # INFO on rank 0 only; run_cli prints it, --quiet silences it


def quiet() -> bool:
    """--quiet: the kit's logger is set above INFO (then no progress bar either)."""
    return log.logger.level > logging.INFO


# ---------------------------------------------------------------------------------------------
# The accelerator
#
# train.deterministic: what a bit-exact rerun or resume on GPU needs (torchtitan's list): every op's
# deterministic kernel (an error for an op that has none), cuBLAS with a fixed workspace (set before
# its first handle exists), no cuDNN autotuning, and no flash-attention backward (its atomic adds
# reorder sums); SDPA then uses the memory-efficient kernel in its deterministic mode.


def set_determinism(deterministic: bool) -> None:
    """Switch this process to deterministic kernels (train.deterministic); nothing when False."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(False)


def make_accelerator(cfg: Config, grad_accum: int = 1):
    """Accelerator with mixed precision from config (auto = bf16 on GPU, fp32 on CPU). Without a GPU,
    processes started by torchrun form a gloo group (`accelerate launch --cpu` starts only one)."""
    set_determinism(cfg.train.deterministic)
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(
        mixed_precision=mp,
        gradient_accumulation_steps=grad_accum,
        cpu=not torch.cuda.is_available(),
    )


def is_fsdp(acc) -> bool:
    """True for an FSDP run (accelerate launch --config_file fsdp.yaml)."""
    return acc.distributed_type == DistributedType.FSDP


def is_sharded(model) -> bool:
    """True for an FSDP2-sharded model (its checkpoints go through torch.distributed.checkpoint)."""
    return isinstance(model, FSDPModule)


def rank0_reads_weights(acc) -> bool:
    """True when FSDP's cpu_ram_efficient_loading broadcasts rank 0's weights to the other ranks."""
    return is_fsdp(acc) and bool(acc.state.fsdp_plugin.cpu_ram_efficient_loading)


def shard_frozen(acc, model):
    """FSDP2-shard a frozen model the way accelerate shards the trained one (no optimizer needed)."""
    return fsdp2_prepare_model(acc, model)


# ---------------------------------------------------------------------------------------------
# Collectives


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def shared_value(acc, compute: Callable):
    """compute() on rank 0, the same value on every rank."""
    if acc.num_processes == 1:
        return compute()
    box = [compute() if acc.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def replicate(acc, module: torch.nn.Module) -> DistributedDataParallel | None:
    """A small module kept whole on every rank (the value head) in a DistributedDataParallel
    wrapper, whose backward averages its gradients over the ranks; None with one process. Run
    forward and backward through the wrapper (its no_sync() for micro-batches before a step's
    last); save, load and optimize the module itself. Not acc.prepare: that would autocast the
    fp32 module and, under FSDP2, shard it."""
    if acc.num_processes == 1:
        return None
    device_ids = [acc.device] if acc.device.type == "cuda" else None  # CPU (gloo): none
    return DistributedDataParallel(module, device_ids=device_ids)


def end_distributed() -> None:
    """Leave the process group once every rank is done (a process that exits with the group's
    threads still alive can abort with "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Whole models


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_model_on_rank0(model):
    """The whole model on CPU on rank 0 (gathered from FSDP shards when sharded), None elsewhere."""
    rank, _ = rank_world()
    if not is_sharded(model):
        return unwrap(model) if rank == 0 else None
    sd = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank != 0:
        return None
    with torch.device("meta"):
        full = MTPModel(model.config, model.n_heads)
    full.load_state_dict(sd, assign=True)
    return full
