"""Where bytes come from and go to: local paths and s3:// URIs, streamed with bounded memory.

No model code lives here. Every other module reads and writes through these functions:
`resolve`, `open_stream`, `iter_records`, `read_safetensors`, `write_safetensors`,
`save_ckpt`, `load_ckpt`, `latest_ckpt`.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import secrets
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import msgspec

if TYPE_CHECKING:
    import torch

BLOCK_SIZE = 8 * 2**20  # bytes per ranged GET
PART_SIZE = 16 * 2**20  # bytes per multipart part (up to 160 GB in S3's 10,000 parts)
MAX_IN_FLIGHT = 32  # concurrent ranged GETs of a large read (S3's ~30 ms first byte: BENCHMARKS.md)
MAX_HEADER = 100 * 2**20  # safetensors header size cap
MIN_PART = 5 * 2**20  # S3's smallest multipart part (all but the last)
HEADER_PROBE = 64 * 2**10  # first GET of a safetensors file: the length and most headers
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"

# ---------------------------------------------------------------------------------------------
# Locations


def _package_path(p: str) -> str:
    """pkg:<package or module>/<rel> -> <folder of that installed package or module>/<rel>."""
    import importlib.util

    name, _, rel = p[len("pkg:") :].partition("/")
    try:
        spec = importlib.util.find_spec(name) if name else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not (spec.submodule_search_locations or spec.origin):
        raise FileNotFoundError(f"{p}: no installed package or module named {name!r}")
    if spec.submodule_search_locations:  # a package: its folder
        folder = list(spec.submodule_search_locations)[0]
    else:  # a top-level module such as wmtp.py: the folder it sits in
        folder = os.path.dirname(spec.origin)
    return os.path.join(folder, rel)


OLD_MBPP = "pkg:wmtp/data/mbpp"  # where the kit's MBPP was (a top-level `data` package)


def resolve(path: str | os.PathLike) -> tuple[str, str]:
    """Return ("s3", "s3://bucket/key") or ("local", absolute path); other schemes are an error.

    `pkg:<package>/<rel>` names a file shipped inside an installed package (its folder) or beside
    a top-level module (`pkg:wmtp_mbpp` is the kit's own copy of MBPP)."""
    p = os.fspath(path)
    if not isinstance(p, str) or not p:
        raise ValueError(f"not a path: {path!r}")
    if p == OLD_MBPP or p.startswith(OLD_MBPP + "/"):  # configs written before MBPP moved
        p = "pkg:wmtp_mbpp" + p[len(OLD_MBPP) :]
    if p.startswith("pkg:"):
        return "local", os.path.abspath(_package_path(p))
    scheme = urlparse(p).scheme if "://" in p else ""
    if scheme == "s3":
        parts = p[len("s3://") :]
        if not parts or parts.startswith("/"):
            raise ValueError(f"S3 URI has no bucket: {p}")
        if "?versionId=" in parts:  # s3fs would cut it off and read or overwrite the latest version
            raise ValueError(f"{p}: S3 version ids are not supported; name the object by its key")
        return "s3", "s3://" + parts.rstrip("/")
    if scheme == "file":
        return "local", os.path.abspath(os.path.expanduser(p[len("file://") :]))
    if scheme:
        raise ValueError(f"unsupported URI scheme {scheme!r} in {p} (use a local path or s3://)")
    return "local", os.path.abspath(os.path.expanduser(p))


def join(base: str, *names: str) -> str:
    """Join path parts for a local path or an s3:// URI."""
    kind, root = resolve(base)
    if kind == "s3":
        return "/".join([root.rstrip("/"), *(n.strip("/") for n in names)])
    return os.path.join(root, *names)


# ---------------------------------------------------------------------------------------------
# S3 settings and errors

CONNECT_TIMEOUT = 10.0  # seconds to open a connection to the S3 endpoint
READ_TIMEOUT = 20.0  # seconds an open connection may stay silent before the request is retried
RETRIES = 3  # retries of a failed request, and resumes of one ranged GET, before giving up
# Slowest average a request's body may move at, after read_timeout's grace: a GET of n bytes gets
# read_timeout + n / MIN_READ_RATE seconds, a part or PUT read_timeout + n / MIN_WRITE_RATE, then
# it is cut (and resumed or retried). Reads share the link between MAX_IN_FLIGHT GETs; parts go
# one at a time, so they get all of it.
MIN_READ_RATE = 64 * 2**10  # bytes/s per GET: 8 MiB blocks get 20 + 128 s
MIN_WRITE_RATE = 2**20  # bytes/s per upload: 16 MiB parts get 20 + 16 s

_s3_settings: dict[str, Any] = {
    "endpoint_url": None,
    "region": None,
    "profile": None,
    "connect_timeout": CONNECT_TIMEOUT,
    "read_timeout": READ_TIMEOUT,
    "retries": RETRIES,
    "min_read_rate": MIN_READ_RATE,
    "min_write_rate": MIN_WRITE_RATE,
    "max_concurrency": None,  # None: MAX_IN_FLIGHT
    "block_size": None,  # None: BLOCK_SIZE
    "fallback_root": None,  # configure_s3: s3.fallback_root, else WMTP_S3_FALLBACK, else none
}
_s3_fs: dict[tuple, Any] = {}
_s3_lock = threading.Lock()


def configure_s3(
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    *,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    retries: int | None = None,
    min_read_rate: float | None = None,
    min_write_rate: float | None = None,
    max_concurrency: int | None = None,
    block_size: int | None = None,
    fallback_root: str | None = None,
) -> None:
    """Set S3 endpoint/region/profile (None: the standard AWS environment), connect/read timeouts
    in seconds and retries (None: CONNECT_TIMEOUT, READ_TIMEOUT, RETRIES), the slowest bytes/s a
    GET body or an upload may average (None: MIN_READ_RATE, MIN_WRITE_RATE), the ranged GETs in
    flight and bytes per GET of large reads (None: MAX_IN_FLIGHT, BLOCK_SIZE), and the local
    mirror that reads fall back to when S3 is down (None: WMTP_S3_FALLBACK, else none)."""
    for name, value in (("max_concurrency", max_concurrency), ("block_size", block_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"s3.{name} must be a positive integer, not {value!r}")
    for name, value in (("min_read_rate", min_read_rate), ("min_write_rate", min_write_rate)):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is not None and not (number and 0 < value < math.inf):
            raise ValueError(f"s3.{name} must be a positive number of bytes/s, not {value!r}")
    _s3_settings.update(
        max_concurrency=max_concurrency,
        block_size=block_size,
        endpoint_url=endpoint_url or None,
        region=region or None,
        profile=profile or None,
        connect_timeout=CONNECT_TIMEOUT if connect_timeout is None else float(connect_timeout),
        read_timeout=READ_TIMEOUT if read_timeout is None else float(read_timeout),
        retries=RETRIES if retries is None else int(retries),
        min_read_rate=MIN_READ_RATE if min_read_rate is None else float(min_read_rate),
        min_write_rate=MIN_WRITE_RATE if min_write_rate is None else float(min_write_rate),
        fallback_root=pick_fallback_root(fallback_root),
    )
    _s3_fs.clear()
    _s3_down.clear()
    _fallback_reads.clear()


def s3_options() -> dict:
    """s3fs.S3FileSystem arguments for the current settings (config section, then AWS environment)."""
    endpoint = (
        _s3_settings["endpoint_url"]
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = (
        _s3_settings["region"]
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
    )
    return {
        "endpoint_url": endpoint,
        "profile": _s3_settings["profile"] or os.environ.get("AWS_PROFILE"),
        "client_kwargs": {"region_name": region} if region else {},
        "config_kwargs": {  # botocore retries failed requests with backoff; s3fs does not
            "connect_timeout": _s3_settings["connect_timeout"],
            "read_timeout": _s3_settings["read_timeout"],
            "retries": {"total_max_attempts": _s3_settings["retries"] + 1, "mode": "standard"},
            # aiobotocore's pool holds 10 connections by default: fewer than the GETs in flight
            "max_pool_connections": max(10, _s3_settings["max_concurrency"] or MAX_IN_FLIGHT),
        },
        "use_listings_cache": False,
    }


def s3_filesystem():
    """The s3fs filesystem for the current settings (one instance per setting and process)."""
    import s3fs

    opts = s3_options()
    key = (opts["endpoint_url"], opts["profile"], str(opts["client_kwargs"]), os.getpid())
    with _s3_lock:
        if key not in _s3_fs:
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
            fs.retries = 1  # its own retry loop would multiply botocore's attempts (and timeouts)
            _s3_fs[key] = fs
        return _s3_fs[key]


def _s3_error(uri: str, exc: BaseException) -> Exception:
    """Turn an s3fs/botocore failure into one clear exception naming the URI and no secret."""
    if str(exc).startswith(f"{uri}: "):  # made here already (e.g. a ranged GET out of retries)
        return exc
    # s3fs re-raises botocore's ClientError as OSError; the S3 error code stays on the cause
    response = getattr(exc, "response", None) or getattr(exc.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    types = " ".join(type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e)
    # Messages quote the request URL; a port like :40412 or a key named "AccessDenied" is no verdict
    text = re.sub(r"\S+://\S*", "", f"{exc} {exc.__cause__ or ''}").replace(uri[len("s3://") :], "")
    probe = f"{code} {types} {text}"
    bucket = uri[len("s3://") :].split("/", 1)[0]
    if "NoSuchBucket" in probe or "bucket does not exist" in probe.lower():
        return FileNotFoundError(f"{uri}: no such bucket {bucket!r}")
    if any(
        s in probe
        for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken")
    ):
        return PermissionError(
            f"{uri}: S3 rejected the credentials ({code or 'invalid'}; check AWS_PROFILE / AWS_ACCESS_KEY_ID)"
        )
    if "AccessDenied" in probe or isinstance(exc, PermissionError) or "Forbidden" in probe:
        # a HEAD carries no error code, so bad credentials and missing permission look alike
        return PermissionError(
            f"{uri}: access denied (wrong credentials or no permission; check AWS_PROFILE / AWS_ACCESS_KEY_ID)"
        )
    if "NoCredentials" in probe or "Unable to locate credentials" in probe:
        return PermissionError(
            f"{uri}: no AWS credentials found (set a profile or AWS_ACCESS_KEY_ID)"
        )
    if "ProfileNotFound" in probe:
        profile = _s3_settings["profile"] or os.environ.get("AWS_PROFILE")
        return PermissionError(f"{uri}: AWS profile {profile!r} not found")
    if "PreconditionFailed" in probe or "pre-conditions" in probe:
        return OSError(f"{uri}: the object changed while it was being read")
    if (
        isinstance(exc, FileNotFoundError)
        or code in ("NoSuchKey", "NotFound", "404")
        or status == 404
    ):
        return FileNotFoundError(f"{uri}: no such object")
    label, tries = _s3_endpoint_label(), f"s3.retries: {_s3_settings['retries']}"
    if "ConnectTimeout" in types:
        wait = _s3_settings["connect_timeout"]
        return ConnectionError(
            f"{uri}: no connection to the S3 endpoint ({label}) within {wait:g} s "
            f"(s3.connect_timeout; {tries})"
        )
    if "Timeout" in types:
        wait = _s3_settings["read_timeout"]
        return ConnectionError(
            f"{uri}: the S3 endpoint ({label}) sent nothing for {wait:g} s "
            f"(s3.read_timeout; {tries})"
        )
    if any(s in probe for s in ("Connect", "EndpointConnectionError", "Cannot connect")):
        return ConnectionError(f"{uri}: S3 endpoint unreachable ({label})")
    if isinstance(status, int) and status >= 500:  # botocore retried it s3.retries times
        what = f"{status} {code}" if code and code != str(status) else str(status)
        return ConnectionError(f"{uri}: S3 answered {what} ({tries})")
    causes = [e for e in (exc.__cause__, exc.__context__, exc) if e is not None]
    broken = next((e for e in causes if isinstance(e, _network_errors())), None)
    if broken is not None:
        return ConnectionError(f"{uri}: network error talking to S3 ({label}): {_why(broken)}")
    return OSError(f"{uri}: S3 error: {code or type(exc).__name__}")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types of a broken connection or a silent socket: the request may work again."""
    import aiohttp
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    return (
        ConnectionError,
        TimeoutError,
        aiohttp.ClientError,
        HTTPClientError,
        IncompleteReadError,
    )


def _why(exc: BaseException) -> str:
    """Exception type and the first line of its message, without URLs, for a one-line error."""
    lines = re.sub(r"\S+://\S*", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def _s3_endpoint_label() -> str:
    return (
        _s3_settings["endpoint_url"]
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "AWS default endpoint"
    )


def s3_call(uri: str, fn, *args, **kwargs):
    """Run an s3fs call, translating its failures with `_s3_error`."""
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError) as exc:
        raise _s3_error(uri, exc) from None
    except Exception as exc:  # botocore / aiohttp errors do not share a base class
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs"):
            raise _s3_error(uri, exc) from None
        raise


def s3_outage(uri: str, exc: BaseException) -> ConnectionError | None:
    """The ConnectionError that `exc` amounts to when S3 failed for a reason retries cannot fix
    (endpoint unreachable, timeouts or 5xx retries exhausted), also when it is a
    torch.distributed.checkpoint CheckpointException whose every failure is one; else None."""
    failures = getattr(exc, "failures", None)  # CheckpointException: {rank: (exception, trace)}
    causes = [f[0] for f in failures.values()] if isinstance(failures, dict) else [exc]
    found = []
    for cause in causes:
        if not isinstance(cause, ConnectionError) and isinstance(cause, Exception):
            cause = _s3_error(uri, cause)
        if not isinstance(cause, ConnectionError):
            return None
        found.append(cause)
    return found[0] if found else None


def request_deadline(nbytes: int, *, writing: bool = False) -> float:
    """Seconds one GET body of nbytes (or one part or PUT, `writing`) may take before it is cut:
    s3.read_timeout, plus the bytes at s3.min_read_rate (s3.min_write_rate)."""
    rate = _s3_settings["min_write_rate" if writing else "min_read_rate"]
    return _s3_settings["read_timeout"] + nbytes / rate


def answer_deadline() -> float:
    """Seconds a request may wait for its answer's head: each of botocore's s3.retries + 1 tries
    at s3.connect_timeout + s3.read_timeout, and the backoff between them (standard mode: at most
    2**i s, capped at 20, plus 5 s of an x-amz-retry-after). A body's own deadline starts after."""
    tries = _s3_settings["retries"] + 1
    backoff = sum(min(2**i, 20) + 5 for i in range(tries - 1))
    return tries * (_s3_settings["connect_timeout"] + _s3_settings["read_timeout"]) + backoff


async def _get_answer(fs, uri: str, **params) -> dict:
    """fs's get_object answer (its body not read yet) within `answer_deadline`, botocore's tries
    included; past it, a ConnectionError naming the settings."""
    clock = asyncio.timeout(answer_deadline())
    try:
        async with clock:
            return await fs._call_s3("get_object", **params)
    except TimeoutError:
        if not clock.expired():
            raise
    raise ConnectionError(
        f"{uri}: the S3 endpoint ({_s3_endpoint_label()}) sent no complete answer in "
        f"{answer_deadline():.0f} s (s3.connect_timeout, s3.read_timeout; "
        f"s3.retries: {_s3_settings['retries']})"
    )


def _slow_why(nbytes: int, limit: float, *, writing: bool) -> str:
    """Why a request was cut at its deadline, naming the settings that set it."""
    rate = "s3.min_write_rate" if writing else "s3.min_read_rate"
    return (
        f"{nbytes} bytes took over {limit:.1f} s ({rate}: {_s3_settings[rate[3:]]:.0f} bytes/s "
        f"after s3.read_timeout: {_s3_settings['read_timeout']:g} s)"
    )


def _put_bounded(fs, uri: str, method: str, data: bytes | memoryview, params: dict) -> dict:
    """fs's `method` (put_object, upload_part) with Body=data, each try cut at its
    `request_deadline`, s3.retries + 1 tries; then a ConnectionError. botocore's own timeouts
    only cover a silent socket while waiting for the answer, not a body the endpoint never reads.
    Errors come as s3fs raises them: callers translate them with `s3_call`."""
    from fsspec.asyn import sync

    limit = request_deadline(len(data), writing=True)
    tries = _s3_settings["retries"] + 1

    async def send() -> dict:
        for _ in range(tries):
            clock = asyncio.timeout(limit)
            try:
                async with clock:
                    # a fresh file object each try: a cancelled try's reader thread may still
                    # hold the last one; a file-like body goes to the socket in small chunks
                    return await fs._call_s3(method, Body=io.BytesIO(data), **params)
            except TimeoutError:
                if not clock.expired():
                    raise
        label = _s3_endpoint_label()
        raise ConnectionError(
            f"{uri}: {method} to the S3 endpoint ({label}) did not finish in {tries} tries: "
            f"{_slow_why(len(data), limit, writing=True)} (s3.retries: {tries - 1})"
        )

    return sync(fs.loop, send)


def s3_get(uri: str, **params) -> tuple[bytes, dict]:
    """(bytes, botocore's answer less Body plus "Age": seconds since it was written by the S3
    server's clock) of a small object or range (params: GetObject's Range, IfMatch, ...), from
    one GET. A failed condition is an answer, not an error: no bytes and its status, 412 or 304."""
    from fsspec.asyn import sync

    fs = s3_filesystem()
    bucket, key, _ = fs.split_path(uri)

    async def get() -> tuple[bytes, dict]:
        try:
            resp = await _get_answer(fs, uri, Bucket=bucket, Key=key, **params)
        except OSError as exc:  # s3fs keeps botocore's error, and its status, as the cause
            meta = (getattr(exc.__cause__, "response", None) or {}).get("ResponseMetadata", {})
            if meta.get("HTTPStatusCode") in (304, 412):
                return b"", {"ResponseMetadata": meta}
            raise
        body = resp.pop("Body")
        try:
            async with asyncio.timeout(request_deadline(int(resp.get("ContentLength") or 0))):
                return await body.read(), resp
        finally:
            body.close()

    data, resp = s3_call(uri, sync, fs.loop, get)
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(date).timestamp() if date else time.time()
    stamped = resp.get("LastModified")
    resp["Age"] = now - stamped.timestamp() if stamped else 0.0
    return data, resp


def s3_put_if(uri: str, data: bytes, etag: str | None = None) -> str | None:
    """PUT a small object only if its key is free (etag None: If-None-Match: *) or still holds
    `etag` (If-Match); its new ETag, or None when the condition failed (412, 409). An endpoint
    may ignore either header and write anyway: `migrate.py verify-s3` says which it honours."""
    fs = s3_filesystem()
    bucket, key, _ = fs.split_path(uri)
    where = {"Bucket": bucket, "Key": key, **({"IfNoneMatch": "*"} if etag is None else {})}
    where.update({"IfMatch": etag} if etag is not None else {})

    def put() -> dict:
        try:
            return _put_bounded(fs, uri, "put_object", data, where)
        except OSError as exc:  # s3fs keeps botocore's error, and its code, as the cause
            code = (getattr(exc.__cause__, "response", None) or {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return {}
            raise

    return s3_call(uri, put).get("ETag")


# ---------------------------------------------------------------------------------------------
# Fallback: a local mirror of S3 (`<fallback_root>/bucket/key`) read when S3 is down

FALLBACK_RECHECK_S = 60.0  # after S3 failed for good, reads skip it (and its timeouts) this long

_s3_down: dict[str, tuple[float, str]] = {}  # endpoint -> (time.monotonic() it failed, why)
_fallback_reads: dict[str, str] = {}  # s3:// URI -> the local copy read instead


def pick_fallback_root(root: str | None) -> str | None:
    """The local mirror for S3 reads: `root` (s3.fallback_root), else WMTP_S3_FALLBACK, as an
    absolute local folder; None for neither. The one place either is read and checked."""
    root = root or os.environ.get("WMTP_S3_FALLBACK")
    if not root:
        return None
    kind, p = resolve(root)
    if kind != "local":
        raise ValueError(f"s3.fallback_root / WMTP_S3_FALLBACK must be a local folder, not {root}")
    return p


def fallback_root() -> str | None:
    """The local mirror that S3 reads fall back to, as configure_s3 set it (None: no fallback)."""
    return _s3_settings["fallback_root"]


def fallback_path(uri: str, *, writing: bool = False) -> str | None:
    """`<fallback_root>/bucket/key` for an s3:// URI; None without a fallback root, for a local
    path, for a key with `.`/`..` parts, or (unless `writing`) for a bucket the mirror lacks."""
    root = fallback_root()
    kind, p = resolve(uri)
    if root is None or kind != "s3":
        return None
    parts = p[len("s3://") :].split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    if not writing and not os.path.isdir(os.path.join(root, parts[0])):
        return None
    return os.path.join(root, *parts)


def fallback_used() -> list[tuple[str, str]]:
    """(s3:// URI, local copy) of every read this process took from the fallback, in order."""
    return list(_fallback_reads.items())


def _s3_or_fallback(uri: str, s3_read: Callable[[], Any], local_read: Callable[[str], Any]):
    """s3_read(), or local_read(`<fallback_root>/bucket/key`) when S3 fails for a reason retries
    cannot fix (a ConnectionError; a missing object or a refused permission stays an error).
    For FALLBACK_RECHECK_S seconds after such a failure, reads go to the fallback at once.
    Every read of S3 goes through here, once per file: the same bytes, streamed the same way."""
    local = fallback_path(uri)
    if local is None:
        return s3_read()
    down = _s3_down.get(_s3_endpoint_label())
    if down is None or time.monotonic() - down[0] > FALLBACK_RECHECK_S:
        try:
            return s3_read()
        except ConnectionError as exc:
            why = _s3_failed(uri, exc)
    else:
        why = f"S3 failed {time.monotonic() - down[0]:.0f} s ago ({down[1]})"
    _note_fallback(uri, local, why)
    try:
        return local_read(local)
    except FileNotFoundError:
        raise ConnectionError(f"{uri}: {why}; the fallback has no copy at {local}") from None


def _s3_failed(uri: str, exc: ConnectionError) -> str:
    """Mark the endpoint down for FALLBACK_RECHECK_S seconds; the failure, without the URI."""
    why = str(exc).removeprefix(f"{uri}: ")
    _s3_down[_s3_endpoint_label()] = (time.monotonic(), why)
    return why


def _note_fallback(uri: str, local: str, why: str) -> None:
    """Warn once per URI that its bytes come from the fallback copy `local`, and record it."""
    if uri not in _fallback_reads:
        print(f"warning: {uri}: {why}; reading {local} (s3.fallback_root) instead", file=sys.stderr)
    _fallback_reads[uri] = local


# ---------------------------------------------------------------------------------------------
# Streams


class _LocalAtomicWriter(io.RawIOBase):
    """Writes to a temp file beside the target; renamed into place on close, removed on abort.
    The temp file is created as open() creates files (0666 less the umask), not 0600."""

    def __init__(self, path: str):
        folder = os.path.dirname(path) or "."
        self._path, self._f = path, None
        self._tmp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}-{os.path.basename(path)}")
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise _local_error(path, exc) from None
        self._f = os.fdopen(fd, "wb")

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self._f.write(b)
        except OSError as exc:  # a full disk, a quota: nothing is published
            self.abort()
            raise _local_error(self._path, exc) from None

    def abort(self) -> None:
        """Drop everything written so far; the target is untouched."""
        if self.closed:
            return
        super().close()
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass  # the flush of a dropped file failed: it goes anyway
            os.unlink(self._tmp)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._f.close()  # the last flush can hit a full disk too
            os.replace(self._tmp, self._path)
        except OSError as exc:
            self.abort()
            raise _local_error(self._path, exc) from None
        super().close()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self):
        self.abort()  # only an explicit close() publishes the file


def _local_error(path: str, exc: OSError) -> OSError:
    """The OS error (same errno, so the same subclass) naming the file the kit was writing."""
    return OSError(exc.errno, f"{path}: {exc.strerror or exc}") if exc.errno else exc


class _S3AtomicWriter(io.RawIOBase):
    """Multipart upload, one part at a time; an error or a missing close() aborts it all."""

    def __init__(self, uri: str, part_size: int):
        self._uri = uri
        self._fs = s3_filesystem()
        bucket, key, _ = self._fs.split_path(uri)
        self._where = {"Bucket": bucket, "Key": key}
        self._part_size = max(part_size, MIN_PART)
        self._part = io.BytesIO()
        self._upload_id: str | None = None
        self._parts: list[dict] = []  # {"PartNumber", "ETag"} of every uploaded part

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        while view:
            take = self._part_size - self._part.tell()
            self._part.write(view[:take])
            view = view[take:]
            if self._part.tell() == self._part_size:
                self._send_part()
        return n

    def _call(self, method: str, **kwargs) -> dict:
        return s3_call(self._uri, self._fs.call_s3, method, **self._where, **kwargs)

    def _put(self, method: str, **kwargs) -> dict:
        """upload_part or put_object of the buffered bytes, each try within its deadline."""
        data, self._part = self._part.getvalue(), io.BytesIO()
        params = {**self._where, **kwargs}
        return s3_call(self._uri, _put_bounded, self._fs, self._uri, method, data, params)

    def _send_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
        number = len(self._parts) + 1
        out = self._put("upload_part", UploadId=self._upload_id, PartNumber=number)
        self._parts.append({"PartNumber": number, "ETag": out["ETag"]})

    def abort(self) -> None:
        """Drop the upload; an older object at the key stays as it was."""
        if self.closed:
            return
        super().close()
        self._part = io.BytesIO()
        if self._upload_id is not None:
            self._call("abort_multipart_upload", UploadId=self._upload_id)

    def close(self) -> None:
        """Publish the object: it appears now, whole, or not at all."""
        if self.closed:
            return
        try:
            if self._upload_id is None:  # smaller than one part: a single PUT
                self._put("put_object")
            else:
                if self._part.tell():
                    self._send_part()
                self._call(
                    "complete_multipart_upload",
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        except BaseException:
            self.abort()
            raise
        super().close()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self):
        self.abort()  # only an explicit close() publishes the object


class _S3Reader(io.RawIOBase):
    """Seekable S3 object whose readinto fills the caller's buffer by ranged GETs (several in
    flight for a large buffer), each answer checked against the size and ETag seen at open.
    With a fallback copy of the object, a read that fails mid-way (S3 gone) continues from that
    copy at the same offset, once the copy is shown to hold the bytes already read."""

    def __init__(self, uri: str):
        info = s3_call(uri, s3_filesystem().info, uri)
        if info.get("type") == "directory":
            raise IsADirectoryError(f"is a folder, not a file: {uri}")
        self.uri, self.pos, self.failure = uri, 0, None
        self.size, self.etag = int(info["size"]), info.get("ETag")
        self.local = None  # the fallback copy, once S3 failed mid-way
        # [start, end, crc32] of the bytes handed out, kept only where a fallback could take over
        self.read_log: list[list[int]] | None = [] if fallback_path(uri) else None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if not n:
            return 0
        view = memoryview(b).cast("B")[:n]
        try:
            if self.local is None:
                try:
                    self.etag = _s3_read_ranges(
                        self.uri, [(view, self.pos, self.pos + n)], self.etag, self.size
                    )
                except ConnectionError as exc:
                    self.local = self._continue_from_fallback(exc)
            if self.local is not None:
                _read_exactly(self.local, self.pos, view)
        except OSError as exc:
            self.failure = exc  # kept for `stream_failure`: some parsers swallow it
            raise
        if self.read_log is not None:
            log = self.read_log
            if log and log[-1][1] == self.pos:  # sequential reads: one entry, its crc extended
                log[-1][1:] = [self.pos + n, zlib.crc32(view, log[-1][2])]
            else:
                log.append([self.pos, self.pos + n, zlib.crc32(view)])
        self.pos += n
        return n

    def _continue_from_fallback(self, exc: ConnectionError):
        """The fallback copy, open, when it holds this object's bytes so far; else raise exc."""
        local = fallback_path(self.uri)
        if local is None or self.read_log is None:
            raise exc
        why = _s3_failed(self.uri, exc)
        try:
            f = open(local, "rb")  # noqa: SIM115 (closed with the reader)
        except FileNotFoundError:
            raise ConnectionError(f"{exc}; the fallback has no copy at {local}") from None
        differs = _differs(f, self.size, self.read_log)
        if differs:
            f.close()
            raise ConnectionError(f"{exc}; the fallback copy {local} is another object ({differs})")
        _note_fallback(self.uri, local, f"{why} at byte {self.pos}")
        return f

    def readall(self) -> bytes:
        """The rest of the object in one parallel fetch (RawIOBase would GET it 8 KiB at a time)."""
        buf = bytearray(max(0, self.size - self.pos))
        self.readinto(buf)
        return bytes(buf)

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        super().close()


def _differs(f, size: int, read_log: list[list[int]]) -> str:
    """How a local file differs from an object of `size` bytes whose ranges in read_log
    ([start, end, crc32]) were read; "" when it does not."""
    have = os.fstat(f.fileno()).st_size
    if have != size:
        return f"{have} bytes, the object {size}"
    buf = memoryview(bytearray(min(BLOCK_SIZE, max(1, size))))
    for start, end, crc in read_log:
        got = 0
        for off in range(start, end, len(buf)):
            chunk = buf[: min(len(buf), end - off)]
            _read_exactly(f, off, chunk)
            got = zlib.crc32(chunk, got)
        if got != crc:
            return f"bytes {start}-{end - 1} differ from those read from S3"
    return ""


def _read_exactly(f, offset: int, view: memoryview) -> None:
    """Fill view with a local file's bytes from offset; an error naming the file if it ends first."""
    f.seek(offset)
    got = 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            raise OSError(
                f"{f.name}: ended at byte {offset + got}, before byte {offset + len(view)}"
            )
        got += k


def open_stream(path: str, mode: str = "rb", *, block_size: int | None = None):
    """Open a local file or S3 object; reads are bounded ranged GETs, writes are atomic.

    On S3, block_size is the size of each ranged GET (default s3.block_size) or of each multipart
    part (default PART_SIZE, at least 5 MiB).
    """
    if mode not in ("rb", "wb"):
        raise ValueError(f"open_stream supports 'rb' and 'wb', not {mode!r} ({path})")
    kind, p = resolve(path)
    if kind == "local":
        if mode == "wb":
            return _LocalAtomicWriter(p)
        try:
            return open(p, "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {p}") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"is a folder, not a file: {p}") from None
    if mode == "wb":
        return _S3AtomicWriter(p, block_size or PART_SIZE)
    # small reads and lines come from the buffer, each refill one ranged GET of block_size bytes;
    # a read larger than the buffer goes straight into the caller's memory by parallel GETs
    block_size = block_size or _s3_settings["block_size"] or BLOCK_SIZE
    return _s3_or_fallback(
        p, lambda: io.BufferedReader(_S3Reader(p), buffer_size=block_size), open_stream
    )


def stream_failure(f) -> OSError | None:
    """The S3 read error an `open_stream` reader hit, or None. torch.load, for one, replaces an
    error raised by its file's read with its own; this tells a network error from a bad file."""
    return getattr(getattr(f, "raw", f), "failure", None)


def file_sha256(path: str) -> str:
    """sha256 of a local or S3 file, read in bounded blocks."""
    digest = hashlib.sha256()
    with open_stream(path, "rb") as f:
        while block := f.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def file_size(path: str) -> int:
    """Size in bytes of a local file or S3 object."""
    kind, p = resolve(path)
    if kind == "local":
        try:
            return os.path.getsize(p)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {p}") from None
    return _s3_or_fallback(p, lambda: int(s3_call(p, s3_filesystem().size, p)), file_size)


def exists(path: str) -> bool:
    """True when a local file/folder or S3 object/prefix exists."""
    kind, p = resolve(path)
    if kind == "local":
        return os.path.exists(p)
    return _s3_or_fallback(p, lambda: bool(s3_call(p, s3_filesystem().exists, p)), exists)


def list_dir(path: str) -> list[str]:
    """Names (not paths) directly inside a local folder or S3 prefix; [] when there is none."""
    kind, p = resolve(path)
    if kind == "local":
        return sorted(os.listdir(p)) if os.path.isdir(p) else []
    return _s3_or_fallback(p, lambda: _s3_list(p), list_dir)


def _s3_list(p: str) -> list[str]:
    """`list_dir` of an S3 prefix, from S3 itself."""
    fs = s3_filesystem()
    try:
        entries = s3_call(p, fs.ls, p, detail=False, refresh=True)
    except FileNotFoundError as exc:
        if "no such bucket" in str(exc):
            raise
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def remove(path: str) -> None:
    """Delete a local file/folder or everything under an S3 prefix."""
    kind, p = resolve(path)
    if kind == "local":
        import shutil

        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)
        return
    fs = s3_filesystem()
    if not s3_call(p, fs.exists, p):
        return
    bucket = fs.split_path(p)[0]
    keys = [fs.split_path(q)[1] for q in s3_call(p, fs.find, p)]
    for i in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys
        batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
        out = s3_call(p, fs.call_s3, "delete_objects", Bucket=bucket, Delete=batch)
        # a bulk delete answers 200 and lists the keys it could not delete
        if errors := out.get("Errors"):
            uri, code = f"s3://{bucket}/{errors[0]['Key']}", errors[0].get("Code", "")
            kind_of = PermissionError if code == "AccessDenied" else OSError
            raise kind_of(f"{uri}: not deleted ({code}; {len(errors)} key(s) under {p} remain)")


_TMP_NAME = re.compile(r"^\.tmp-(?:[0-9a-f]{16}|[a-z0-9_]{8})-.")  # (and mkstemp's, before)


def cleanup_partial(prefix: str, older_than_s: float) -> list[str]:
    """Remove what killed writers of the kit left under a local folder or S3 prefix, if older
    than older_than_s seconds: `.tmp-*` files, unfinished multipart uploads. Returns them."""
    kind, p = resolve(prefix)
    removed = []
    if kind == "local":
        cutoff = time.time() - older_than_s
        for folder, _, names in os.walk(p):
            for name in names:
                f = os.path.join(folder, name)
                try:
                    if _TMP_NAME.match(name) and os.lstat(f).st_mtime <= cutoff:
                        os.unlink(f)
                        removed.append(f)
                except FileNotFoundError:
                    pass  # its writer finished (or cleaned up) meanwhile
        return removed
    fs = s3_filesystem()
    bucket, key, _ = fs.split_path(p)
    page = {"Bucket": bucket, "Prefix": key.rstrip("/") + "/" if key else ""}
    while True:
        out = s3_call(p, fs.call_s3, "list_multipart_uploads", **page)
        # ages by the server's clock (its Date header), which stamped the uploads
        date = out["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        for up in out.get("Uploads", []):
            if up["Initiated"].timestamp() <= now - older_than_s:
                where = {"Bucket": bucket, "Key": up["Key"], "UploadId": up["UploadId"]}
                s3_call(p, fs.call_s3, "abort_multipart_upload", **where)
                removed.append(f"s3://{bucket}/{up['Key']} (upload {up['UploadId']})")
        if not out.get("IsTruncated"):
            return removed
        page.update(KeyMarker=out["NextKeyMarker"], UploadIdMarker=out["NextUploadIdMarker"])


def read_bytes(path: str) -> bytes:
    """Whole content of a small file (configs, JSON, tokenizer models)."""
    with open_stream(path) as f:
        return f.read()


def write_bytes(data: bytes, path: str) -> None:
    """Write a small file atomically."""
    with open_stream(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------
# Records


MAX_RECORD = 128 * 2**20  # bytes of one record (a .jsonl line, a .json array element)
JSON_CHUNK = 2**20  # characters read at a time from a .json array


def iter_records(path: str, *, max_record: int = MAX_RECORD) -> Iterator[dict]:
    """Yield dicts from .jsonl / .jsonl.gz (streamed line by line) or .json (a top-level array,
    streamed element by element); a record over max_record bytes is an error, read no further."""
    _, p = resolve(path)
    name = p.lower()
    if name.endswith(".json"):
        with open_stream(p) as raw:
            yield from _json_array_records(p, raw, max_record)
        return
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        raise ValueError(f"{p}: unsupported record file (use .jsonl, .jsonl.gz or .json)")
    decoder = msgspec.json.Decoder()
    with open_stream(p) as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if name.endswith(".gz") else raw
        try:
            lineno = 0
            while True:
                try:  # bounded: a line without its newline after max_record bytes is refused
                    line = stream.readline(max_record + 1)
                except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                    raise ValueError(
                        f"{p}: line {lineno + 1}: corrupt compressed data ({exc})"
                    ) from None
                if not line:
                    break
                lineno += 1
                if len(line) > max_record and not line.endswith(b"\n"):
                    raise ValueError(
                        f"{p}: line {lineno}: longer than {max_record} bytes, the cap on one "
                        "record (io_stream.MAX_RECORD); is this one JSON object per line?"
                    )
                if not line.strip():
                    continue
                try:
                    rec = decoder.decode(line)
                except msgspec.DecodeError as exc:
                    raise ValueError(f"{p}: line {lineno}: malformed JSON ({exc})") from None
                except RecursionError:
                    raise ValueError(f"{p}: line {lineno}: JSON nested too deeply") from None
                if not isinstance(rec, dict):
                    raise ValueError(
                        f"{p}: line {lineno}: expected a JSON object, got {type(rec).__name__}"
                    )
                yield rec
        finally:
            if stream is not raw:
                stream.close()


def _json_array_records(p: str, raw, max_record: int) -> Iterator[dict]:
    """The objects of a top-level JSON array, decoded one at a time from a bounded window of the
    file (the window holds one record and at most JSON_CHUNK characters more)."""

    def no_constant(name: str):
        raise ValueError(f"{p}: not valid JSON ({name} is no JSON number)")

    # NaN and Infinity are refused, as msgspec refuses them in .jsonl
    text, scan = (
        codecs.getincrementaldecoder("utf-8")(),
        json.JSONDecoder(parse_constant=no_constant),
    )
    buf, pos, eof = "", 0, False

    def fill(n: int) -> None:
        """Drop what was consumed and append up to n more bytes of the file to the window."""
        nonlocal buf, pos, eof
        data = raw.read(n)
        eof = not data
        try:
            buf = buf[pos:] + text.decode(data, final=eof)
        except UnicodeDecodeError:
            raise ValueError(f"{p}: not valid JSON (not UTF-8 text)") from None
        pos = 0

    def peek() -> str:
        """The next character that is not white space (not consumed); "" at the end."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos] if pos < len(buf) else ""
            fill(JSON_CHUNK)

    if peek() != "[":
        got = {"": "nothing", "{": "an object"}.get(peek(), repr(peek()))
        raise ValueError(f"{p}: expected a JSON array of records, got {got}")
    pos += 1
    count, closed = 0, peek() == "]"
    pos += closed
    while not closed:
        count += 1
        peek()  # the element's first character
        too_long = ValueError(
            f"{p}: record {count}: longer than {max_record} bytes, the cap on one record "
            "(io_stream.MAX_RECORD)"
        )
        while True:  # an element cut off by the window's end is decoded again from a longer one
            try:
                rec, end = scan.raw_decode(buf, pos)
                if end < len(buf) or eof:
                    break
            except json.JSONDecodeError as exc:
                if eof:
                    raise ValueError(f"{p}: record {count}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise ValueError(f"{p}: JSON nested too deeply") from None
            if len(buf) - pos > max_record:
                raise too_long
            fill(max(JSON_CHUNK, len(buf) - pos))
        if end - pos > max_record:
            raise too_long
        pos = end
        if not isinstance(rec, dict):
            raise ValueError(f"{p}: record {count} is a {type(rec).__name__}, not an object")
        yield rec
        after = peek()
        if after not in (",", "]"):
            raise ValueError(f"{p}: not valid JSON after record {count} (expected ',' or ']')")
        pos += 1
        closed = after == "]"
    if peek():
        raise ValueError(f"{p}: not valid JSON (more after the array's closing ']')")


# ---------------------------------------------------------------------------------------------
# safetensors

# safetensors dtype -> torch attribute (torch itself is imported by the functions that need it,
# so that `import io_stream` and loading a config stay light)
SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}


@functools.cache
def dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype, for those this torch has."""
    import torch

    return {n: getattr(torch, a) for n, a in SAFETENSORS_DTYPES.items() if hasattr(torch, a)}


@functools.cache
def dtype_names() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype name."""
    return {v: k for k, v in dtypes().items()}


def read_safetensors_header(path: str, f=None) -> tuple[dict[str, dict], dict[str, str], int]:
    """Validated header: ({name: {dtype, shape, data_offsets}}, metadata, byte offset of data)."""
    own = f is None
    if own:
        f = open_stream(path, block_size=HEADER_PROBE)
    try:
        size = f.seek(0, os.SEEK_END)
        if size < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes)")
        f.seek(0)
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER:
            raise ValueError(
                f"{path}: safetensors header length {n} exceeds the {MAX_HEADER} byte cap"
            )
        if 8 + n > size:
            raise ValueError(f"{path}: safetensors header length {n} exceeds the file size {size}")
        raw = f.read(n)
    finally:
        if own:
            f.close()
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(
            f"{path}: safetensors header is not JSON ({exc.__class__.__name__})"
        ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(
                f"{path}: tensor {name!r}: header entry needs dtype, shape, data_offsets"
            )
        dtype = dtypes().get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r}: unknown dtype {info['dtype']!r}")
        shape, offs = info["shape"], info["data_offsets"]
        # type() is int, not isinstance: JSON true/false are Python bools, and bools are ints
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise ValueError(f"{path}: tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise ValueError(
                f"{path}: tensor {name!r}: data_offsets {offs} outside the {data_len} data bytes (file truncated?)"
            )
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want:
            raise ValueError(
                f"{path}: tensor {name!r}: {end - begin} bytes but shape {shape} x {info['dtype']} needs {want}"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section")
    return header, metadata, 8 + n


def read_safetensors(
    path: str, *, keys: list[str] | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read tensors straight into their own storage over bounded ranged reads (local or S3)."""
    import torch

    _, p = resolve(path)
    with open_stream(p, block_size=HEADER_PROBE) as f:
        header, _, data_start = read_safetensors_header(p, f)
        names = list(header) if keys is None else list(keys)
        missing = [k for k in names if k not in header]
        if missing:
            raise KeyError(f"{p}: no tensor(s) {missing}")
        out: dict[str, torch.Tensor] = {}
        jobs = []  # (uint8 buffer, absolute start, absolute end)
        for name in names:
            info = header[name]
            begin, end = info["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            jobs.append((buf, data_start + begin, data_start + end))
            out[name] = (buf, info)
        if not isinstance(f.raw, _S3Reader):  # a local file (also S3's fallback copy)
            for buf, start, end in jobs:
                f.seek(start)
                view = memoryview(buf.numpy())
                got = 0
                while got < end - start:
                    k = f.readinto(view[got:])
                    if not k:
                        raise ValueError(f"{p}: file ended early (truncated)")
                    got += k
        else:
            try:
                _s3_read_ranges(
                    p, [(memoryview(b.numpy()), a, e) for b, a, e in jobs], f.raw.etag, f.raw.size
                )
            except ConnectionError as exc:
                local = fallback_path(p)
                if local is None or not os.path.isfile(local):
                    raise
                out = jobs = None  # S3 failed mid-way: everything again, header too, from the copy
                _note_fallback(p, local, _s3_failed(p, exc))
    if out is None:
        return read_safetensors(local, keys=keys, device=device)
    result = {}
    for name, (buf, info) in out.items():
        dtype = dtypes()[info["dtype"]]
        t = (
            buf.view(dtype).reshape(info["shape"])
            if buf.numel()
            else torch.empty(info["shape"], dtype=dtype)
        )
        result[name] = t.to(device) if str(device) != "cpu" else t
    return result


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _check_answer(uri: str, resp: dict, first: int, end: int, size: int, etag: str | None) -> None:
    """The GET's answer holds bytes first..end-1 of the object pinned at open, whatever the
    endpoint made of Range and If-Match (some ignore either); else an OSError saying what came."""
    if etag is not None and resp.get("ETag") != etag:
        raise OSError(
            f"{uri}: the object changed while it was being read (ETag {etag} at open, "
            f"{resp.get('ETag')} now)"
        )
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    length, answered = resp.get("ContentLength"), resp.get("ContentRange") or ""
    m = _CONTENT_RANGE.fullmatch(answered)
    whole = length is None or length == end - first
    if status == 206 and whole and m and (int(m[1]), int(m[2])) == (first, end - 1):
        if m[3] not in ("*", str(size)):
            raise OSError(
                f"{uri}: the object changed while it was being read ({size} bytes at open, "
                f"{m[3]} now)"
            )
        return
    if status == 200 and whole and first == 0 and end == size:
        return  # the whole object, which is what was asked for
    got = f"Content-Range {answered!r}" if answered else "no Content-Range"
    raise OSError(
        f"{uri}: asked the S3 endpoint ({_s3_endpoint_label()}) for bytes {first}-{end - 1} and "
        f"got {status} with {got}, {length} bytes: it ignores Range (or a proxy drops it), "
        "so no byte of it can be placed"
    )


def _s3_read_ranges(
    uri: str, jobs: list[tuple[memoryview, int, int]], etag: str | None, size: int
) -> str | None:
    """Fill each buffer with bytes start..end-1 of the object: GETs of s3.block_size bytes,
    s3.max_concurrency at once, no copies. Every answer must be those bytes of the object of ETag
    `etag` and `size` bytes (None: the first answer's ETag, which is returned)."""
    from fsspec.asyn import sync

    fs = s3_filesystem()
    bucket, key, _ = fs.split_path(uri)
    pin = [etag]
    retries, broken = _s3_settings["retries"], _network_errors()

    async def fetch(view: memoryview, a: int, b: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            got, failures = 0, 0
            while got < b - a:  # botocore retries a failed request; this resumes a broken body
                limit, body, clock = request_deadline(b - a - got), None, None
                # If-Match: an object replaced mid-read fails at once where the endpoint honours
                # it; the ETag check fails it where it does not
                match = {"IfMatch": pin[0]} if pin[0] else {}
                try:
                    rng = f"bytes={a + got}-{b - 1}"
                    resp = await _get_answer(fs, uri, Bucket=bucket, Key=key, Range=rng, **match)
                    body = resp["Body"]
                    pin[0] = pin[0] or resp.get("ETag")
                    _check_answer(uri, resp, a + got, b, size, pin[0])
                    clock = asyncio.timeout(limit)  # from the answer on: a body that drips is cut
                    async with clock:
                        while got < b - a:  # the body streams straight into the caller's buffer
                            k = await body.readinto(view[got:])
                            if not k:
                                raise ConnectionError("the response ended early")
                            got += k
                except broken as exc:
                    if body is None:  # the request itself failed: botocore has retried it already
                        raise
                    failures += 1
                    if failures > retries:
                        last = (
                            _slow_why(b - a - got, limit, writing=False)
                            if clock is not None and clock.expired()
                            else _why(exc)
                        )
                        raise ConnectionError(
                            f"{uri}: reading bytes {a + got}-{b - 1} failed {failures} times, "
                            f"last: {last} (s3.retries: {retries})"
                        ) from None
                    await asyncio.sleep(min(0.1 * 2**failures, 5.0) * random.uniform(0.5, 1.0))
                finally:
                    if body is not None:
                        body.close()

    async def fetch_all() -> None:
        gate = asyncio.Semaphore(_s3_settings["max_concurrency"] or MAX_IN_FLIGHT)
        block = _s3_settings["block_size"] or BLOCK_SIZE
        tasks = []
        for view, start, end in jobs:
            for off in range(start, end, block):
                stop = min(off + block, end)
                tasks.append(fetch(view[off - start : stop - start], off, stop, gate))
        futures = [asyncio.ensure_future(t) for t in tasks]
        try:
            await asyncio.gather(*futures)
        except BaseException:
            for fut in futures:  # stop the other GETs writing into buffers we drop
                fut.cancel()
            raise

    s3_call(uri, sync, fs.loop, fetch_all)
    return pin[0]


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None
) -> dict[str, str]:
    """Stream a safetensors file (header, then each tensor's bytes) to a local path or S3;
    returns each tensor's sha256 (hex, of its data bytes), hashed as it is written."""
    import torch

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{path}: value for {name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in dtype_names():
            raise TypeError(
                f"{path}: tensor {name!r} has dtype {t.dtype} that safetensors cannot store"
            )
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": dtype_names()[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
    digests = {}
    with open_stream(path, "wb") as f, ThreadPoolExecutor(1) as pool:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, t in tensors.items():
            data = _tensor_bytes(t.detach().to("cpu"))
            digest = pool.submit(hashlib.sha256, data)  # beside the write: both release the GIL
            f.write(data)
            digests[name] = digest.result().hexdigest()
    return digests


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor in row-major order (a view when it is contiguous)."""
    import torch

    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------
# Checkpoints: tensors in safetensors, everything else in a JSON manifest written last


def _encode(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able tree with tensors replaced by {"__tensor__": dotted key}."""
    import torch

    if isinstance(obj, torch.Tensor):
        if prefix in tensors:
            raise ValueError(f"checkpoint key {prefix!r} appears twice after flattening")
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {
                k: _encode(v, f"{prefix}.{k}" if prefix else k, tensors) for k, v in obj.items()
            }
        return {
            "__items__": [
                [k, _encode(v, f"{prefix}.{k}" if prefix else str(k), tensors)]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"checkpoint value at {prefix!r} is a {type(obj).__name__}; only tensors and JSON types"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_ckpt(state: dict, path: str, *, before_manifest: Callable[[], None] | None = None) -> None:
    """Save a nested state dict: tensors to safetensors, the rest to a manifest written last
    (`before_manifest` runs just before it, e.g. a barrier until every rank wrote its shards)."""

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    manifest = join(path, MANIFEST)
    if exists(manifest):
        remove(manifest)  # overwriting: the folder reads as incomplete until the new one lands
    try:  # this save replaces everything in the folder: older unfinished writes there are litter
        cleanup_partial(path, older_than_s=0)
    except OSError:
        pass  # housekeeping (a permission of its own on S3) never fails a save; an outage fails it next
    digests = write_safetensors(tensors, join(path, TENSORS))
    if before_manifest is not None:
        before_manifest()
    # the manifest vouches for exactly these tensor bytes, never for those of another save
    sums = {
        k: {"dtype": dtype_names()[t.dtype], "shape": list(t.shape), "sha256": digests[k]}
        for k, t in tensors.items()
    }
    doc = {"format": "wmtp-ckpt/1", "tensors": sums, "state": tree}
    write_bytes(json.dumps(doc, indent=1).encode(), manifest)


def load_ckpt(path: str) -> dict:
    """Load a checkpoint saved by `save_ckpt` (no pickle)."""
    manifest = join(path, MANIFEST)
    try:
        raw = read_bytes(manifest)
    except FileNotFoundError as exc:
        if "no such bucket" in str(exc):
            raise
        raise FileNotFoundError(f"{path}: incomplete checkpoint (no {MANIFEST})") from None
    try:
        doc = json.loads(raw)
        tree, sums = doc["state"], doc.get("tensors")  # no "tensors": saved before checksums
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise ValueError(f"{manifest}: not a checkpoint manifest") from None
    file = join(path, TENSORS)
    tensors = read_safetensors(file)
    if sums is not None:
        _verify_tensors(file, tensors, sums)
    return _decode(tree, tensors)


def _verify_tensors(file: str, tensors: dict[str, torch.Tensor], sums: Any) -> None:
    """Each tensor has the dtype, shape and sha256 that the checkpoint's manifest recorded."""
    if not isinstance(sums, dict) or sums.keys() != tensors.keys():
        odd = sorted(set(tensors) ^ set(sums if isinstance(sums, dict) else ()))
        raise ValueError(f"{file}: tensors do not match {MANIFEST} ({_short_list(odd)})")
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        digests = pool.map(lambda t: hashlib.sha256(_tensor_bytes(t)).hexdigest(), tensors.values())
        for (name, t), digest in zip(tensors.items(), digests):
            want = sums[name] if isinstance(sums[name], dict) else {}
            have = {"dtype": dtype_names()[t.dtype], "shape": list(t.shape), "sha256": digest}
            if any(want.get(k) != v for k, v in have.items()):
                raise ValueError(
                    f"{file}: tensor {name!r} does not match the checksum in {MANIFEST} "
                    "(corrupted, or written by another save)"
                )


def _short_list(names: list[str], n: int = 5) -> str:
    return ", ".join(map(repr, names[:n])) + (
        f" and {len(names) - n} more" if len(names) > n else ""
    )


_STEP = re.compile(r"^step_(\d+)$")


def list_ckpts(root: str) -> list[str]:
    """Complete checkpoints (`step_<N>` with a manifest) under root, oldest first."""
    found = []
    for name in list_dir(root):
        m = _STEP.match(name)
        if m and exists(join(root, name, MANIFEST)):
            found.append((int(m.group(1)), join(root, name)))
    return [p for _, p in sorted(found)]


def latest_ckpt(root: str) -> str | None:
    """The newest complete checkpoint under root, or None; ones without a manifest are skipped."""
    ckpts = list_ckpts(root)
    return ckpts[-1] if ckpts else None


def remove_ckpt(path: str) -> None:
    """Delete a checkpoint, manifest first, so a half-deleted one is never taken as complete."""
    manifest = join(path, MANIFEST)
    if exists(manifest):
        remove(manifest)
    remove(path)
