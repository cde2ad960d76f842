"""mtp_loss under FSDP2 on CPU (gloo, `torchrun --nproc_per_node 2`), for tests/test_train_ranks.py.

The sharded model is prepared by accelerate with the mixed-precision policy fsdp.yaml's bf16 gives
(bf16 parameters, gradient reduction and module outputs). Checks, on every rank: the loss and the
per-head CE come back in fp32, not rounded to bf16, and near the naive fp32 formula; the gradients
point where an unsharded fp32 model's do; the shared lm_head runs its forward, so FSDP's hooks for
it fire, and nothing warns that a module "did not run forward before backward".
"""

import logging
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.fsdp import MixedPrecisionPolicy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsdp_train import fsdp_cpu_accelerator  # noqa: E402
from fsdp_worker import DIMS, batch, full  # noqa: E402
from helpers import naive_ce  # noqa: E402

from wmtp_loss import mtp_loss  # noqa: E402
from wmtp_model import init_mtp_model  # noqa: E402


class Records(logging.Handler):
    """Keeps every log record (FSDP reports the un-run module through `logging`)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


PROBLEMS: list[str] = []


def check(cond: bool, what: str) -> None:
    """Note a failed check (all are reported at the end, so that each item shows on its own)."""
    if not cond:
        PROBLEMS.append(f"rank {dist.get_rank()}: {what}")


def main() -> None:
    acc = fsdp_cpu_accelerator(None)
    bf16 = torch.bfloat16
    acc.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=bf16, reduce_dtype=bf16, output_dtype=bf16
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = init_mtp_model(**DIMS, seed=0)
    model = fsdp2_prepare_model(acc, init_mtp_model(**DIMS, seed=0))
    ids, attn, labels = batch(rank)

    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    records = Records()
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # two steps: a warning may come once per process or once per step
            model.zero_grad()
            loss, head_ce = mtp_loss(model, ids, labels, attention_mask=attn)
            loss.backward()
    messages = records.messages + [str(w.message) for w in caught]
    check(calls, "lm_head never ran its forward (FSDP's hooks for it did not fire)")
    check(
        not any("did not run forward" in m for m in messages),
        f"FSDP warned: {[m for m in messages if 'did not run forward' in m]}",
    )

    valid = labels != -100
    with torch.no_grad():
        ce = naive_ce(ref, ids, attn, labels)
    check(loss.dtype == torch.float32, f"loss is {loss.dtype}")
    check(head_ce.dtype == torch.float32, f"per-head CE is {head_ce.dtype}")
    got = [loss.item(), *head_ce.tolist()]
    want = [ce[valid].mean().item()]
    want += [ce[..., k][valid[..., k]].mean().item() for k in range(labels.shape[-1])]
    for g, w in zip(got, want):  # bf16 compute: near the fp32 value, but not rounded to bf16
        check(abs(g - w) < 2e-2 * w, f"{g!r} is far from the naive {w!r}")
        check(g != torch.tensor(g).to(bf16).item(), f"{g!r} is rounded to bf16")

    # FSDP averages gradients over the ranks: the reference averages the per-rank losses
    for r in range(world):
        r_ids, r_attn, r_labels = batch(r)
        ce = naive_ce(ref, r_ids, r_attn, r_labels)
        (ce[r_labels != -100].mean() / world).backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        cos = F.cosine_similarity(full(p.grad).float().flatten(), grads[name].flatten(), dim=0)
        check(cos > 0.99, f"grad of {name} differs (cosine {cos.item():.4f})")
    dist.barrier()
    dist.destroy_process_group()
    for p in PROBLEMS:
        print(f"FAILED {p}", flush=True)
    if not PROBLEMS:
        print(f"rank {rank}: objectives FSDP checks passed", flush=True)
    # gloo's threads can abort a rank's interpreter teardown ("terminate called without an
    # active exception") after every check ran: leave without it, the result already printed
    os._exit(1 if PROBLEMS else 0)


if __name__ == "__main__":
    main()
