"""Honest runs (issue 13, items 7, 8, 14, 15, 18): one trainer per run folder, run names that stay
inside paths.checkpoints, MLflow status FAILED/KILLED, concurrent first starts on a fresh SQLite
store, and resume refusing a changed model shape or unannounced hyperparameter changes.

Trainers run in-process through run_cli or as real subprocesses sent SIGTERM / SIGKILL; S3 is the
moto server; MLflow is read back with MlflowClient from the SQLite file; lock objects are read with
plain `open` or boto3.
"""

import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time

import mlflow
import pytest
from conftest import BUCKET
from helpers import make_config, write_dataset

import io_stream
import train_mtp
import wmtp_runs
from wmtp import load_config
from wmtp_cli import run_cli as run_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")


pytestmark = pytest.mark.usefixtures("clean_mlflow")  # conftest: own tracking URI, no run left


def settings(where: str, tmp_path, run_name: str, *extra: str) -> list[str]:
    """CLI arguments: tiny model, data and checkpoints under `where`, MLflow on tmp_path/mlflow.db."""
    overrides = make_config(
        where,
        tmp_path,
        "train.save_every=2",
        "train.schedule=constant",
        f"train.run_name={run_name}",
        *extra,
    )
    return ["--config", CONFIG, *(a for o in overrides for a in ("--set", o))]


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run train_mtp's CLI in this process: (exit code, its `error:` line or ""). Progress bars and
    MLflow's log lines share stderr; a traceback or a second error line fails the test."""
    try:
        run_trainer(train_mtp.main, argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    errors = re.findall(r"error: .*", err)
    assert "Traceback" not in err and len(errors) <= 1, err[-3000:]
    return code, errors[0] if errors else ""


def start_trainer(argv: list[str], tmp_path) -> subprocess.Popen:
    """`python train_mtp.py ARGV` in the background, stderr to a file (tqdm would fill a pipe)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = ROOT
    err = open(tmp_path / f"trainer-{time.monotonic_ns()}.err", "w")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train_mtp.py"), *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    proc.err_path = err.name
    return proc


def wait_for(proc: subprocess.Popen, run_dir: str, timeout: float = 180) -> None:
    """Until the run has a complete checkpoint (local or S3; older ones are pruned as it goes);
    fails with the trainer's stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while io_stream.latest_ckpt(run_dir) is None:
        if proc.poll() is not None:
            pytest.fail(f"trainer exited {proc.returncode}: {open(proc.err_path).read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint under {run_dir} after {timeout} s")
        time.sleep(0.2)


def mlflow_runs(tmp_path) -> dict[str, mlflow.entities.Run]:
    """run name -> run, read from the SQLite store."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("wmtp")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])} if exp else {}


def files_under(path) -> set[str]:
    """Every file and folder below `path`, relative."""
    return {
        os.path.relpath(os.path.join(d, n), path)
        for d, dirs, files in os.walk(path)
        for n in dirs + files
    }


# ---------------------------------------------------------------------------------------------
# item 8: run names


@pytest.mark.parametrize("name", ["../../x", "ABS", "a/b", "..", "a\\b"])
def test_run_name_outside_the_checkpoint_folder_is_refused(name, tmp_path, capsys):
    if name == "ABS":
        name = str(tmp_path / "abs")
    argv = settings(str(tmp_path / "w"), tmp_path, name, "train.max_steps=2")
    before = files_under(tmp_path)
    code, err = cli(argv, capsys)
    assert code == 2, err
    assert "train.run_name" in err, err
    assert files_under(tmp_path) == before  # nothing written anywhere, inside or outside


def test_run_name_from_a_checkpoint_is_checked_too(tmp_path, capsys):
    """--resume PATH of a checkpoint whose manifest names ../../evil: refused, nothing written."""
    ckpt = str(tmp_path / "elsewhere" / "step_2")
    io_stream.save_ckpt({"run_name": "../../evil", "config": {}, "step": 2}, ckpt)
    argv = [*settings(str(tmp_path), tmp_path, "r"), "--resume", ckpt]
    before = files_under(tmp_path)
    code, err = cli(argv, capsys)
    assert code == 2 and "train.run_name" in err, err
    assert files_under(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# items 7 and 14: one trainer per run folder; SIGTERM -> KILLED; FAILED on an exception; a killed
# (-9) run is KILLED when --resume picks it up; item 18: what a resume may change


def test_second_trainer_on_s3_is_refused_and_sigterm_marks_killed(s3, tmp_path, capsys):
    run_dir = f"{s3}/ckpt/shared"
    long_run = ("train.max_steps=100000", "train.epochs=100000")  # runs until it is stopped
    first = start_trainer(settings(s3, tmp_path, "shared", *long_run), tmp_path)
    try:
        wait_for(first, run_dir)
        holder = mlflow_runs(tmp_path)["shared"].info.run_id
        code, err = cli(settings(s3, tmp_path, "shared", "train.max_steps=2"), capsys)
        assert code == 1 and holder in err and "in use" in err, err
        assert first.poll() is None  # the first trainer is untouched and still training
        assert list(mlflow_runs(tmp_path)) == ["shared"]  # the refused one opened no run
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM, open(first.err_path).read()
    finally:
        first.kill()
        first.wait()
    assert mlflow_runs(tmp_path)["shared"].info.status == "KILLED"
    assert not io_stream.exists(f"{run_dir}/.lock")  # released on the way out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lock_records_holder_and_handles_stale_ones(where, tmp_path, request):
    base = request.getfixturevalue("s3") if where == "s3" else str(tmp_path)
    run_dir = io_stream.join(base, "run")
    lock_run_dir, release_run_locks = wmtp_runs.lock_run_dir, wmtp_runs.release_run_locks
    lock = io_stream.join(run_dir, ".lock")

    def read_lock() -> dict:  # not through the kit: plain open or boto3
        if where == "local":
            return json.loads(open(lock, "rb").read())
        body = request.getfixturevalue("boto").get_object(Bucket=BUCKET, Key="run/.lock")["Body"]
        return json.loads(body.read())

    def lock_exists() -> bool:
        if where == "local":
            return os.path.exists(lock)
        listed = request.getfixturevalue("boto").list_objects_v2(Bucket=BUCKET, Prefix="run/")
        return listed.get("KeyCount", 0) > 0

    def write_lock(record: dict) -> None:
        if where == "local":
            os.makedirs(run_dir, exist_ok=True)
            with open(lock, "w") as f:
                json.dump(record, f)
        else:
            request.getfixturevalue("boto").put_object(
                Bucket=BUCKET, Key="run/.lock", Body=json.dumps(record)
            )

    assert lock_run_dir(run_dir) is None
    mine = read_lock()
    assert (mine["host"], mine["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(FileExistsError, match="in use"):
        lock_run_dir(run_dir)  # this process is alive: no second holder
    release_run_locks()
    assert not lock_exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"run_id": "deadrun", "host": socket.gethostname(), "pid": dead.pid, "token": "t"}
    write_lock(stale)
    assert lock_run_dir(run_dir) == stale  # its pid is gone on this host: taken over
    assert read_lock()["pid"] == os.getpid()
    release_run_locks()

    elsewhere = {**stale, "run_id": "liverun", "host": "another-host"}
    write_lock(elsewhere)
    with pytest.raises(FileExistsError, match="liverun"):
        lock_run_dir(run_dir)  # cannot tell whether a pid on another host lives
    assert read_lock() == elsewhere
    assert lock_run_dir(run_dir, force=True) == elsewhere
    assert read_lock()["pid"] == os.getpid()
    release_run_locks()


@pytest.mark.parametrize("case", ["bad_data", "s3_error"])
def test_failed_run_is_recorded_failed(case, tmp_path, capsys, request):
    extra = ["train.max_steps=4"]
    if case == "bad_data":
        data = tmp_path / "bad.jsonl"
        write_dataset(str(data), n=12)
        lines = data.read_text().splitlines()
        lines[8] = '{"prompt": "cut off'
        data.write_text("\n".join(lines) + "\n")
        extra += [f"paths.datasets={{toy: {data}}}", "data.heldout=[]"]
    else:  # the dataset's S3 object is missing: the first batch fails
        missing = request.getfixturevalue("s3") + "/missing.jsonl"
        extra += [f"paths.datasets={{toy: {missing}}}", "data.heldout=[]"]
    code, err = cli(settings(str(tmp_path), tmp_path, "f", *extra), capsys)
    assert code == 1, err
    assert (
        ("bad.jsonl" in err) if case == "bad_data" else ("missing.jsonl: no such object" in err)
    ), err
    assert mlflow_runs(tmp_path)["f"].info.status == "FAILED"
    assert not os.path.exists(tmp_path / "ckpt" / "f" / ".lock")


def test_second_trainer_refused_then_killed_run_resumed(tmp_path, capsys):
    run_dir = tmp_path / "ckpt" / "k"
    argv = settings(
        str(tmp_path), tmp_path, "k", "train.lr=1e-3", "train.warmup_steps=1", "train.epochs=100000"
    )
    proc = start_trainer([*argv, "--set", "train.max_steps=100000"], tmp_path)
    try:
        wait_for(proc, str(run_dir))
        holder = mlflow_runs(tmp_path)["k"].info.run_id
        code, err = cli([*argv, "--set", "train.max_steps=2"], capsys)
        assert code == 1 and holder in err and "in use" in err, err
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = mlflow_runs(tmp_path)["k"]
    assert run.info.status == "RUNNING"  # nobody ended it
    assert json.loads((run_dir / ".lock").read_text())["pid"] == proc.pid  # a stale lock

    step = int(os.path.basename(io_stream.latest_ckpt(str(run_dir))).split("_")[1])
    resume = [*argv, "--resume", "auto", "--set", f"train.max_steps={step + 2}"]
    for flag in ([], ["--resume-with-changes"]):  # a changed shape is refused either way
        code, err = cli([*resume, *flag, "--set", "model.dim=64"], capsys)
        assert code == 2 and "checkpoint has dim 32, config has 64" in err, err
    assert mlflow_runs(tmp_path)["k"].info.status == "KILLED"  # marked when --resume picked it up

    code, err = cli([*resume, "--set", "train.lr=2e-3"], capsys)
    assert code == 2, err
    changed = f"train.max_steps 100000 -> {step + 2}, train.lr 0.001 -> 0.002"  # nothing else
    assert f"the config changes {changed}; pass --resume-with-changes" in err, err
    code, err = cli([*resume, "--set", "train.lr=2e-3", "--resume-with-changes"], capsys)
    assert code == 0, err
    after = mlflow_runs(tmp_path)["k"]
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    note = after.data.tags[f"resumed_with_changes_at_step_{step}"]
    assert note == changed
    # the new lr is the one used: constant schedule after 1 warmup step, so lr == train.lr
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/lr")
    last = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
    assert last[step] == pytest.approx(1e-3) and last[step + 2] == pytest.approx(2e-3)
    assert not (run_dir / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# item 15: first runs started at once on a fresh SQLite store


def first_start(db: str, gate: str) -> None:
    """In a forked process: once `gate` exists, start an MLflow run as a trainer does; its id to
    <gate>.<pid>.id."""
    cfg = load_config(CONFIG, [f"mlflow.tracking_uri=sqlite:///{db}"])
    while not os.path.exists(gate):
        time.sleep(0.001)
    run_id = wmtp_runs.mlflow_start(cfg, f"r{os.getpid()}").info.run_id
    mlflow.end_run()
    with open(f"{gate}.{os.getpid()}.id", "w") as f:
        f.write(run_id)


def test_three_first_starts_on_a_fresh_sqlite_store(tmp_path):
    """Three processes (forked: no import time, a real race) open a fresh store at once."""
    db, gate = tmp_path / "fresh" / "mlflow.db", tmp_path / "go"
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=first_start, args=(str(db), str(gate))) for _ in range(3)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let all three load the config and wait at the gate
    gate.touch()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("wmtp").experiment_id])
    ids = [open(f"{gate}.{p.pid}.id").read() for p in procs]
    assert sorted(r.info.run_id for r in runs) == sorted(ids)
    assert sorted(os.listdir(db.parent)) == ["mlflow.db"]  # the creation lock left nothing


CONNECT = """
import sys
sys.path.insert(0, {root!r})
import wmtp, wmtp_runs
cfg = wmtp.load_config(None, ["mlflow.tracking_uri=sqlite:///{db}", "mlflow.artifact_location={art}"])
wmtp_runs.mlflow_connect(cfg)
print("connected")
"""


@pytest.mark.parametrize("after", [0.0, 0.05, 0.3])
def test_a_store_killed_while_mlflow_builds_it_is_absent_or_complete(after, tmp_path):
    """kill -9 while MLflow creates a fresh SQLite store (half-migrated files failed every later
    start): the store is built beside its path and renamed when whole, so the next start works."""
    db = tmp_path / "mlflow.db"
    code = CONNECT.format(root=ROOT, db=db, art=tmp_path / "art")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    first = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith("mlflow.db.new-") for p in tmp_path.iterdir()):
        assert first.poll() is None and time.monotonic() < deadline, (
            "the store was never built beside"
        )
        time.sleep(0.005)
    time.sleep(after)
    first.kill()
    first.wait()
    assert not db.exists() or db.stat().st_size > 0
    second = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0 and second.stdout.strip() == "connected", second.stderr[-2000:]
    assert db.exists() and not [p for p in tmp_path.iterdir() if ".new-" in p.name]
