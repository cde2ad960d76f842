"""Issue 12's multi-process and fresh-process checks (torchrun over gloo on CPU, like
tests/test_distributed.py): ranks stop stage 1 together, accumulation and ranks give the same
update (the value head's too, through DDP: issue 23), bf16 autocast trains fp32 masters, fp32
losses and lm_head hooks under FSDP2."""

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch
from conftest import free_port
from helpers import TINY, make_config, naive_ce, run_stage2, tiny_model, write_dataset
from test_distributed import launch
from test_train_objectives import (
    CONFIG,
    ROOT,
    assert_fp32_masters_moved,
    bf16_base_run,
    value_reference,
)

import io_stream
import train_critic
import wmtp_data
from wmtp import load_config
from wmtp_data import encode, iter_dataset
from wmtp_loss import ValueHead, mtp_targets
from wmtp_model import byte_tokenizer, load_model

pytestmark = pytest.mark.usefixtures("clean_mlflow")  # conftest: own tracking URI, no run left


def test_two_rank_critic_stops_together_and_scores_every_heldout_example(tmp_path):
    """Stage 1 on 2 processes: early stopping decided on global held-out sums, identically on
    both ranks (no rank left waiting in an all-reduce), and the held-out metrics are the
    one-process values over every held-out example."""
    data = str(tmp_path / "d.jsonl")
    write_dataset(data, n=40)
    sets = [
        *TINY,
        f"paths.datasets={{toy: {data}}}",
        "data.heldout=[]",
        "data.train=[toy]",
        "data.heldout_fraction=0.5",
        f"paths.value_head={tmp_path / 'vh.safetensors'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"mlflow.artifact_location={tmp_path}/mlartifacts",
        "critic.max_steps=40",
        "critic.eval_every=1",
        "critic.patience=1",
        "critic.min_delta=0",
        "critic.batch_size=3",
        "critic.lr=5e-3",  # per-rank decisions disagree here: one rank left the loop, one hung
    ]
    args = ["--config", CONFIG, *(a for s in sets for a in ("--set", s))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = ROOT
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), os.path.join(ROOT, "tests", "critic_worker.py"), *args,
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert sorted(x["rank"] for x in ranks) == [0, 1]
    assert ranks[0]["steps"] == ranks[1]["steps"] < 40  # stopped early, at the same step
    cfg = load_config(CONFIG, sets)
    head = ValueHead(32)
    head.load_state_dict(io_stream.read_safetensors(cfg.paths.value_head))
    G, V = value_reference(
        tiny_model(seed=cfg.train.seed), head, wmtp_data.iter_examples(cfg, "heldout"), 96, 0.99
    )
    for x in ranks:
        assert x["heldout_value_loss"] == pytest.approx(((G - V) ** 2).mean().item(), rel=1e-4)


def test_two_rank_critic_trains_the_head_of_one_rank_with_twice_the_batch(tmp_path):
    """Stage 1 on 2 processes x batch 3 and on 1 process x batch 6 (the same six examples per step,
    four steps) write the same value head: DDP averages the ranks' gradients and critic_step's
    factor num_processes turns that average into the gradient of one mean over every token."""
    data = str(tmp_path / "d.jsonl")
    write_dataset(data, n=30)  # completions of different lengths: per-rank means would differ

    def sets(name: str, batch: int) -> list[str]:
        return [
            *TINY,
            f"paths.datasets={{toy: {data}}}",
            "data.heldout=[]",
            "data.train=[toy]",
            "data.heldout_fraction=0",  # no early stopping: the head after the last step is saved
            f"paths.value_head={tmp_path / name / 'vh.safetensors'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"mlflow.artifact_location={tmp_path}/mlartifacts",
            "mlflow.value_head_model=null",
            "critic.max_steps=4",
            "critic.eval_every=4",
            f"critic.batch_size={batch}",
            "critic.lr=5e-3",
        ]

    two = sets("two", 3)
    r = launch(
        "train_critic.py", ["--config", CONFIG, *(a for s in two for a in ("--set", s))], tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    one = train_critic.train_critic(load_config(CONFIG, sets("one", 6)))
    assert len(one["losses"]) == 4
    assert one["losses"][-1] < one["losses"][0]  # the head learned
    heads = {
        n: io_stream.read_safetensors(str(tmp_path / n / "vh.safetensors")) for n in ("one", "two")
    }
    assert heads["one"].keys() == heads["two"].keys()
    for key, p in heads["one"].items():
        torch.testing.assert_close(heads["two"][key], p, atol=1e-6, rtol=0, msg=key)


def write_four_examples(path) -> None:
    """Two short and two long examples: per-micro-batch means would weigh their slots unequally."""
    recs = [
        {"prompt": "# a\n", "completion": "x = 1\n", "label": 1.0},
        {"prompt": "# b\n", "completion": "y = 2\n", "label": 0.0},
        {"prompt": "# c\n", "completion": "def f(x):\n    s = 0\n    for i in x:\n"
         "        s += i * i\n    return s\n", "label": 1.0},
        {"prompt": "# d\n", "completion": "def g(a, b):\n    while b:\n        a, b = b, a % b\n"
         "    return a\n", "label": 0.0},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_accumulation_and_ranks_give_the_same_update(tmp_path):
    """Batch 4 x accumulation 1, batch 2 x accumulation 2, batch 1 x accumulation 4, 2 ranks x
    batch 2 (DDP), 2 ranks x batch 2 under FSDP2 and 2 ranks x batch 1 x accumulation 2 train one
    step from the same four examples (critic weights, the value head trained alongside) and end
    with the same weights, the same logged loss and the same held-out CE (five examples: one rank
    scores three, the other two, and both equal the naive CE of the final model). The value head
    ends the same wherever its micro-batches are the same (its loss is a mean per micro-batch),
    and its DDP wrapper all-reduces once per optimizer step however many micro-batches."""
    data = tmp_path / "four.jsonl"
    write_four_examples(data)
    held = tmp_path / "held"
    held.mkdir()
    write_four_examples(held / "validation.jsonl")
    with open(held / "validation.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "# e\n", "completion": "print(3)\n"}) + "\n")
    torch.manual_seed(5)
    vh = str(tmp_path / "vh.safetensors")
    io_stream.write_safetensors(ValueHead(32).state_dict(), vh)
    common = make_config(
        str(tmp_path),
        tmp_path,
        f"paths.datasets={{toy: {data}, held: {held}}}",
        "data.heldout=[held]",
        "data.shuffle=false",
        "train.algo=critic",
        f"critic.value_head={vh}",
        "critic.temperature=0.3",
        "train.max_steps=1",
        "train.save_every=100",
        "train.lr=1e-2",
        "train.warmup_steps=0",  # the first step at the full lr
        "critic.value_coef=0.5",  # the value head trains too (its own AdamW)
        "critic.value_lr=1e-2",
    )
    runs = {
        "b4": run_stage2([*common, "train.batch_size=4", "train.run_name=b4"]),
        "b2a2": run_stage2([*common, "train.batch_size=2", "train.grad_accum=2", "train.run_name=b2a2"]),
        "b1a4": run_stage2([*common, "train.batch_size=1", "train.grad_accum=4", "train.run_name=b1a4"]),
    }  # fmt: skip
    args = ["--config", CONFIG, *(a for s in common for a in ("--set", s))]
    for name, script, extra in (
        ("ddp", "train_mtp.py", []),
        ("fsdp", "tests/fsdp_train.py", []),
        ("ddp_a2", "tests/value_ddp_train.py", ["train.batch_size=1", "train.grad_accum=2"]),
    ):
        sets = [a for s in [f"train.run_name={name}", *extra] for a in ("--set", s)]
        r = launch(script, [*args, *sets], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    counts = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    # one all-reduce of the head's gradients for the step's two micro-batches, on both ranks
    assert sorted((x["rank"], x["value_head_allreduces"]) for x in counts) == [(0, 1), (1, 1)]
    finals = {
        name: load_model(str(tmp_path / "ckpt" / name / "final"))
        for name in ("b4", "b2a2", "b1a4", "ddp", "fsdp", "ddp_a2")
    }
    # AdamW's first step moves an entry by lr·g/(|g| + 1e-8): float noise in a gradient near 1e-8
    # moves a few dozen entries by up to a few % of lr; a mis-weighted objective (per-micro-batch means:
    # 56 and 532 slots here) moves ~29,000 of the 155,168 by more than 5 % of lr, up to 2·lr
    start = tiny_model(seed=42)  # the config's random model (train.seed 42)
    for name, model in finals.items():
        off, moved = 0, 0
        for (key, p), q, p0 in zip(
            model.named_parameters(), finals["b4"].parameters(), start.parameters()
        ):
            torch.testing.assert_close(p, q, atol=0.05 * 1e-2, rtol=0, msg=f"{name}: {key}")
            off += int(((p - q).abs() > 1e-6).sum())
            moved += int((p != p0).sum())
        assert off < 200 and moved > 100_000, (name, off, moved)  # vs ~69,000 off with the bug
    # the value head (rank 0's, saved at the end): its loss is a mean over each micro-batch's
    # tokens, so b2a2, ddp and fsdp (micro-batches of examples 1-2 and 3-4) train the same head, and
    # b1a4 and ddp_a2 (one example each); DDP averages over the ranks what accumulation adds up
    start = io_stream.read_safetensors(vh)
    heads = {
        name: io_stream.read_safetensors(str(tmp_path / "ckpt" / name / "value_head.safetensors"))
        for name in finals
    }
    for name, like in (("ddp", "b2a2"), ("fsdp", "b2a2"), ("ddp_a2", "b1a4")):
        for key, p in heads[name].items():
            torch.testing.assert_close(p, heads[like][key], atol=1e-6, rtol=0, msg=f"{name}: {key}")
    for name, head in heads.items():
        assert all(not torch.equal(head[k], start[k]) for k in start), name  # every tensor moved
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("wmtp").experiment_id
    logged = {r.info.run_name: r.data.metrics["train/loss"] for r in client.search_runs([exp])}
    for name in finals:
        assert logged[name] == pytest.approx(logged["b4"], rel=1e-5), name
    assert runs["b4"]["losses"][0] == pytest.approx(logged["b4"])

    # held-out CE: the same on every world size, and the naive CE of the final model
    tok, H = byte_tokenizer(), 4
    sums, slots = torch.zeros(H, dtype=torch.float64), torch.zeros(H, dtype=torch.float64)
    for ex in iter_dataset(str(held), "validation"):
        ids, mask, _ = encode(tok, ex, 96, prompt_loss=False)
        ids, mask = ids[None], mask[None]
        labels = mtp_targets(ids, mask, H)
        with torch.no_grad():
            ce = naive_ce(finals["b4"], ids, None, labels)
        sums += ce.double().sum((0, 1))
        slots += (labels != -100).sum((0, 1)).double()
    naive = (sums / slots).tolist()
    for run in client.search_runs([exp]):
        got = [run.data.metrics[f"heldout/ce_head{k}"] for k in range(H)]
        assert got == pytest.approx(naive, rel=1e-5), run.info.run_name
        assert run.data.metrics["heldout/ce"] == pytest.approx(sum(naive) / H, rel=1e-5)


def test_bf16_autocast_trains_fp32_master_weights_and_optimizer_state(tmp_path):
    """train.mixed_precision bf16: compute in bf16 through autocast, masters and AdamW in fp32
    (accelerate sets the precision once per process, hence a fresh one)."""
    base, overrides = bf16_base_run(tmp_path, "bf16")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, os.path.join(ROOT, "train_mtp.py"), "--config", CONFIG, *sets]
    r = subprocess.run(
        cmd, cwd=tmp_path, env=env | {"PYTHONPATH": ROOT}, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert_fp32_masters_moved(tmp_path, base)


def test_fsdp2_losses_are_fp32_and_lm_head_runs_forward(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), os.path.join(ROOT, "tests", "fsdp_objectives_worker.py"),
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "FAILED" not in r.stdout, r.stdout
    assert r.stdout.count("objectives FSDP checks passed") == 2
