"""What the bytes mean: the config schema here; models, tokenizers, data, loss and weights re-exported.

`from wmtp import mtp_loss, load_model, iter_dataset, load_config` is all a notebook needs.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Literal

import msgspec
import yaml

import io_stream

# ---------------------------------------------------------------------------------------------
# Config schema: one file for every machine (see config.yaml for what each key means)


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Models(_Strict):
    base: str | None = None
    ref: str | None = None
    rm: str | None = None


class Paths(_Strict):
    models: Models = msgspec.field(default_factory=Models)
    datasets: dict[str, str] = msgspec.field(default_factory=dict)
    value_head: str = "runs/value_head.safetensors"
    checkpoints: str = "runs/checkpoints"


class S3(_Strict):
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None


class MLflow(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    registry_uri: str | None = None
    experiment: str = "wmtp"
    artifact_location: str | None = None
    value_head_model: str = "wmtp_critic_value_head"


class ModelDims(_Strict):
    vocab_size: int = 259
    dim: int = 128
    n_layers: int = 6
    n_heads: int = 4
    n_attn_heads: int = 4
    n_kv_heads: int | None = None
    max_seq_len: int = 512


class Data(_Strict):
    train: list[str] = msgspec.field(default_factory=lambda: ["humaneval"])
    split: str = "train"
    heldout_fraction: float = 0.1
    max_length: int = 384
    prompt_loss: bool = False
    shuffle: bool = True


class Train(_Strict):
    algo: Literal["baseline", "critic", "rho1-weighted", "rho1-tokenskip"] = "baseline"
    epochs: int = 1
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 2
    seed: int = 42
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    run_name: str | None = None
    shard_frozen_over_gib: float = 6.0


class Critic(_Strict):
    gamma: float = 0.99
    discount: float = 0.95
    temperature: float = 0.7
    normalize: Literal["heads", "tokens"] = "heads"
    eps: float = 0.05
    max_weight: float = 3.0
    value_coef: float = 0.0
    value_lr: float = 1e-5
    value_head: str | None = None
    lr: float = 1e-3
    max_steps: int = 60
    batch_size: int = 8
    eval_every: int = 10
    patience: int = 3
    min_delta: float = 1e-4


class Rho1(_Strict):
    temperature: float = 0.7
    normalize: Literal["heads", "tokens"] = "tokens"
    keep_ratio: float = 0.7
    eps: float = 0.05
    max_weight: float = 3.0


class Config(_Strict):
    paths: Paths = msgspec.field(default_factory=Paths)
    s3: S3 = msgspec.field(default_factory=S3)
    mlflow: MLflow = msgspec.field(default_factory=MLflow)
    model: ModelDims = msgspec.field(default_factory=ModelDims)
    data: Data = msgspec.field(default_factory=Data)
    train: Train = msgspec.field(default_factory=Train)
    critic: Critic = msgspec.field(default_factory=Critic)
    rho1: Rho1 = msgspec.field(default_factory=Rho1)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


LEGACY_KEYS = {
    "cache",
    "launcher",
    "devices",
    "s3_auth",
    "optim",
    "loss",
    "pretrain",
    "run",
    "eval",
    "project",
    "log_interval",
    "seed",
}
_SECRET_PARTS = {"secret", "token", "password", "passwd", "credential", "credentials", "session"}


def _looks_secret(key: str) -> bool:
    """True for keys such as access_key_id, secret_access_key, token, password."""
    k = key.lower()
    return "access_key" in k or bool(_SECRET_PARTS & set(re.split(r"[_\-.]", k)))


def _check_keys(raw: Any, schema: type, where: str, source: str) -> None:
    """Refuse unknown, legacy and secret-looking keys, naming the dotted path."""
    if not isinstance(raw, dict):
        return
    fields = {f.name: f.type for f in msgspec.structs.fields(schema)}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if _looks_secret(str(key)):
            raise ConfigError(
                f"{source}: {dotted}: credentials do not belong in the config; set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY in the environment or use a profile (s3.profile)"
            )
        if key not in fields:
            if (not where and key in LEGACY_KEYS) or dotted == "paths.cache":
                raise ConfigError(
                    f"{source}: {dotted} is a key of the old config layout; run `python migrate.py config OLD.yaml -o config.yaml`"
                )
            raise ConfigError(f"{source}: unknown key {dotted!r}")
        sub = fields[key]
        if isinstance(sub, type) and issubclass(sub, msgspec.Struct):
            if not isinstance(value, dict):
                hint = (
                    " (old layout; run `python migrate.py`)"
                    if dotted == "paths.checkpoints"
                    else ""
                )
                raise ConfigError(f"{source}: {dotted} must be a mapping{hint}")
            _check_keys(value, sub, dotted, source)
        elif dotted == "paths.checkpoints" and isinstance(value, dict):
            raise ConfigError(
                f"{source}: paths.checkpoints is a mapping in the old layout; run `python migrate.py`"
            )


def _apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to the raw config dict."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _expand_path(p: str | None) -> str | None:
    """Make a configured location usable: pkg:<package>/<file> -> installed file; local -> absolute."""
    if p is None:
        return None
    if p.startswith("pkg:"):
        package, _, rel = p[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{p}: package {package!r} is not installed")
        full = os.path.join(list(spec.submodule_search_locations)[0], rel)
        if not os.path.exists(full):
            raise ConfigError(f"{p}: no such file in package {package!r} ({full})")
        return full
    if p.startswith(("runs:/", "models:/")):
        return p
    return io_stream.resolve(p)[1]


def load_config(
    path: str | None = "config.yaml", overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Read config.yaml (local or S3), apply `key=value` overrides, validate strictly."""
    if path is None:
        return parse_config("", "<defaults>", overrides)
    try:
        text = io_stream.read_bytes(path).decode()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    return parse_config(text, path, overrides)


def parse_yaml_mapping(text: str, source: str) -> dict:
    """YAML text whose top level is a mapping (empty text: {}); errors name the source and line."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}:" if mark else ""
        raise ConfigError(
            f"{source}:{at} not valid YAML ({getattr(exc, 'problem', None) or exc})"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    return raw


def parse_config(text: str, source: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate config YAML text; errors name `source` and the key."""
    raw = parse_yaml_mapping(text, source)
    _check_keys(raw, Config, "", source)
    for item in overrides:
        _apply_override(raw, item)
        _check_keys(raw, Config, "", f"--set {item}")
    try:
        # strict=False lets YAML 1.1 strings such as 1e-5 become floats
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = re.search(r"- at `\$\.?(.*)`", msg)
        where = m.group(1) if m else ""
        raise ConfigError(f"{source}: {where}: {msg.split(' - at')[0]}") from None
    for name, p in list(cfg.paths.datasets.items()):
        cfg.paths.datasets[name] = _expand_path(p)
    m = cfg.paths.models
    m.base, m.ref, m.rm = _expand_path(m.base), _expand_path(m.ref), _expand_path(m.rm)
    cfg.paths.value_head = _expand_path(cfg.paths.value_head)
    cfg.paths.checkpoints = _expand_path(cfg.paths.checkpoints)
    cfg.critic.value_head = _expand_path(cfg.critic.value_head)
    if cfg.mlflow.artifact_location and "://" not in cfg.mlflow.artifact_location:
        cfg.mlflow.artifact_location = _expand_path(cfg.mlflow.artifact_location)
    for name in cfg.data.train:
        if name not in cfg.paths.datasets:
            raise ConfigError(
                f"{source}: data.train names {name!r}, which is not in paths.datasets"
            )
    return cfg


def config_params(cfg: Config) -> dict[str, str]:
    """Flat `section.key -> value` strings for MLflow params, with anything secret-looking removed."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not _looks_secret(str(k)):
                    walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = re.sub(r"//[^/@\s]+@", "//***@", str(node))  # user:pass@ in URIs

    walk(msgspec.to_builtins(cfg), "")
    return flat


# ---------------------------------------------------------------------------------------------
# One import for notebooks: from wmtp import mtp_loss, load_model, iter_dataset, ...

from wmtp_data import (  # noqa: E402
    Example,
    ValueHead,
    collate,
    critic_weights,
    encode,
    iter_dataset,
    mtp_loss,
    mtp_targets,
    next_token_ce,
    rho1_excess,
    rho1_weights,
    uniform_weights,
    value_targets,
    weight_stats,
)
from wmtp_model import (  # noqa: E402
    MTPModel,
    Tokenizer,
    byte_tokenizer,
    init_mtp_model,
    load_model,
    load_tokenizer,
    same_tokenizer,
    save_model,
)

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "parse_config",
    "Example",
    "ValueHead",
    "collate",
    "critic_weights",
    "encode",
    "iter_dataset",
    "mtp_loss",
    "mtp_targets",
    "next_token_ce",
    "rho1_excess",
    "rho1_weights",
    "uniform_weights",
    "value_targets",
    "weight_stats",
    "MTPModel",
    "Tokenizer",
    "byte_tokenizer",
    "init_mtp_model",
    "load_model",
    "load_tokenizer",
    "same_tokenizer",
    "save_model",
]
