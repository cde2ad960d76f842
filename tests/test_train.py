"""End-to-end tests of both training stages: local and S3 paths, MLflow, checkpoints, exact resume, errors."""

import math
import os
import subprocess
import sys

import mlflow
import pytest
import torch
from helpers import ROOT, TINY, make_config, run_stage2, tiny_model, write_dataset, write_reference

import io_stream
import train_critic
import train_mtp
from wmtp import load_config
from wmtp_cli import run_cli as run_trainer
from wmtp_model import byte_tokenizer, load_tokenizer, save_model
from wmtp_runs import resolve_mlflow_uri

pytestmark = pytest.mark.usefixtures("clean_mlflow")  # conftest: own tracking URI, no run left


@pytest.mark.parametrize("algo", ["baseline", "critic", "rho1-weighted", "rho1-tokenskip"])
def test_every_algo_trains_locally(algo, tmp_path):
    base = str(tmp_path / "out")
    extra = [f"train.algo={algo}", "train.max_steps=4", "train.save_every=2", "train.run_name=r"]
    if algo == "critic":
        cfg = load_config(os.path.join(ROOT, "config.yaml"), make_config(base, tmp_path))
        res = train_critic.train_critic(cfg)
        assert io_stream.exists(res["value_head"]) and all(math.isfinite(v) for v in res["losses"])
    if algo.startswith("rho1"):
        write_reference(str(tmp_path / "ref"))
        extra.append(f"paths.models.ref={tmp_path / 'ref'}")
    out = run_stage2(make_config(base, tmp_path, *extra))
    assert len(out["losses"]) == 4 and all(math.isfinite(v) for v in out["losses"])
    assert [os.path.basename(p) for p in io_stream.list_ckpts(out["run_dir"])] == [
        "step_2",
        "step_4",
    ]
    assert io_stream.exists(io_stream.join(out["run_dir"], "final", "config.json"))
    run = mlflow.MlflowClient().get_run(out["run_id"])
    assert "train/loss" in run.data.metrics and "train/ce_head3" in run.data.metrics
    assert run.data.tags["checkpoint_latest"].endswith("step_4")
    assert run.data.tags["seed"] == "42" and run.data.tags["algo"] == algo
    if algo != "baseline":  # the informative weight statistics only (the mean is 1 by construction)
        assert {"weights/std", "weights/max", "weights/entropy"} <= run.data.metrics.keys()
        assert "weight_mean" not in run.data.metrics and "weights/mean" not in run.data.metrics
        assert ("weights/kept" in run.data.metrics) == (algo == "rho1-tokenskip")
    if algo == "rho1-tokenskip":
        assert run.data.metrics["weights/kept"] == pytest.approx(0.7, abs=0.05)


def test_loss_falls_on_a_repeated_batch(tmp_path):
    data = str(tmp_path / "one.jsonl")
    write_dataset(data, n=2)
    overrides = make_config(
        str(tmp_path),
        tmp_path,
        f"paths.datasets={{toy: {data}}}",
        "train.max_steps=25",
        "train.lr=3e-3",
        "train.schedule=constant",
        "train.save_every=100",
    )
    losses = run_stage2(overrides)["losses"]
    assert losses[-1] < 0.6 * losses[0]


def test_all_on_s3_with_stage1_handoff_through_s3_and_mlflow(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", os.environ["AWS_ENDPOINT_URL"])
    base_model = f"{s3}/models/base"
    save_model(
        tiny_model(seed=3),
        base_model,
        byte_tokenizer(),
    )
    write_reference(f"{s3}/models/ref")
    common = make_config(s3, tmp_path, f"paths.models.base={base_model}")
    res = train_critic.train_critic(load_config(os.path.join(ROOT, "config.yaml"), common))
    assert res["value_head"].startswith("s3://") and io_stream.exists(res["value_head"])
    version = mlflow.MlflowClient().get_model_version("wmtp_critic_value_head", res["version"])
    assert version.run_id == res["run_id"]
    head_file = resolve_mlflow_uri(f"models:/wmtp_critic_value_head/{res['version']}")
    assert head_file.startswith(f"{s3}/mlartifacts/models/") and io_stream.exists(head_file)
    for source in (
        res["value_head"],
        f"models:/wmtp_critic_value_head/{res['version']}",
        f"runs:/{res['run_id']}/value_head",
    ):
        out = run_stage2(
            [
                *common,
                "train.algo=critic",
                "train.max_steps=2",
                "train.save_every=2",
                f"critic.value_head={source}",
            ]
        )
        assert all(math.isfinite(v) for v in out["losses"])
        assert out["run_dir"].startswith(f"{s3}/ckpt/mtp-critic-")
        assert io_stream.latest_ckpt(out["run_dir"]).endswith("step_2")
    out = run_stage2(
        [
            *common,
            "train.algo=rho1-tokenskip",
            f"paths.models.ref={s3}/models/ref",
            "train.max_steps=2",
            "train.save_every=2",
        ]
    )
    tags = mlflow.MlflowClient().get_run(out["run_id"]).data.tags
    assert resolve_mlflow_uri(tags["final_model_version"]) == tags["final_model"]
    assert io_stream.exists(f"{tags['final_model']}/config.json")


def test_resume_gives_the_same_losses(tmp_path):
    overrides = make_config(
        str(tmp_path),
        tmp_path,
        "train.max_steps=6",
        "train.save_every=2",
        "train.keep_last=5",
        "train.algo=rho1-weighted",
        f"paths.models.ref={tmp_path / 'ref'}",
    )
    write_reference(str(tmp_path / "ref"))
    full = run_stage2([*overrides, "train.run_name=full"])["losses"]
    first = run_stage2([*overrides, "train.run_name=cut"], stop_after=4)
    assert first["losses"] == full[:4]
    # a crash mid-save leaves step_6 without a manifest: it must be skipped
    os.makedirs(tmp_path / "ckpt" / "cut" / "step_6")
    io_stream.save_ckpt({"x": torch.zeros(1)}, str(tmp_path / "ckpt" / "cut" / "step_6"))
    os.unlink(tmp_path / "ckpt" / "cut" / "step_6" / "manifest.json")
    second = run_stage2([*overrides, "train.run_name=cut"], resume="auto")
    assert second["run_id"] == first["run_id"]
    assert second["losses"] == full[4:]
    history = [
        m.value for m in mlflow.MlflowClient().get_metric_history(first["run_id"], "train/loss")
    ]
    assert len(history) == 6


def test_resume_auto_without_run_name_picks_the_newest_run(tmp_path):
    overrides = make_config(str(tmp_path), tmp_path, "train.max_steps=4", "train.save_every=2")
    first = run_stage2(overrides, stop_after=2)
    second = run_stage2(overrides, resume="auto")
    assert second["run_dir"] == first["run_dir"] and len(second["losses"]) == 2


def run_script(args, cwd, env=None):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_default_config_runs_with_no_cache(tmp_path):
    """Both stages from the shipped config (tiny overrides), HOME/TMPDIR empty before and after."""
    home, tmp, work = tmp_path / "home", tmp_path / "tmp", tmp_path / "work"
    for d in (home, tmp, work):
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "HF_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=ROOT)
    sets = [a for s in TINY for a in ("--set", s)]
    cfg = os.path.join(ROOT, "config.yaml")
    r = run_script([os.path.join(ROOT, "train_critic.py"), "--config", cfg, *sets], work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script(
        [
            os.path.join(ROOT, "train_mtp.py"),
            "--config",
            cfg,
            "--algo",
            "critic",
            *sets,
            "--set",
            "train.max_steps=3",
        ],
        work,
        env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.listdir(home) == [] and os.listdir(tmp) == []
    assert sorted(os.listdir(work)) == ["mlflow.db", "runs"]
    assert sorted(os.listdir(work / "runs")) == [
        "checkpoints",
        "mlflow-artifacts",
        "value_head.safetensors",
    ]


def error_of(main, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_trainer(main, argv)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


@pytest.mark.parametrize(
    "case",
    [
        "unknown_key",
        "legacy_key",
        "secret",
        "missing_model",
        "ref_other_tokenizer",
        "critic_no_labels",
        "s3_unreachable",
    ],
)
def test_errors_are_one_line_and_write_nothing(case, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    cfg = tmp_path / "config.yaml"
    text = open(os.path.join(ROOT, "config.yaml")).read()
    overrides = make_config(str(tmp_path / "in"), tmp_path)
    main, code = train_mtp.main, 1
    args = []
    if case == "unknown_key":
        text += "\ntrian: {lr: 1}\n"
        code = 2
    elif case == "legacy_key":
        text += "\ncache: .cache\n"
        code = 2
    elif case == "secret":
        text = text.replace(
            "  profile: null", "  profile: null\n  secret_access_key: hunter2hunter2"
        )
        code = 2
    elif case == "missing_model":
        overrides.append(f"paths.models.base={tmp_path / 'nope'}")
    elif case == "ref_other_tokenizer":
        from helpers import write_sentencepiece

        write_sentencepiece(str(tmp_path / "sp"))
        write_reference(str(tmp_path / "ref"), tokenizer=load_tokenizer(str(tmp_path / "sp")))
        overrides += ["train.algo=rho1-weighted", f"paths.models.ref={tmp_path / 'ref'}"]
    elif case == "critic_no_labels":
        write_dataset(str(tmp_path / "nolabels.jsonl"), labels=False)
        overrides.append(f"paths.datasets={{toy: {tmp_path / 'nolabels.jsonl'}}}")
        main = train_critic.main
    elif case == "s3_unreachable":
        from conftest import free_port

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
        overrides += [
            f"s3.endpoint_url=http://127.0.0.1:{free_port()}",
            "paths.models.base=s3://bucket/models/base",
        ]
    overrides = [
        o for o in overrides if not o.startswith(("paths.checkpoints", "mlflow.tracking_uri"))
    ]
    overrides += [f"paths.checkpoints={out}/ckpt", f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db"]
    cfg.write_text(text)
    for o in overrides:
        args += ["--set", o]
    got, err = error_of(main, ["--config", str(cfg), *args], capsys)
    assert got == code, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert "hunter2" not in err
    assert not out.exists()


def test_compiled_blocks_train_like_eager_and_deterministic_mode_runs(tmp_path):
    """train.compile: torch.compile per decoder block gives eager's losses within 1e-5 over 3
    steps; train.deterministic: the same losses again, and time/checkpoint_s is logged apart."""
    common = ["train.max_steps=3", "train.save_every=3", "train.schedule=constant"]
    runs = {}
    for name, extra in (
        ("eager", []),
        ("compiled", ["train.compile=true"]),
        ("deterministic", ["train.deterministic=true"]),
    ):
        runs[name] = run_stage2(
            make_config(str(tmp_path), tmp_path, *common, f"train.run_name={name}", *extra)
        )["losses"]
    torch.use_deterministic_algorithms(False)  # the deterministic run switched this process
    assert len(runs["eager"]) == 3
    assert runs["compiled"] == pytest.approx(runs["eager"], abs=1e-5)
    assert runs["deterministic"] == pytest.approx(runs["eager"], abs=1e-6)
    client = mlflow.MlflowClient()
    [run] = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.mlflow.runName = 'eager'",
        output_format="list",
    )
    assert run.data.metrics["time/checkpoint_s"] > 0 and run.data.metrics["time/tokens_per_s"] > 0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]


def test_heldout_ce_every_n_steps_and_at_the_last(tmp_path):
    held = tmp_path / "held"
    write_dataset(str(held / "validation.jsonl"), n=5)
    overrides = make_config(
        str(tmp_path),
        tmp_path,
        "train.max_steps=5",
        "train.heldout_every=2",
        "train.save_every=100",
        f"paths.datasets.held={held}",
        "data.heldout=[held]",
    )
    out = run_stage2(overrides)
    client = mlflow.MlflowClient()
    for name in ("heldout/ce", "heldout/ce_head0", "heldout/ce_head3"):
        assert [m.step for m in client.get_metric_history(out["run_id"], name)] == [2, 4, 5]
    ce = client.get_run(out["run_id"]).data.metrics
    assert ce["heldout/ce"] == pytest.approx(sum(ce[f"heldout/ce_head{k}"] for k in range(4)) / 4)


@pytest.mark.parametrize("allowed", [0, 1])
def test_a_non_finite_step_is_not_applied_and_stops_the_run(allowed, tmp_path, monkeypatch):
    """NaN weights at step 2 (as NaN critic or Rho-1 scores give): the step moves no parameter;
    with train.max_nonfinite_steps 0 the run stops with one line naming the step, FAILED, with no
    checkpoint of it and no final model; with 1 it skips the step and finishes."""
    calls = []
    real = train_mtp.rho1_weights

    def poisoned(*args, **kwargs):
        calls.append(1)
        w = real(*args, **kwargs)
        return w * float("nan") if len(calls) == 2 else w

    monkeypatch.setattr(train_mtp, "rho1_weights", poisoned)
    overrides = make_config(
        str(tmp_path), tmp_path, "train.algo=rho1-weighted", "train.max_steps=3",
        "train.save_every=1", "train.keep_last=5", "train.run_name=nan",
        f"train.max_nonfinite_steps={allowed}",
    )  # fmt: skip
    ckpt = tmp_path / "ckpt" / "nan"
    if allowed == 0:
        with pytest.raises(
            ValueError,
            match=r"^step 2: non-finite weights nan, loss nan, gradient norm nan; the step was not applied",
        ):
            run_stage2(overrides)
        [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert run.info.status == "FAILED"
        assert sorted(os.listdir(ckpt)) == ["step_1"] and not mlflow.search_registered_models()
        return
    out = run_stage2(overrides)
    assert math.isnan(out["losses"][1]) and all(math.isfinite(v) for v in out["losses"][::2])
    step_1 = io_stream.load_ckpt(str(ckpt / "step_1"))["model"]
    step_2 = io_stream.load_ckpt(str(ckpt / "step_2"))["model"]
    assert all(torch.equal(step_1[k], step_2[k]) for k in step_1)  # the NaN step moved nothing
    assert io_stream.exists(str(ckpt / "final" / "mtp.json"))


@pytest.mark.parametrize("case", ["blank_lines", "fewer_than_a_batch"])
def test_nothing_to_train_is_an_error_before_anything_is_registered(case, tmp_path):
    data = tmp_path / "blank.jsonl"
    data.write_text("\n\n   \n")
    if case == "fewer_than_a_batch":  # one example, batches of 2: the only group is incomplete
        write_dataset(str(data), n=1)
    extra = [f"paths.datasets={{toy: {data}}}"]
    overrides = make_config(str(tmp_path), tmp_path, "train.max_steps=3", *extra)
    with pytest.raises(ValueError, match="not one optimizer step of training data"):
        run_stage2(overrides)
    assert not mlflow.search_registered_models()
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"


PYFUNC_PROBE = r"""
import sys
# the kit must come from the MLflow model's own code, not from this checkout or its editable install
sys.path = [p for p in sys.path if p not in ("", ROOT)]
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import mlflow
for mod in ("wmtp", "wmtp_decode", "wmtp_eval", "io_stream"):
    try:
        __import__(mod)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the kit is importable here: {mod}")
mlflow.set_tracking_uri(URI)
out = mlflow.pyfunc.load_model("models:/wmtp_mtp_model/1").predict(["def add(a, b):\n"])
print(len(out), type(out[0]).__name__)
"""


def test_the_registered_model_loads_where_the_kit_is_not_importable(tmp_path):
    out = run_stage2(
        make_config(str(tmp_path), tmp_path, "train.max_steps=1", "eval.max_new_tokens=4")
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    probe = PYFUNC_PROBE.replace("ROOT", repr(ROOT)).replace("URI", repr(uri))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH"))}
    r = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["1", "str"] and out["run_id"]
