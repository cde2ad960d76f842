"""MLflow the MLflow way: artifacts on (moto) S3 reached from s3.endpoint_url alone, registered
models that mlflow.pyfunc.load_model loads, the final model's weights written once, runs named by
stage and linked, per-head figures, system metrics."""

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
import torch
import torch.nn.functional as F
from conftest import BUCKET, free_port
from helpers import CONFIG, TINY_MODEL
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import train_critic
import train_mtp
import wmtp_runs
import wmtp_train
from wmtp_model import byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    *TINY_MODEL,
    "train.max_steps=2",
    "train.plot_every=1",
    "critic.batch_size=2",
    "critic.max_steps=2",
    "critic.eval_every=2",
    "eval.max_new_tokens=8",
]


@pytest.fixture
def only_config_endpoint(monkeypatch, tmp_path):
    """No S3 endpoint in the environment (the conftest sets AWS_ENDPOINT_URL): only the config's;
    system metrics sampled fast; an empty current folder."""
    for var in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(var, "")  # so that teardown restores the variable's absence
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    monkeypatch.chdir(tmp_path)
    yield
    while mlflow.active_run():
        mlflow.end_run()


def greedy(folder: str, prompt: str, max_new: int) -> str:
    """Greedy completion by transformers alone: the final folder as a plain causal LM, argmax
    token by token from BOS + prompt, stopping at EOS."""
    tok = byte_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = [tok.bos_id, *tok.encode(prompt)]
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(lm(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            new.append(nxt)
    return tok.decode(new)


def test_mlflow_on_s3_from_the_config_endpoint_with_real_models(
    s3, s3_endpoint, boto, tmp_path, only_config_endpoint
):
    sets = [
        *TINY,
        f"s3.endpoint_url={s3_endpoint}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"mlflow.artifact_location={s3}/mlartifacts",
    ]
    setup = wmtp_train.setup
    config = os.path.join(ROOT, "config.yaml")
    stage1 = train_critic.train_critic(setup(argparse.Namespace(config=config, set=sets)))
    head_uri = f"models:/wmtp_critic_value_head/{stage1['version']}"
    sets += ["train.algo=critic", f"critic.value_head={head_uri}"]
    stage2 = train_mtp.train(setup(argparse.Namespace(config=config, set=sets)))
    client = mlflow.MlflowClient()
    run1, run2 = client.get_run(stage1["run_id"]), client.get_run(stage2["run_id"])

    # runs named by stage; stage 2 linked to the value head it used
    assert run1.info.run_name.startswith("critic-") and run1.data.tags["stage"] == "critic"
    assert run2.info.run_name.startswith("mtp-critic-") and run2.data.tags["stage"] == "mtp"
    assert run2.data.tags["value_head"] == head_uri
    assert run2.data.tags["value_head_run_id"] == stage1["run_id"]
    # system metrics on (sampled every 0.5 s: stage 2 runs long enough for a sample)
    assert "system/cpu_utilization_percentage" in run2.data.metrics

    # everything MLflow wrote went to the moto bucket (checked with boto3, not MLflow)
    keys = [o["Key"] for o in boto.list_objects_v2(Bucket=BUCKET)["Contents"]]
    prefix = f"mlartifacts/{stage2['run_id']}/artifacts/plots/"
    assert {prefix + "ce_heads.png", prefix + "weights_step_000001.png"} <= set(keys)
    head_model = [k for k in keys if k.endswith("/artifacts/artifacts/value_head.safetensors")]
    assert len(head_model) == 1 and head_model[0].startswith("mlartifacts/models/m-")

    # the final model's weights exist once: in <run>/final, which its MLflow model points at
    final = run2.data.tags["final_model"]
    assert final == os.path.join(stage2["run_dir"], "final") and os.path.isfile(
        os.path.join(final, "model.safetensors")
    )
    assert not [k for k in keys if k.endswith(".safetensors") and k not in head_model]
    mtp_uri = run2.data.tags["final_model_version"]
    assert mtp_uri.startswith("models:/wmtp_mtp_model/")
    assert wmtp_runs.resolve_mlflow_uri(mtp_uri) == final  # what eval_mtp.py --model reads

    # the registry's own loader: value head rows -> values, against the file by hand
    x = torch.randn(5, 32)
    got = mlflow.pyfunc.load_model(head_uri).predict(x.tolist())
    w = load_file(os.path.join(tmp_path, "runs", "value_head.safetensors"))
    want = F.gelu(x @ w["fc1.weight"].T + w["fc1.bias"]) @ w["fc2.weight"].T + w["fc2.bias"]
    torch.testing.assert_close(torch.tensor(got), want.squeeze(-1), rtol=1e-5, atol=1e-6)

    # and the final MTP model: prompts -> the greedy completion transformers gives
    prompts = ["def add(a, b):", "# sort a list\n"]
    got = mlflow.pyfunc.load_model(mtp_uri).predict(prompts)
    assert got == [greedy(final, p, 8) for p in prompts]

    # runs:/<stage-1 run>/value_head (the README's other spelling) reads the same head
    cfg = setup(
        argparse.Namespace(
            config=config,
            set=[*sets[:-1], f"critic.value_head=runs:/{stage1['run_id']}/value_head"],
        )
    )
    head, tags = train_mtp.load_value_head(cfg, 32)
    assert tags["value_head_run_id"] == stage1["run_id"]
    for name, t in head.state_dict().items():
        torch.testing.assert_close(t, w[name], rtol=0, atol=0)


def test_each_stage_reads_in_mlflow_as_its_users_read_it(tmp_path, only_config_endpoint, capfd):
    """Issue 23: the experiment marked as model training, prefixed metrics, datasets as inputs,
    a description, params as written and only the stage's own, no tags of pruned checkpoints,
    registered versions tagged and described, `mlflow.mtp_model: null` registering nothing,
    and none of MLflow's own lines (its "View run" link holds the tracking password)."""
    sets = [
        *TINY,
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "train.max_steps=3",
        "train.save_every=1",
        "train.keep_last=1",
    ]
    config = os.path.join(ROOT, "config.yaml")
    setup = wmtp_train.setup
    stage1 = train_critic.train_critic(setup(argparse.Namespace(config=config, set=sets)))
    stage2_sets = [*sets, "train.algo=critic", "mlflow.mtp_model=null"]
    stage2 = train_mtp.train(setup(argparse.Namespace(config=config, set=stage2_sets)))
    client = mlflow.MlflowClient()
    run1, run2 = client.get_run(stage1["run_id"]), client.get_run(stage2["run_id"])

    exp = client.get_experiment(run1.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    # every metric in a chart group of its own
    for run in (run1, run2):
        groups = {name.split("/")[0] for name in run.data.metrics if "/" in name}
        assert all("/" in name for name in run.data.metrics), sorted(run.data.metrics)
        assert groups <= {"train", "weights", "heldout", "time", "system"}
    assert {"train/value_loss", "heldout/value_loss"} <= set(run1.data.metrics)
    assert {"train/loss", "train/ce_head0", "heldout/ce", "time/tokens_per_s"} <= set(
        run2.data.metrics
    )

    # params: locations as the config wrote them, each stage only the keys it reads
    p1, p2 = run1.data.params, run2.data.params
    assert p1["paths.datasets.mbpp"] == p2["paths.datasets.mbpp"] == "pkg:wmtp_mbpp"
    assert "paths.datasets.humaneval" not in p1 and "paths.datasets.humaneval" not in p2
    assert not {"train.algo", "train.max_steps", "train.lr", "rho1.keep_ratio"} & set(p1)
    assert p1["critic.max_steps"] == "2" and p1["critic.batch_size"] == "2"
    assert p2["train.algo"] == "critic" and p2["train.max_steps"] == "3"
    assert not {"critic.patience", "critic.max_steps", "rho1.keep_ratio", "decode.compile"} & set(
        p2
    )

    # datasets as inputs: name, source and the sha256 of the file read (by hashlib here)
    def inputs(run) -> dict:
        return {
            d.dataset.name: (d.dataset.digest, d.dataset.source, [t.value for t in d.tags])
            for d in run.inputs.dataset_inputs
        }

    def digest(file: str) -> str:
        with open(os.path.join(ROOT, "wmtp_mbpp", file), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:36]

    train_json = os.path.join(ROOT, "wmtp_mbpp", "train.json")
    assert inputs(run1) == {
        "mbpp/train": (digest("train.json"), json.dumps({"uri": train_json}), ["training"])
    }
    got = inputs(run2)
    assert got["mbpp/train"][0] == digest("train.json") and got["mbpp/train"][2] == ["training"]
    assert got["mbpp/validation"][0] == digest("validation.json")
    assert got["mbpp/validation"][2] == ["heldout"]

    # a description on the run page
    assert run1.data.tags["mlflow.note.content"].startswith("Stage 1: a value head")
    note = run2.data.tags["mlflow.note.content"]
    assert "algorithm critic" in note and "mbpp" in note and "up to 3 steps" in note

    # keep_last 1: one checkpoint left, and one checkpoint tag
    ckpt_tags = {k: v for k, v in run2.data.tags.items() if k.startswith("checkpoint_step_")}
    assert ckpt_tags == {"checkpoint_step_3": os.path.join(stage2["run_dir"], "step_3")}
    assert sorted(f for f in os.listdir(stage2["run_dir"]) if f.startswith("step_")) == ["step_3"]

    # stage 1's registered version: tagged and described; stage 2 registered nothing
    version = client.get_model_version("wmtp_critic_value_head", stage1["version"])
    assert version.tags == {
        "run_id": stage1["run_id"],
        "stage": "critic",
        "steps": "2",
        "data": "mbpp",
    }
    assert version.description == run1.data.tags["mlflow.note.content"]
    assert client.search_registered_models("name = 'wmtp_mtp_model'") == []
    assert "final_model_version" not in run2.data.tags
    assert os.path.isfile(os.path.join(run2.data.tags["final_model"], "model.safetensors"))

    out = capfd.readouterr()
    for line in ("View run", "Successfully registered", "Created version", " INFO mlflow"):
        assert line not in out.out + out.err


@pytest.fixture
def tracking_server(tmp_path):
    """A real MLflow tracking server (`mlflow server`, SQLite behind it) on a free port."""
    port = free_port()
    server = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
            "--default-artifact-root", str(tmp_path / "server-artifacts"),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no MLflow server"
                time.sleep(0.3)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_the_tracking_password_is_never_printed(tracking_server, tmp_path):
    """Issue 24 item 11: MLflow prints `View run ... at: <tracking URI>` when a run ends, which
    for http://user:PASSWORD@host shows the password; the kit's own link is redacted."""
    uri = f"http://wmtp:s3cret-pw-123@127.0.0.1:{tracking_server}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    sets = [f"--set={s}" for s in TINY] + [f"--set=paths.value_head={tmp_path}/head.safetensors"]
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_critic.py"), "--config", CONFIG, *sets],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "s3cret-pw-123" not in out.stdout + out.stderr
    assert "View run" not in out.stdout
    assert f"http://***@127.0.0.1:{tracking_server}/#/experiments/" in out.stderr
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED"]
