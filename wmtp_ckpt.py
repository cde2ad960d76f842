"""Checkpoints of a training run: the train state (model, optimizer, scheduler, RNG, data
position) over io_stream's checkpoint format or DCP shards, the S3-outage fallback, pruning,
resume discovery and the checks on what a resume changes."""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable

import msgspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

import io_stream
from wmtp import Config, ConfigError, redact
from wmtp_dist import barrier, is_sharded, rank_world, unwrap
from wmtp_runs import check_run_name

# ---------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    """Every RNG a training step might touch, on this process."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------------------------------------
# Save and load (every rank)


def _crash_hook(step: int, rank: int) -> None:
    """Test hook: WMTP_TEST_CRASH=STEP:RANK makes that rank die mid-checkpoint, before the manifest."""
    if os.environ.get("WMTP_TEST_CRASH") == f"{step}:{rank}":
        raise RuntimeError(f"WMTP_TEST_CRASH: rank {rank} stops while saving step {step}")


_fallback_ckpts: list[str] = []  # checkpoints this process wrote under s3.fallback_root


def save_train_state(path: str, model, opt, state: dict, *, fallback: bool = False) -> str:
    """Checkpoint at `path` from every rank: model + optimizer (DCP shards when FSDP-sharded, else
    rank 0 alone), then `state` and, after a barrier, the manifest written last by rank 0.
    With `fallback` (train.checkpoint_fallback), a checkpoint that S3 cannot take for a reason
    retries cannot fix is written whole under s3.fallback_root instead. Returns where it went."""
    rank, world = rank_world()
    rngs = [rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
    state = {**state, "rng": rngs, "world_size": world}
    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    mirror = io_stream.fallback_path(path, writing=True) if fallback else None
    outage = _write_train_state(path, model, opt, state, vote=mirror is not None)
    if outage is None:
        return path
    if rank == 0:
        run = path.rsplit("/", 1)[0]
        sync = f"python migrate.py sync-checkpoints {os.path.dirname(mirror)} {run}"
        for line in (
            f"checkpoint step {state['step']} is NOT on S3: {outage}",
            f"it is written whole to {mirror} instead (train.checkpoint_fallback);",
            f"`--resume auto` finds it there; once S3 is back, upload it: {sync}",
        ):
            print(f"warning: !!! {line}", file=sys.stderr)
    _write_train_state(mirror, model, opt, state, vote=False)
    _fallback_ckpts.append(mirror)
    return mirror


def _write_train_state(path: str, model, opt, state: dict, *, vote: bool) -> ConnectionError | None:
    """save_train_state's writes at `path`. With `vote`, an S3 failure that retries cannot fix is
    not raised: the barriers become votes, and every rank returns the first rank's failure."""
    rank, world = rank_world()
    state = dict(state)
    failed: list[str] = []  # this rank's S3 outage

    def attempt(write: Callable[[], None]) -> None:
        if failed:
            return
        try:
            write()
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            outage = io_stream.s3_outage(path, exc) if vote else None
            if outage is None:
                raise
            failed.append(str(outage))

    def agree() -> ConnectionError | None:
        if not vote:
            barrier()
            return None
        votes = [failed[0] if failed else None]
        if world > 1:
            votes = [None] * world
            dist.all_gather_object(votes, failed[0] if failed else None)
        first = next((v for v in votes if v), None)
        return ConnectionError(first) if first else None

    if is_sharded(model):
        msd, osd = get_state_dict(model, opt)
        shards = {"model": msd, "optim": osd["state"]}
        manifest = io_stream.join(path, io_stream.MANIFEST)
        if rank == 0 and io_stream.exists(manifest):  # a re-save: the old manifest must not
            attempt(lambda: io_stream.remove(manifest))  # vouch for half-written new shards
        barrier()
        attempt(lambda: dcp.save(shards, storage_writer=dcp_writer(io_stream.join(path, "dcp"))))
        state["optimizer_param_groups"] = osd["param_groups"]
    elif rank == 0:
        state["model"] = unwrap(model).state_dict()
        state["optimizer"] = opt.state_dict()
    _crash_hook(state["step"], rank)
    voted: list[ConnectionError | None] = []

    def before_manifest() -> None:  # every rank wrote its part, or some rank's S3 went down
        voted.append(agree())
        if voted[0] is not None:
            raise voted[0]

    if rank == 0:
        attempt(lambda: io_stream.save_ckpt(state, path, before_manifest=before_manifest))
    if not voted:
        agree()
    return agree()


def load_train_state(path: str, model, opt) -> dict:
    """Restore model and optimizer in place from a checkpoint (either layout) on every rank;
    returns the rest of the state. DCP reshards when the world size differs."""
    state = io_stream.load_ckpt(path)
    opt = getattr(opt, "optimizer", opt)
    if "optimizer_param_groups" in state:  # DCP shards; loading reshards to this world size
        msd, osd = get_state_dict(model, opt)
        shards = {"model": msd, "optim": osd["state"]}
        dcp.load(shards, storage_reader=dcp_reader(io_stream.join(path, "dcp")))
        groups = state["optimizer_param_groups"]
        set_state_dict(
            model,
            opt,
            model_state_dict=shards["model"],
            optim_state_dict={"state": shards["optim"], "param_groups": groups},
        )
    elif "model" not in state:
        raise ValueError(f"{path}: no model state in this checkpoint")
    elif is_sharded(model):  # a single-process checkpoint resumed under FSDP
        full = StateDictOptions(full_state_dict=True)
        set_state_dict(
            model,
            opt,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=full,
        )
    else:
        own = unwrap(model).state_dict()
        for key, saved in state["model"].items():
            if key in own and saved.shape != own[key].shape:
                raise ValueError(
                    f"{path}: checkpoint has {key} of shape {list(saved.shape)}, "
                    f"the model has {list(own[key].shape)}"
                )
        unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    rank, world = rank_world()
    if len(state.get("rng") or []) == world:
        set_rng_state(state["rng"][rank])
    return state


def dcp_writer(path: str):
    """A torch.distributed.checkpoint writer for a local folder or S3 prefix (no fsync on S3)."""
    kind, p = io_stream.resolve(path)
    if kind == "local":
        return FileSystemWriter(p)
    return FsspecWriter(p, sync_files=False, **io_stream.s3_options())


def dcp_reader(path: str):
    """A torch.distributed.checkpoint reader for a local folder or S3 prefix."""
    kind, p = io_stream.resolve(path)
    return FileSystemReader(p) if kind == "local" else FsspecReader(p, **io_stream.s3_options())


# ---------------------------------------------------------------------------------------------
# Which checkpoints exist: pruning, the fallback mirror, resume discovery


def prune_ckpts(root: str, keep_last: int, *, fallback: bool = False) -> list[int]:
    """Delete all but the newest `keep_last` complete checkpoints under root; with `fallback`
    (train.checkpoint_fallback) those in its s3.fallback_root mirror count too, by step, and a
    checkpoint that S3 is down to delete stays for a later save to prune. Returns the steps
    whose checkpoints are still there."""
    steps = ckpt_steps(root, mirror=fallback)
    kept = set(steps)
    for step in sorted(steps)[:-keep_last] if keep_last > 0 else []:
        kept.discard(step)
        for old in steps[step]:
            try:
                io_stream.remove_ckpt(old)
            except ConnectionError as exc:
                if not fallback:
                    raise
                kept.add(step)
                print(f"warning: {exc}; {old} stays for a later save to prune", file=sys.stderr)
    return sorted(kept)


def ckpt_steps(run_dir: str, *, mirror: bool) -> dict[int, list[str]]:
    """Complete checkpoints of a run folder by step; with `mirror`, also those in its
    s3.fallback_root mirror (listed after the S3 one; S3 being down then only warns)."""
    places = [run_dir]
    local = io_stream.fallback_path(run_dir, writing=True) if mirror else None
    if local is not None:
        places.append(local)
    steps: dict[int, list[str]] = {}
    for place in places:
        for path in listing(io_stream.list_ckpts, place, local, "checkpoints"):
            steps.setdefault(int(path.rsplit("_", 1)[1]), []).append(path)
    return steps


def listing(list_fn: Callable[[str], list[str]], place: str, local: str | None, what: str) -> list:
    """list_fn(place); [] with a warning when S3 is down there and the mirror `local` stands in."""
    try:
        return list_fn(place)
    except ConnectionError as exc:
        if local is None or place == local:
            raise
        print(f"warning: {exc}; looking for {what} in {local} only", file=sys.stderr)
        return []


def fallback_tags() -> dict[str, str]:
    """MLflow tags naming the inputs read from, and the checkpoints written to, s3.fallback_root
    in this process ({} when S3 never failed)."""
    tags = {}
    reads = [f"{uri} <- {local}" for uri, local in io_stream.fallback_used()]
    for key, items in (("s3_fallback_reads", reads), ("s3_fallback_checkpoints", _fallback_ckpts)):
        text = "; ".join(items)
        if text:  # MLflow caps a tag value at 8000 characters
            tags[key] = text if len(text) <= 8000 else f"{text[:7900]} ... ({len(items)} in all)"
    return tags


def find_resume(resume: str | None, root: str, run_name: str | None, algo: str) -> str | None:
    """--resume auto: the newest complete checkpoint of train.run_name, or of the latest <algo>-* run
    that has one, on S3 or in its s3.fallback_root mirror (train.checkpoint_fallback writes there
    while S3 is down; the mirror's copy wins a tie); --resume PATH: that checkpoint, which must be
    complete."""
    if resume is None:
        return None
    if resume != "auto":
        if not io_stream.exists(io_stream.join(resume, io_stream.MANIFEST)):
            raise FileNotFoundError(
                f"{resume}: not a complete checkpoint (no {io_stream.MANIFEST})"
            )
        return resume
    if run_name:
        names = [check_run_name(run_name)]
    else:  # timestamped names sort by time
        local = io_stream.fallback_path(root, writing=True)
        names = listing(io_stream.list_dir, root, local, "runs")
        names += io_stream.list_dir(local) if local else []
        names = [n for n in sorted(set(names), reverse=True) if n.startswith(f"{algo}-")]
    for name in names:
        steps = ckpt_steps(io_stream.join(root, name), mirror=True)
        if steps:
            return steps[max(steps)][-1]
    return None


def read_ckpt_meta(path: str) -> dict:
    """A checkpoint's small fields (run_name, mlflow_run_id, step, config) from its manifest alone."""
    manifest = io_stream.join(path, io_stream.MANIFEST)
    try:
        meta = json.loads(io_stream.read_bytes(manifest))["state"]
        if isinstance(meta["run_name"], str) and isinstance(meta["config"], dict):
            return meta
    except (ValueError, KeyError, TypeError, RecursionError):
        pass
    raise ValueError(f"{manifest}: not a training checkpoint's manifest")


# ---------------------------------------------------------------------------------------------
# What a resume changes


def config_dict(cfg: Config) -> dict:
    """The config as plain JSON types for checkpoints, credentials in its strings masked (redact)."""

    def clean(node: object) -> object:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return redact(node) if isinstance(node, str) else node

    return clean(msgspec.to_builtins(cfg))


# config keys a resume may change without --resume-with-changes: where things go, not what is trained
FREE_KEYS = (
    "s3.",
    "mlflow.",
    "paths.checkpoints",
    "train.run_name",
    "train.log_every",
    "train.plot_every",
    "train.save_every",
    "train.keep_last",
    "train.shard_frozen_over_gib",
    "train.checkpoint_fallback",
    "train.heldout_every",
    "train.compile",
    "train.max_nonfinite_steps",
    "data.heldout",
    "decode.",
)


def _flat(node: dict, schema: type = Config, prefix: str = "") -> dict:
    """`section.key -> value` for the config fields present in `node` (a config as JSON types)."""
    out = {}
    for f in msgspec.structs.fields(schema):
        if f.name not in node:
            continue
        key, value = prefix + f.name, node[f.name]
        if (
            isinstance(f.type, type)
            and issubclass(f.type, msgspec.Struct)
            and isinstance(value, dict)
        ):
            out |= _flat(value, f.type, key + ".")
        elif isinstance(value, dict) and value.keys() == {"__tuple__"}:
            out[key] = value["__tuple__"]  # a tuple as a checkpoint manifest spells it
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _shown(value) -> str:
    """A config value for a message; locations (which may carry credentials) are not repeated."""
    if isinstance(value, dict) or (isinstance(value, str) and ("/" in value or ":" in value)):
        return "(a location)"
    return value if isinstance(value, str) else json.dumps(value)


def describe_changes(changes: dict[str, tuple]) -> str:
    """`key old -> new, ...` for a message or an MLflow tag."""
    return ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in changes.items())


def resume_changes(ckpt: str, saved: dict, cfg: Config, allow: bool) -> dict[str, tuple]:
    """{key: (checkpoint's, config's)} for what a resume changes, FREE_KEYS aside. A changed model
    shape or algo is refused; other changes are unless `allow` (--resume-with-changes)."""
    old, new = _flat(saved), _flat(config_dict(cfg))
    changes = {
        k: (old[k], v)
        for k, v in new.items()
        if k in old and old[k] != v and not k.startswith(FREE_KEYS)
    }
    fixed = [
        f"checkpoint has {k.rsplit('.', 1)[-1]} {_shown(a)}, config has {_shown(b)}"
        for k, (a, b) in changes.items()
        if k.startswith("model.") or k == "train.algo"
    ]
    if fixed:
        raise ConfigError(f"{ckpt}: {'; '.join(fixed)} (a resumed run keeps its model and algo)")
    if changes and not allow:
        raise ConfigError(
            f"{ckpt}: the config changes {describe_changes(changes)}; pass --resume-with-changes"
            " to resume with these changes (they are recorded in MLflow)"
        )
    return changes


def apply_hparams(cfg: Config, opt, sched, value_opt=None) -> None:
    """After a resume with changes: the optimizers take the config's lr, betas and weight decay (and
    critic.value_lr) rather than the checkpoint's, which loading their state brought back."""
    t = cfg.train
    sched.base_lrs = [t.lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas):
        group.update(
            initial_lr=t.lr,
            lr=t.lr * factor(sched.last_epoch),
            betas=tuple(t.betas),
            weight_decay=t.weight_decay,
        )
    for group in value_opt.param_groups if value_opt is not None else []:
        group["lr"] = cfg.critic.value_lr
