"""MLflow (connect, start, params, pyfunc registration, plots, an honest status), run names and
run locks (one trainer per run folder). MLflow is imported where it is used (rank 0 only)."""

from __future__ import annotations

import ast
import atexit
import contextlib
import fcntl
import functools
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import mlflow
import torch
from accelerate.utils import broadcast_object_list

import io_stream
from wmtp import ConfigError, redact
from wmtp_dist import log

if TYPE_CHECKING:
    from wmtp import Config


# ---------------------------------------------------------------------------------------------
# MLflow (rank 0 only)


def mlflow_connect(cfg: Config) -> str:
    """Point MLflow at the configured tracking (and registry) server (MLFLOW_TRACKING_URI wins) and
    return the experiment's id, creating it if needed. On SQLite this runs under a file lock: the
    schema migration of a fresh store fails when several first runs start at once."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
    quiet_mlflow()
    if cfg.s3.endpoint_url:  # MLflow's own S3 client (artifacts, models) reads only the environment
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", cfg.s3.endpoint_url)
    mlflow.set_tracking_uri(uri)
    if cfg.mlflow.registry_uri:
        mlflow.set_registry_uri(cfg.mlflow.registry_uri)
    db = uri[len("sqlite:///") :].split("?")[0] if uri.startswith("sqlite:///") else ""
    with file_lock(db + ".lock") if db else contextlib.nullcontext():
        if db:
            build_sqlite_store(db)
        exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        if exp is None:
            exp_id = mlflow.create_experiment(
                cfg.mlflow.experiment, artifact_location=cfg.mlflow.artifact_location
            )
        else:
            exp_id = exp.experiment_id
        if exp is None or EXPERIMENT_KIND[0] not in exp.tags:  # a kind set by hand stays
            # MLflow 3's UI opens an unmarked experiment on its GenAI pages (traces: "No data")
            mlflow.MlflowClient().set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        return exp_id


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # "machine learning"


def quiet_mlflow() -> None:
    """MLflow's own lines off: its "View run ... at" link always (it holds the tracking URI's
    password; log_startup gives a redacted one), its INFO lines and progress bars unless
    WMTP_DEBUG is set."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not os.environ.get("WMTP_DEBUG"):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def build_sqlite_store(db: str) -> None:
    """Create a missing SQLite tracking store whole: MLflow builds and migrates its tables in a
    file beside it, which is renamed into place when complete, so that a process killed at any
    moment leaves no store or a complete one (a half-migrated file failed every later start).
    Call it under the store's file lock; a builder's leftover `<db>.new-<pid>` is removed."""
    folder, name = os.path.split(os.path.abspath(db))
    for old in os.listdir(folder) if os.path.isdir(folder) else []:
        if old.startswith(name + ".new-"):
            os.remove(os.path.join(folder, old))
    if os.path.exists(db):
        return
    os.makedirs(folder, exist_ok=True)
    new = f"{db}.new-{os.getpid()}"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{new}").search_experiments(max_results=1)
    os.replace(new, db)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive flock on the file `path` (created here, deleted on release)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder deleted this file while we waited: lock the new one
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def mlflow_start(
    cfg: Config,
    run_name: str,
    run_id: str | None = None,
    *,
    params: dict[str, str] | None = None,
    description: str | None = None,
):
    """Start (or continue) the MLflow run; a new one gets `params` (config_params: secrets
    removed) and `description` (the run page's note)."""
    exp_id = mlflow_connect(cfg)
    run = mlflow.start_run(
        run_id=run_id,
        experiment_id=exp_id,
        run_name=None if run_id else run_name,
        # CPU, memory, disk, network (and GPU with nvidia-ml-py) unless the env var says otherwise
        log_system_metrics=None if "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" in os.environ else True,
    )
    if run_id is None and params:
        mlflow.log_params(params)
    if run_id is None and description:
        mlflow.set_tag("mlflow.note.content", description)
    return run


def log_inputs(files: dict[str, str], context: str) -> None:
    """Record datasets as the active run's MLflow inputs: {name: record file} with where it is
    read from and a digest (the sha256 of a local file, the ETag of an S3 object: no download;
    36 characters at most)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if not files:
        return
    datasets = []
    for name, file in files.items():
        kind, path = io_stream.resolve(file)
        if kind == "local":
            digest = io_stream.file_sha256(path)
        else:
            try:
                info = io_stream.s3_call(path, io_stream.s3_filesystem().info, path)
                digest = str(info.get("ETag", "")).strip('"') or None
            except OSError:  # S3 down (the data may come from s3.fallback_root): MLflow's digest
                digest = None
        with warnings.catch_warnings():  # MLflow registers two sources for local paths
            warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
            source = resolve_dataset_source(redact(path))
        digest = digest and digest[:36]  # MLflow's limit; 144 bits of a sha256 still identify it
        datasets.append(MetaDataset(source, name=name, digest=digest))
    n = len(datasets)
    mlflow.log_inputs(datasets=datasets, contexts=[context] * n, tags_list=[None] * n)


def drop_checkpoint_tags(kept_steps: list[int]) -> None:
    """Delete the active run's checkpoint_step_<N> tags whose checkpoint was pruned."""
    tags = mlflow.get_run(mlflow.active_run().info.run_id).data.tags
    for key in tags:
        step = key.removeprefix("checkpoint_step_")
        if step != key and step.isdigit() and int(step) not in kept_steps:
            mlflow.delete_tag(key)


def artifact_uri(subpath: str) -> str | None:
    """Where io_stream can write an artifact of the active run directly (local or S3), else None."""
    uri = mlflow.get_artifact_uri()
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri and not uri.startswith("s3://"):
        return None  # e.g. mlflow-artifacts:/ through a tracking server: log via the client instead
    return io_stream.join(uri, subpath)


def resolve_mlflow_uri(uri: str) -> str:
    """runs:/<run_id>/<path> or models:/<name>/<version> -> where its files are (local path or
    s3:// URI). For the kit's MLflow models, the weights: the final MTP model's folder (which its
    MLflow model points at) or the value head file inside its MLflow model; for any other MLflow
    model its folder, for a run's plain artifact its place in the artifact store."""
    try:
        info = mlflow.models.get_model_info(uri)
    except (mlflow.exceptions.MlflowException, OSError):
        if not uri.startswith("runs:/"):
            raise
        run_id, _, sub = uri[len("runs:/") :].partition("/")
        base = mlflow.MlflowClient().get_run(run_id).info.artifact_uri.removeprefix("file://")
        return io_stream.join(base, sub) if sub else base
    pyfunc = info.flavors.get("python_function", {})
    if (pyfunc.get("config") or {}).get("final_model"):
        return pyfunc["config"]["final_model"]
    model = mlflow.MlflowClient().get_logged_model(info.model_id)
    folder = model.artifact_location.removeprefix("file://")
    value_head = (pyfunc.get("artifacts") or {}).get("value_head")
    return io_stream.join(folder, value_head["path"]) if value_head else folder


def kit_modules(entry: str) -> list[str]:
    """The kit's module files that `entry` (a file beside this one) imports, directly or through
    another kit module, function-level imports included: the code a pyfunc model must carry."""
    here = os.path.dirname(os.path.abspath(__file__))
    found, todo = [], [entry]
    while todo:
        name = todo.pop()
        for node in ast.walk(ast.parse(open(os.path.join(here, name), encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                file = mod.split(".")[0] + ".py"
                if file not in found and file != entry and os.path.exists(os.path.join(here, file)):
                    found.append(file)
                    todo.append(file)
    return sorted(found)


PYFUNC_DEPS = (
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "sentencepiece",
    "tokenizers",
    "fsspec",
    "s3fs",
    "msgspec",
)


def log_pyfunc(
    name: str,
    registered: str | None,
    config: dict,
    artifacts: dict | None = None,
    *,
    tags: dict[str, str] | None = None,
    description: str | None = None,
) -> str | None:
    """Log MLflow pyfunc model `name` of the active run from wmtp_pyfunc.py (models-from-code: the
    kit's modules as its code, this environment's versions as its requirements, nothing pickled)
    and register it as a new version of `registered` with `tags` and `description`; returns
    that version (None: `registered` is None, nothing registered)."""
    here = os.path.dirname(os.path.abspath(__file__))
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=os.path.join(here, "wmtp_pyfunc.py"),
        code_paths=[os.path.join(here, f) for f in kit_modules("wmtp_pyfunc.py")],
        artifacts=artifacts,
        model_config=config,
        pip_requirements=[
            f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in PYFUNC_DEPS
        ],
    )
    if registered is None:
        return None
    # the client, not mlflow.register_model: that one prints two lines of its own to stderr
    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(registered)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        registered,
        source=info.model_uri,
        run_id=info.run_id,
        tags=tags,
        description=description,
        model_id=info.model_id,
    )
    return str(version.version)


def run_link(run) -> str:
    """Where to see an MLflow run: its page on the tracking server, or for a store with no server
    (a SQLite file, a folder) the `mlflow ui` to start and the page under the address it prints."""
    uri = redact(mlflow.get_tracking_uri())
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then <the address it prints>/{page}"


def log_startup(acc, cfg: Config, run, models: dict) -> None:
    """The run's summary on rank 0: device and world size, parameter counts, data, MLflow run."""
    log.info(
        "device %s, world size %d, mixed precision %s",
        acc.device,
        acc.num_processes,
        acc.mixed_precision,
    )
    for role, model in models.items():
        if model is not None:
            n = sum(p.numel() for p in model.parameters())
            k = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log.info("%s: %s parameters, %s trained", role, f"{n:,}", f"{k:,}")
    for name in cfg.data.train:
        log.info(
            "data %s: %s (split %s), streamed: counted when the epoch ends",
            name,
            cfg.paths.datasets[name],
            cfg.data.split,
        )
    log.info(
        "MLflow run %s (%s) in experiment %r; see it with %s",
        run.info.run_id,
        run.info.run_name,
        cfg.mlflow.experiment,
        run_link(run),
    )


# ---------------------------------------------------------------------------------------------
# Plots (MLflow figures, rank 0)


HIST_BINS = 40


def weight_histogram(w: torch.Tensor, valid: torch.Tensor, top: float) -> torch.Tensor:
    """Counts [H, HIST_BINS] of each head's weights on its valid slots, bins spanning [0, top]."""
    return torch.stack(
        [
            torch.histc(w[..., k][valid[..., k]].float(), HIST_BINS, 0, top).cpu()
            for k in range(w.shape[-1])
        ]
    )


def figure_class():
    """matplotlib's Figure, imported so that its font cache goes to a folder removed at exit (it
    would write ~/.cache/matplotlib: the kit keeps no cache directory)."""
    if "matplotlib" not in sys.modules and "MPLCONFIGDIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="wmtp-matplotlib-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["MPLCONFIGDIR"] = folder
    from matplotlib.figure import Figure

    return Figure


def log_head_plots(run_id: str, step: int, n_heads: int, hist: torch.Tensor | None, top: float):
    """MLflow figures: every head's CE curve so far (plots/ce_heads.png, from the run's
    train/ce_head{k} metrics, so a resumed run's curve starts at step 0) and, when the algo
    weights slots, a histogram per head of its weights since the last plot
    (plots/weights_step_<N>.png)."""
    Figure = figure_class()
    client = mlflow.MlflowClient()
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for k in range(n_heads):
        points = sorted(
            (m.step, m.value) for m in client.get_metric_history(run_id, f"train/ce_head{k}")
        )
        ax.plot([s for s, _ in points], [v for _, v in points], label=f"head {k} (t+{k + 1})")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy", title=f"per-head CE to step {step}")
    ax.legend()
    mlflow.log_figure(fig, "plots/ce_heads.png")
    if hist is None:
        return
    fig = Figure(figsize=(3 * n_heads, 3), layout="constrained")
    edges = torch.linspace(0, top, HIST_BINS + 1).tolist()
    for k, ax in enumerate(fig.subplots(1, n_heads, sharey=True, squeeze=False)[0]):
        ax.stairs(hist[k].tolist(), edges, fill=True)
        ax.set(title=f"head {k}", xlabel="weight", ylabel="valid slots" if k == 0 else None)
    fig.suptitle(f"weights of rank 0's valid slots since the previous figure, to step {step}")
    mlflow.log_figure(fig, f"plots/weights_step_{step:06d}.png")


# ---------------------------------------------------------------------------------------------
# Run folders: safe names, one trainer at a time, an honest MLflow status


def run_name_for(acc, run_name: str | None, algo: str) -> str:
    """train.run_name, or <algo>-<UTC timestamp> chosen on rank 0 and shared with every rank."""
    if run_name:
        return check_run_name(run_name)
    name = [f"{algo}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"]
    if acc.num_processes > 1:
        broadcast_object_list(name, from_process=0)
    return name[0]


def check_run_name(name: str) -> str:
    """A run name is one plain folder name inside paths.checkpoints."""
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(
            f"train.run_name {name!r}: must be one folder name inside paths.checkpoints "
            "(no '/', '\\', '..' or absolute path)"
        )
    return name


LOCK = ".lock"


_held_locks: dict[str, dict] = {}  # lock path -> {"record", "created"}; released by tracked_run


EMPTY_LOCK_S = 60.0  # an empty lock (its trainer killed between create and write) is stale after


def _read_lock(path: str) -> tuple[dict | None, bytes | str | None, float]:
    """(holder record, version, age in seconds) of a run lock; (None, None, 0.0) when there is none.
    The version is the local file's bytes or the S3 object's ETag; an empty or unreadable record
    is {} (an unknown holder); the age is by the clock that stamped the lock (S3's own)."""
    kind, p = io_stream.resolve(path)
    try:
        if kind == "local":
            with open(p, "rb") as f:
                raw = version = f.read()
                age = time.time() - os.fstat(f.fileno()).st_mtime
        else:  # one GET: the body, and the ETag that a replace must still find, belong together
            raw, answer = io_stream.s3_get(p)
            version, age = answer.get("ETag"), answer["Age"]
    except FileNotFoundError:
        return None, None, 0.0
    except OSError as exc:
        raise exc if str(exc).startswith(f"{p}: ") else type(exc)(f"{path}: {exc}") from None
    try:
        holder = json.loads(raw)
    except (ValueError, RecursionError):
        holder = {}
    return holder if isinstance(holder, dict) else {}, version, age


def _write_lock(path: str, data: bytes, version: bytes | str | None) -> bool:
    """Create the lock (version None: local O_EXCL, S3 If-None-Match: *) or replace it if it is still
    at `version` (S3 If-Match); False when another trainer got there first."""
    kind, p = io_stream.resolve(path)
    if kind == "local" and version is None:
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if kind == "local":
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # replacers take turns, each checking what is there now
            with open(p, "rb") as f:
                if f.read() != version:
                    return False
            io_stream.write_bytes(data, p)  # temp file + rename: never a half-written lock
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)
    return io_stream.s3_put_if(p, data, version) is not None


def _ignored_condition(path: str, data: bytes) -> str | None:
    """The conditional PUT that the S3 endpoint ignores, tried on the lock just created at path
    (holding `data`): a second create (If-None-Match: *), then a replace at a wrong ETag
    (If-Match); an ignored one rewrote the same bytes. None when both were refused, as they must."""
    if io_stream.s3_put_if(path, data) is not None:
        return "If-None-Match"
    if io_stream.s3_put_if(path, data, '"wmtp-not-the-etag"') is not None:
        return "If-Match"
    return None


def _alive(holder: dict) -> bool:
    """False only for a holder on this host whose process is gone; elsewhere nobody can tell."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or type(pid) is not int or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def lock_run_dir(run_dir: str, *, force: bool = False) -> dict | None:
    """Take `<run_dir>/.lock` for this process (local: exclusive create; S3: PUT If-None-Match: *,
    refused where the endpoint ignores it). A live holder is refused with FileExistsError naming
    its MLflow run; one whose process is gone (same host), an empty lock older than EMPTY_LOCK_S,
    or any with force, is replaced. Returns the replaced holder's record, else None."""
    path = io_stream.join(run_dir, LOCK)
    kind, p = io_stream.resolve(run_dir)
    created = None  # the topmost folder made here, removed again if the run leaves it empty
    if kind == "local":
        while not os.path.exists(p):
            created, p = p, os.path.dirname(p)
        os.makedirs(io_stream.resolve(run_dir)[1], exist_ok=True)
    record = {
        "run_id": None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "token": uuid.uuid4().hex,
    }
    data = json.dumps(record).encode()
    for _ in range(5):
        holder, version, age = _read_lock(path)
        if holder is not None and holder.get("token") == record["token"]:
            holder = None  # our create landed, though its answer was lost and a retry saw it
            break
        empty = holder == {}  # its trainer was killed between creating and writing it
        if holder is not None and not force and not (empty and age > EMPTY_LOCK_S):
            _refuse(run_dir, holder, age)
        if _write_lock(path, data, version):
            if empty and not force:
                print(
                    f"warning: {run_dir}: took over an empty lock {age:.0f} s old", file=sys.stderr
                )
            break
    else:
        raise FileExistsError(
            f"{run_dir}: its lock keeps changing hands; another trainer is starting"
        )
    _held_locks[path] = {"record": record, "created": created}
    if kind == "s3":
        _check_conditions(run_dir, path, data, force)
    return holder


def _refuse(run_dir: str, holder: dict, age: float) -> None:
    """Raise FileExistsError for a lock whose holder may be alive; return for a gone one."""
    if holder == {}:
        raise FileExistsError(
            f"{run_dir} is in use by a starting trainer (its lock is empty, {age:.0f} s old; "
            f"taken over after {EMPTY_LOCK_S:g} s), or pass --force-unlock if it is gone"
        )
    if not _alive(holder):
        return
    who = f"MLflow run {holder['run_id']}" if holder.get("run_id") else "a starting trainer"
    raise FileExistsError(
        f"{run_dir} is in use by {who} (host {holder.get('host')}, pid {holder.get('pid')},"
        f" since {holder.get('since')}); choose another train.run_name, or pass"
        " --force-unlock if that trainer is gone"
    )


def _check_conditions(run_dir: str, path: str, data: bytes, force: bool) -> None:
    """Give the S3 lock at path back and raise when the endpoint ignores a conditional PUT the
    lock relies on (two trainers would both hold it); with force, only warn."""
    ignored = _ignored_condition(path, data)
    if ignored is None:
        return
    what = (
        f"{run_dir}: the S3 endpoint ({io_stream.s3_options()['endpoint_url'] or 'AWS'}) ignores "
        f"{ignored} on PUT, so its run lock cannot keep two trainers apart"
    )
    if force:
        print(f"warning: {what}; --force-unlock: locked anyway", file=sys.stderr)
        return
    _held_locks.pop(path)
    holder, _, _ = _read_lock(path)
    if holder and holder.get("token") == json.loads(data)["token"]:
        io_stream.remove(path)
    raise OSError(
        f"{what}; put paths.checkpoints on a local or shared folder, or pass --force-unlock "
        "if no other trainer uses this train.run_name (`python migrate.py verify-s3` checks "
        "an endpoint)"
    )


def set_lock_run_id(run_dir: str, run_id: str) -> None:
    """Write the MLflow run id into this process's lock on run_dir, for a refused trainer to name."""
    path = io_stream.join(run_dir, LOCK)
    held = _held_locks[path]
    held["record"]["run_id"] = run_id
    holder, version, _ = _read_lock(path)
    if holder and holder.get("token") == held["record"]["token"]:
        _write_lock(path, json.dumps(held["record"]).encode(), version)


def release_run_locks() -> None:
    """Delete the run locks this process holds (if still its own) and run folders made just for them
    that stayed empty (a start that failed leaves nothing behind)."""
    for path in list(_held_locks):
        held = _held_locks.pop(path)
        holder, _, _ = _read_lock(path)
        if holder and holder.get("token") == held["record"]["token"]:
            io_stream.remove(path)
        folder = os.path.dirname(path)
        while held["created"]:
            try:
                os.rmdir(folder)
            except OSError:
                break
            if folder == held["created"]:
                break
            folder = os.path.dirname(folder)


def claim_run(cfg: Config, run_dir: str, resumed_run_id: str | None, *, force: bool) -> None:
    """Lock the run folder (rank 0). MLflow runs that cannot be alive any more, the replaced dead
    holder's and the resumed checkpoint's, are marked KILLED when they are still RUNNING."""
    previous = lock_run_dir(run_dir, force=force)
    dead = {resumed_run_id, (previous or {}).get("run_id")} - {None}
    if not dead:
        return
    mlflow_connect(cfg)
    client = mlflow.MlflowClient()
    for run_id in dead:
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
        except mlflow.exceptions.MlflowException:
            pass  # a run of another tracking server


def tracked_run(train_fn: Callable) -> Callable:
    """Decorate a trainer's train function: SIGTERM stops it like Ctrl-C; on an exception the active
    MLflow run ends FAILED (KILLED on SIGINT/SIGTERM); run locks are released however it ends."""

    @functools.wraps(train_fn)
    def run(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:
            previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return train_fn(*args, **kwargs)
        except BaseException as exc:
            mlflow = sys.modules.get("mlflow")
            if mlflow is not None and mlflow.active_run() is not None:
                status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
                try:
                    mlflow.end_run(status)
                except Exception as end:  # the run's own error is the one to report
                    print(f"warning: MLflow run not marked {status}: {end!r:.200}", file=sys.stderr)
            raise
        finally:
            try:
                release_run_locks()
            except Exception as end:
                print(f"warning: run lock not released: {end!r:.200}", file=sys.stderr)
            if main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return run


def _terminate(signum: int, frame) -> None:
    """SIGTERM: unwind like an exception, so that the run is marked and its lock released."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise SystemExit(128 + signum)
