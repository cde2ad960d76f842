"""`train_mtp.py` with accelerate in FSDP2 mode on CPU, for tests/test_distributed.py (under torchrun).

accelerate switches FSDP on only on GPUs; this reads fsdp.yaml's FSDP2 plugin settings, as
`accelerate launch --config_file fsdp.yaml` does, onto a CPU (gloo) Accelerator and hands it to
the trainer (`train(..., accelerator=)`), so that the trainer's own FSDP code path —
`prepare(model, optimizer)`, sharded mtp_loss, DCP checkpoints, resume, gathering the final
model — runs here unchanged.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import yaml  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402

import train_mtp  # noqa: E402
from wmtp_cli import parse_args, run_cli  # noqa: E402
from wmtp_dist import end_distributed  # noqa: E402
from wmtp_train import setup  # noqa: E402

# the one fsdp_config key whose environment name accelerate launch spells differently
LAUNCH_ENV = {"fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP"}


def fsdp_cpu_accelerator(cfg, grad_accum: int = 1) -> Accelerator:
    """A CPU Accelerator switched to FSDP2 with fsdp.yaml's plugin settings (its `fsdp_config`
    keys become the FSDP_* environment that `accelerate launch` sets and the plugin reads)."""
    with open(os.path.join(ROOT, "fsdp.yaml")) as f:
        fsdp_config = yaml.safe_load(f)["fsdp_config"]
    for key, value in fsdp_config.items():
        name = LAUNCH_ENV.get(key, key.upper())
        os.environ[name] = str(value).lower() if isinstance(value, bool) else str(value)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    for state in (AcceleratorState._shared_state, PartialState._shared_state):
        state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin()
    assert acc.is_fsdp2
    return acc


def main(argv: list[str] | None = None) -> None:
    """train_mtp.main with the FSDP2 CPU accelerator."""
    args = parse_args(argv, "train_mtp.py under FSDP2 on CPU", with_algo=True)
    cfg = setup(args)
    train_mtp.train(
        cfg,
        args.resume,
        allow_changes=args.resume_with_changes,
        force_unlock=args.force_unlock,
        accelerator=fsdp_cpu_accelerator(cfg, cfg.train.grad_accum),
    )
    end_distributed()


if __name__ == "__main__":
    run_cli(main)
