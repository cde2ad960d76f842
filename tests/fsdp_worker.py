"""FSDP2 on CPU with gloo, run by tests/test_distributed.py under `torchrun --nproc_per_node 2`.

accelerate turns FSDP on only on accelerators, so this worker gives a CPU Accelerator the FSDP2
plugin that fsdp.yaml describes and shards with accelerate's own `fsdp2_prepare_model` (each
LlamaDecoderLayer, the embedding, [norm, lm_head], the root; cpu_ram_efficient_loading). It checks,
against an unsharded copy on every rank: rank-0-only weight loading (rank 1 reads no weights),
mtp_loss gradients, an optimizer step, the kit's DCP checkpoint round trip to the given location
(S3 or local), resume, and the final model gathered on rank 0.
"""

import os
import sys

import torch
import torch.distributed as dist
from accelerate.utils.fsdp_utils import fsdp2_prepare_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fsdp_train import fsdp_cpu_accelerator  # noqa: E402  (tests/, the script's own folder)

import io_stream  # noqa: E402
from wmtp_ckpt import load_train_state, save_train_state  # noqa: E402
from wmtp_dist import full_model_on_rank0  # noqa: E402
from wmtp_loss import mtp_loss, mtp_targets  # noqa: E402
from wmtp_model import byte_tokenizer, init_mtp_model, load_model, save_model  # noqa: E402

DIMS = dict(
    vocab_size=259, dim=32, n_layers=5, n_heads=4, n_attn_heads=2, n_kv_heads=1, max_seq_len=64
)


def batch(rank: int):
    """Rank r's batch: random ids, the second row right-padded, loss on all but the first 3 tokens."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(3, 259, (2, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    loss_mask = attn.bool().clone()
    loss_mask[:, :3] = False
    return ids, attn, mtp_targets(ids, loss_mask, 4)


def weights(ce, hidden):
    """A weight function that uses both of its inputs (as rho1 and critic weights do)."""
    return ce + hidden.pow(2).mean(-1, keepdim=True)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: {what}")


def main(out: str) -> None:
    acc = fsdp_cpu_accelerator(None)
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = init_mtp_model(**DIMS, seed=0)
    if rank == 0:
        save_model(ref, io_stream.join(out, "base"), byte_tokenizer())
    dist.barrier()
    # rank 0 reads the weights; rank 1 builds the model on the meta device and receives them
    base = load_model(io_stream.join(out, "base"), meta_weights=rank != 0)
    check((base.lm_head.weight.device.type == "meta") == (rank != 0), "meta_weights placement")

    def shard(m):
        return fsdp2_prepare_model(acc, m)

    model = shard(base)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        check(torch.equal(full(p), q), f"{name} was not broadcast from rank 0")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    # FSDP averages gradients over ranks: the reference averages the per-rank losses
    for r in range(world):
        ids, attn, labels = batch(r)
        (mtp_loss(ref, ids, labels, weights=weights, attention_mask=attn)[0] / world).backward()
    ids, attn, labels = batch(rank)
    mtp_loss(model, ids, labels, weights=weights, attention_mask=attn)[0].backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        check(
            torch.allclose(full(p.grad), ref_grads[name], rtol=1e-4, atol=1e-6),
            f"grad of {name} differs",
        )
    ref_opt.step()
    opt.step()
    if rank == 0:  # for the test's single-process (resharded) load
        io_stream.write_safetensors(
            ref.state_dict(), io_stream.join(out, "reference_step_1.safetensors")
        )

    save_train_state(io_stream.join(out, "step_1"), model, opt, {"step": 1, "note": "fsdp"})
    check(io_stream.latest_ckpt(out).endswith("step_1"), "checkpoint not complete")

    fresh = shard(init_mtp_model(**DIMS, seed=7))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = load_train_state(io_stream.join(out, "step_1"), fresh, fresh_opt)
    check(state["note"] == "fsdp" and state["world_size"] == world, "manifest state lost")
    for (name, p), q, r in zip(fresh.named_parameters(), model.parameters(), ref.parameters()):
        check(torch.equal(full(p), full(q)), f"resumed {name} differs from the saved model")
        check(
            torch.allclose(full(p), r, atol=1e-5),
            f"resumed {name} differs from the reference: {(full(p) - r).abs().max()}",
        )
    ref_state = ref_opt.state_dict()["state"]
    for i, p in enumerate(fresh.parameters()):
        got = fresh_opt.state[p]
        check(
            torch.allclose(full(got["exp_avg_sq"]), ref_state[i]["exp_avg_sq"], atol=1e-9),
            f"exp_avg_sq {i}",
        )
        check(int(got["step"]) == 1, "optimizer step count")

    # one more step each: the resumed sharded model keeps training like the reference
    ref_opt.zero_grad()
    for r in range(world):
        ids, attn, labels = batch(r)
        (mtp_loss(ref, ids, labels, attention_mask=attn)[0] / world).backward()
    ids, attn, labels = batch(rank)
    mtp_loss(fresh, ids, labels, attention_mask=attn)[0].backward()
    ref_opt.step()
    fresh_opt.step()

    gathered = full_model_on_rank0(fresh)
    if rank == 0:
        save_model(gathered, io_stream.join(out, "final"), byte_tokenizer())
        loaded = load_model(io_stream.join(out, "final"))
        for (name, p), q in zip(loaded.named_parameters(), ref.parameters()):
            check(
                torch.allclose(p, q, rtol=1e-4, atol=1e-5),
                f"final {name} differs from the reference",
            )
    else:
        check(gathered is None, "only rank 0 gets the gathered model")
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: FSDP checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
