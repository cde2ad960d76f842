"""The trainers' command line: arguments, log level, one-line errors.

Imports nothing heavy (no torch, transformers, mlflow or s3fs), so that `--help` and a misused
flag answer at once; the trainers import the rest once their arguments are parsed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

LOGGER = "wmtp"  # the kit's messages; accelerate.logging.get_logger(LOGGER) on rank 0 only


def parse_args(
    argv: list[str] | None, description: str, with_algo: bool, with_resume: bool = True
) -> argparse.Namespace:
    """The trainers' common command line (argparse exits with code 2 on misuse); sets the kit's
    log level: INFO, or WARNING with --quiet."""
    p = argparse.ArgumentParser(
        description=description,
        epilog="WMTP_DEBUG=1 in the environment: errors with their traceback.",
    )
    p.add_argument(
        "--config", default="config.yaml", help="config file, local or s3:// (default: config.yaml)"
    )
    if with_algo:
        p.add_argument("--algo", choices=["baseline", "critic", "rho1-weighted", "rho1-tokenskip"])
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.lr=1e-5",
    )
    if with_resume:
        p.add_argument(
            "--resume",
            default=None,
            metavar="auto|PATH",
            help="resume from the newest complete checkpoint, or a given one",
        )
        p.add_argument(
            "--resume-with-changes",
            action="store_true",
            help="resume although hyperparameters differ from the checkpoint's (recorded in MLflow)",
        )
        p.add_argument(
            "--force-unlock",
            action="store_true",
            help="take the run folder's lock even from a holder that may be alive (on another host)",
        )
    p.add_argument(
        "--quiet", action="store_true", help="warnings and errors only: no summary, no progress bar"
    )
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    args = p.parse_args(argv)
    if args.print_config:
        print_config(args)
    logging.getLogger(LOGGER).setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.quiet:  # MLflow sets its loggers' level from this when it is imported
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    return args


PRINT_CONFIG_HELP = "print the resolved config (defaults, file, --set and flags) as YAML and exit"


def config_overrides(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The --set overrides with those the flags make (--algo), and {key: flag} for the latter."""
    overrides, flags = list(args.set), dict(getattr(args, "flags", {}))
    if getattr(args, "algo", None):
        overrides.append(f"train.algo={args.algo}")
        flags["train.algo"] = "--algo"
    return overrides, flags


def print_config(args: argparse.Namespace) -> None:
    """--print-config: the resolved config on stdout, exit 0; a bad one is one line, exit 2."""
    from wmtp import ConfigError, config_yaml, load_config

    overrides, flags = config_overrides(args)
    try:
        cfg = load_config(args.config, overrides, flags)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"# {args.config}" + "".join(f" --set {item}" for item in overrides))
    print(config_yaml(cfg), end="")
    sys.exit(0)


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a trainer with the kit's messages on stderr (time-stamped, kept clear of the progress
    bar); user errors become one line and a non-zero exit: 2 for a bad config or command line,
    1 otherwise, 130 on Ctrl-C. WMTP_DEBUG=1 raises them with their traceback instead."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    log = logging.getLogger(LOGGER)
    handler = logging.StreamHandler()  # stderr as it is now
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False
    try:
        with logging_redirect_tqdm([log]):
            main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, ValueError, KeyError) as exc:  # OSError: also a full disk, a changed object
        if os.environ.get("WMTP_DEBUG"):
            raise
        from wmtp import ConfigError, redact  # imported by main before it could raise

        msg = str(exc).strip("'\"").splitlines()[0] if str(exc) else type(exc).__name__
        msg = str(exc) if isinstance(exc, ConfigError) else msg
        print(f"error: {redact(msg)}", file=sys.stderr)  # e.g. a tracking URI's password
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except Exception as exc:  # MLflow's (a tracking server down) are one line; a bug, a traceback
        if os.environ.get("WMTP_DEBUG"):
            raise
        import traceback

        from wmtp import redact

        if type(exc).__module__.startswith("mlflow"):
            text = f"error: MLflow: {(str(exc) or type(exc).__name__).splitlines()[0]}\n"
        else:  # never with a credential in it: URIs with a password appear in messages
            text = "".join(traceback.format_exception(exc))
        print(redact(text), file=sys.stderr, end="")
        sys.exit(1)
    finally:
        log.removeHandler(handler)
        log.propagate = True
