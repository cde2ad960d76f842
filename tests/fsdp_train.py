"""`train_mtp.py` with accelerate in FSDP2 mode on CPU, for tests/test_distributed.py (under torchrun).

accelerate switches FSDP on only on GPUs; this sets the same FSDP2 plugin that fsdp.yaml describes on
a CPU (gloo) Accelerator, so the trainer's own FSDP code path — `prepare(model, optimizer)`,
sharded mtp_loss, DCP checkpoints, resume, gathering the final model — runs here unchanged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402

import train_mtp  # noqa: E402
import wmtp_train  # noqa: E402
from wmtp_train import run_cli  # noqa: E402


def fsdp_cpu_accelerator(cfg, grad_accum: int = 1) -> Accelerator:
    """A CPU Accelerator switched to FSDP2 with fsdp.yaml's plugin settings."""
    acc = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    for state in (AcceleratorState._shared_state, PartialState._shared_state):
        state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=True,
        reshard_after_forward=True,
    )
    assert acc.is_fsdp2
    return acc


if __name__ == "__main__":
    wmtp_train.make_accelerator = fsdp_cpu_accelerator  # train_mtp imports it when it trains
    run_cli(train_mtp.main)
