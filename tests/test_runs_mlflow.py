"""MLflow the MLflow way: artifacts on (moto) S3 reached from s3.endpoint_url alone, registered
models that mlflow.pyfunc.load_model loads, the final model's weights written once, runs named by
stage and linked, per-head figures, system metrics."""

import argparse
import os

import mlflow
import pytest
import torch
import torch.nn.functional as F
from conftest import BUCKET
from helpers import TINY_MODEL
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
