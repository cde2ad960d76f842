"""Multi-process tests on CPU with gloo: both trainers under torchrun (accelerate's DDP) with checkpoints
on the moto S3 server, a crash mid-checkpoint and exact resume; the same under FSDP2.

On CPU, `accelerate launch --cpu` starts a single process and accelerate enables FSDP only on
accelerators. So the DDP runs use torchrun; the FSDP2 runs use tests/fsdp_train.py (the trainer with
fsdp.yaml's FSDP2 plugin set on a CPU Accelerator) and tests/fsdp_worker.py (accelerate's
fsdp2_prepare_model checked against an unsharded model).
"""

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch
from conftest import free_port
from helpers import TINY, tiny_model, write_dataset

import eval_mtp
import io_stream
from wmtp import load_config
from wmtp_ckpt import load_train_state
from wmtp_data import iter_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script: str, args: list[str], cwd, env_extra=None) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node 2 SCRIPT ARGS: accelerate's DDP over gloo on CPU."""
    # mlflow.set_tracking_uri in earlier in-process tests exports MLFLOW_TRACKING_URI: drop it
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"PYTHONPATH": ROOT, **(env_extra or {})}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), os.path.join(ROOT, script), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def settings(s3: str, tmp_path, run_name: str) -> list[str]:
    """--set arguments: tiny model, data and checkpoints on S3, MLflow on a local SQLite file."""
    data = f"{s3}/data/train.jsonl"
    if not io_stream.exists(data):
        write_dataset(data, n=40)
    sets = [
        *TINY,
        f"paths.datasets={{toy: {data}}}",
        "data.heldout=[]",
        "data.train=[toy]",
        f"paths.checkpoints={s3}/ckpt",
        f"paths.value_head={s3}/vh/value_head.safetensors",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"mlflow.artifact_location={tmp_path}/mlartifacts",
        "train.max_steps=6",
        "train.save_every=2",
        "train.keep_last=5",
        f"train.run_name={run_name}",
    ]
    return ["--config", os.path.join(ROOT, "config.yaml"), *(a for s in sets for a in ("--set", s))]


def losses_by_step(client, run_id: str) -> dict[int, float]:
    """The last logged loss of each step (a resumed run re-logs the steps after its checkpoint)."""
    return {
        m.step: m.value
        for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp)
    }


def test_two_processes_crash_mid_checkpoint_and_resume_exactly(s3, tmp_path):
    full = launch("train_mtp.py", settings(s3, tmp_path, "full"), tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = launch(
        "train_mtp.py", settings(s3, tmp_path, "cut"), tmp_path, {"WMTP_TEST_CRASH": "4:1"}
    )
    assert crashed.returncode != 0 and "WMTP_TEST_CRASH" in crashed.stderr
    assert not io_stream.exists(f"{s3}/ckpt/cut/step_4/manifest.json")
    assert io_stream.latest_ckpt(f"{s3}/ckpt/cut") == f"{s3}/ckpt/cut/step_2"
    resumed = launch("train_mtp.py", [*settings(s3, tmp_path, "cut"), "--resume", "auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("wmtp").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["cut", "full"]  # rank 1 never opened a run
    by_name = {r.info.run_name: r for r in runs}
    history = client.get_metric_history(by_name["full"].info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]  # logged once per step: rank 0 only
    expected = losses_by_step(client, by_name["full"].info.run_id)
    assert losses_by_step(client, by_name["cut"].info.run_id) == expected
    assert by_name["cut"].data.tags["world_size"] == "2"
    state = io_stream.load_ckpt(f"{s3}/ckpt/cut/step_6")
    assert (
        state["world_size"] == 2 and len(state["rng"]) == 2 and state["examples_done"] == 6 * 2 * 2
    )
    assert io_stream.exists(f"{s3}/ckpt/cut/final/mtp.json")


def test_trainer_under_fsdp2_crash_and_exact_resume(s3, tmp_path):
    """The trainer's own FSDP2 path (tests/fsdp_train.py): DCP shards on S3, crash, exact resume."""
    full = launch("tests/fsdp_train.py", settings(s3, tmp_path, "full"), tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    names = io_stream.list_dir(f"{s3}/ckpt/full/step_2/dcp")
    assert ".metadata" in names and sum(n.endswith(".distcp") for n in names) == 2
    crashed = launch(
        "tests/fsdp_train.py", settings(s3, tmp_path, "cut"), tmp_path, {"WMTP_TEST_CRASH": "4:1"}
    )
    assert crashed.returncode != 0 and "WMTP_TEST_CRASH" in crashed.stderr
    assert io_stream.list_dir(f"{s3}/ckpt/cut/step_4/dcp")  # shards written, manifest not
    assert io_stream.latest_ckpt(f"{s3}/ckpt/cut") == f"{s3}/ckpt/cut/step_2"
    resumed = launch(
        "tests/fsdp_train.py", [*settings(s3, tmp_path, "cut"), "--resume", "auto"], tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("wmtp").experiment_id
    by_name = {r.info.run_name: r.info.run_id for r in client.search_runs([exp])}
    assert losses_by_step(client, by_name["cut"]) == losses_by_step(client, by_name["full"])
    assert io_stream.exists(f"{s3}/ckpt/cut/final/mtp.json")

    # the DCP checkpoint of the last step evaluates (read by one process) as its final model does
    argv = settings(s3, tmp_path, "full") + [
        "--data", "mbpp", "--limit", "2", "--set", "paths.datasets.mbpp=pkg:wmtp_mbpp",
        "--set", "eval.max_new_tokens=12",
    ]  # fmt: skip
    completions = {}
    for model in ("step_6", "final"):
        out = tmp_path / f"eval-{model}"
        eval_mtp.main([*argv, "--model", f"{s3}/ckpt/full/{model}", "--out", str(out)])
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        # rows are written as their checks finish, so in no fixed order
        completions[model] = {(r["task_id"], r["sample"]): r["completion"] for r in rows}
    assert completions["step_6"] == completions["final"] and len(completions["final"]) == 2
    assert json.loads((tmp_path / "eval-step_6" / "settings.json").read_text())["step"] == 6


def test_two_process_critic_then_critic_weighted_training(s3, tmp_path):
    critic = launch("train_critic.py", settings(s3, tmp_path, "c"), tmp_path)
    assert critic.returncode == 0, critic.stderr[-3000:]
    assert io_stream.exists(f"{s3}/vh/value_head.safetensors")
    stage2 = launch(
        "train_mtp.py",
        [*settings(s3, tmp_path, "w"), "--algo", "critic", "--set", "critic.value_coef=0.5"],
        tmp_path,
    )
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    # the value head kept learning and stayed identical on both ranks (only rank 0 saves it)
    trained = io_stream.read_safetensors(f"{s3}/ckpt/w/value_head.safetensors")
    start = io_stream.read_safetensors(f"{s3}/vh/value_head.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_each_rank_gets_different_data_and_resume_skips_for_any_world_size(tmp_path):
    data = str(tmp_path / "d.jsonl")
    write_dataset(data, n=24)
    cfg = load_config(
        os.path.join(ROOT, "config.yaml"),
        [
            f"paths.datasets={{toy: {data}}}",
            "data.heldout=[]",
            "data.train=[toy]",
            "data.max_length=64",
        ],
    )
    from wmtp_model import byte_tokenizer

    tok = byte_tokenizer()

    def ids(batches):
        return [
            tok.decode([i for i in row.tolist() if i > 2])
            for b in batches
            for row in b["input_ids"]
        ]

    r0 = ids(iter_batches(cfg, tok, 2, epoch=0, rank=0, world=2))
    r1 = ids(iter_batches(cfg, tok, 2, epoch=0, rank=1, world=2))
    single = ids(iter_batches(cfg, tok, 2, epoch=0))
    assert len(r0) == len(r1) == 12 and not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(single)
    # 2 steps of world 2 consumed 8 examples; a world-1 resume continues with the 9th
    assert ids(iter_batches(cfg, tok, 2, epoch=0, skip_examples=8)) == single[8:]
    assert ids(iter_batches(cfg, tok, 2, epoch=1)) != single  # a new order each epoch


def test_fsdp2_sharded_training_and_checkpoints(s3, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        os.path.join(ROOT, "tests", "fsdp_worker.py"),
        f"{s3}/fsdp",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert r.stdout.count("FSDP checks passed") == 2
    names = io_stream.list_dir(f"{s3}/fsdp/step_1/dcp")
    assert (
        ".metadata" in names and sum(n.endswith(".distcp") for n in names) == 2
    )  # one shard file per rank
    manifest = json.loads(io_stream.read_bytes(f"{s3}/fsdp/step_1/manifest.json"))
    assert "optimizer_param_groups" in manifest["state"]
    # the 2-rank sharded checkpoint loads into one unsharded process (DCP reshards)
    model = tiny_model(seed=9, max_seq_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = load_train_state(f"{s3}/fsdp/step_1", model, opt)
    assert state["world_size"] == 2
    reference = io_stream.read_safetensors(f"{s3}/fsdp/reference_step_1.safetensors")
    for name, p in model.state_dict().items():
        assert torch.allclose(p, reference[name], atol=1e-5), name
    assert all(int(s["step"]) == 1 for s in opt.state.values())


@pytest.fixture(autouse=True)
def _no_active_run():
    yield
    while mlflow.active_run():
        mlflow.end_run()
