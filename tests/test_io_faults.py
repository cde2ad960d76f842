"""Issue 24, the I/O items: endpoints that ignore Range, If-Match or If-None-Match (as s3rver 3.7.1
does), an upload the endpoint never reads, a body that drips, a 4 GiB line, a .json array read
whole, a run lock left empty.

The faulty endpoints are the moto server behind tests/fault_proxy.py, which drops request headers
("strip"), never reads an upload ("hang") or sends a body a byte at a time ("drip"). Expected
bytes come from boto3 straight to moto, `safetensors` on the same file, and `json` on the same
text. Time bounds are generous: they tell "failed in its deadline" from "hung".
"""

import gzip
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import tracemalloc

import msgspec
import pytest
import safetensors.torch
import torch
from conftest import BUCKET, ROOT
from fault_proxy import fault_proxy

import io_stream
import migrate
import wmtp
import wmtp_runs

CONDITIONS = (b"if-match", b"if-none-match")
EVERY = ("GET", "HEAD", "PUT", "POST", "DELETE")


def through(proxy: dict, *, retries: int = 1, **settings) -> None:
    """Point io_stream at the proxy with test-sized timeouts."""
    io_stream.configure_s3(
        endpoint_url=proxy["endpoint"],
        read_timeout=1,
        connect_timeout=1,
        retries=retries,
        **settings,
    )


def one_line(exc: BaseException, uri: str) -> str:
    msg = str(exc)
    assert msg.startswith(f"{uri}: ") and "\n" not in msg, msg
    assert "testing-secret-value" not in msg
    return msg


def no_uploads(boto) -> bool:
    """True when no multipart upload is left open in the test bucket."""
    return not boto.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


# ---------------------------------------------------------------------------------------------
# 1: a ranged GET answered with 200 and the whole object


def test_an_endpoint_that_ignores_range_is_an_error_never_wrong_tensors(s3, s3_endpoint, boto):
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(16, 64, generator=g) for i in range(4)}  # 4 KiB each
    raw = safetensors.torch.save(tensors)  # ~16 KiB: its header read asks for the whole file
    boto.put_object(Bucket=BUCKET, Key="m.safetensors", Body=raw)
    uri = f"{s3}/m.safetensors"
    with fault_proxy(s3_endpoint, "strip", headers=(b"range",), times=10**6) as px:
        through(px)
        with pytest.raises(OSError) as err:
            io_stream.read_safetensors(uri)  # each tensor's GET gets the file from byte 0
        msg = one_line(err.value, uri)
        assert "got 200 with no Content-Range" in msg and "it ignores Range" in msg
        # a read of the whole object gets what it asked for, Range or not
        assert io_stream.read_bytes(uri) == raw
        with io_stream.open_stream(uri, block_size=4096) as f, pytest.raises(OSError) as err:
            f.seek(5000)
            f.read(10)
        assert "it ignores Range" in one_line(err.value, uri)
    assert px["faults"] >= 3
    io_stream.configure_s3()
    got = io_stream.read_safetensors(uri)  # the same file straight from moto: right
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


# ---------------------------------------------------------------------------------------------
# 2: If-Match ignored, the object replaced mid-read


@pytest.mark.parametrize("how", ["stream", "safetensors"])
def test_an_object_replaced_mid_read_fails_where_if_match_is_ignored(
    s3, s3_endpoint, boto, monkeypatch, how
):
    uri = f"{s3}/obj"
    if how == "stream":
        old, new = os.urandom(300_000), os.urandom(300_000)  # one size: only the ETag tells
    else:
        old = safetensors.torch.save({"w": torch.zeros(100_000)})
        new = safetensors.torch.save({"w": torch.ones(100_000)})
        real = io_stream.read_safetensors_header

        def header_then_replace(path, f):  # the object is replaced after its header was read
            out = real(path, f)
            boto.put_object(Bucket=BUCKET, Key="obj", Body=new)
            return out

        monkeypatch.setattr(io_stream, "read_safetensors_header", header_then_replace)
    boto.put_object(Bucket=BUCKET, Key="obj", Body=old)
    with fault_proxy(s3_endpoint, "strip", headers=(b"if-match",), times=10**6) as px:
        through(px, block_size=2**16)
        with pytest.raises(OSError) as err:
            if how == "stream":
                with io_stream.open_stream(uri, block_size=2**16) as f:
                    assert f.read(1000) == old[:1000]
                    boto.put_object(Bucket=BUCKET, Key="obj", Body=new)
                    f.read()
            else:
                io_stream.read_safetensors(uri)
    assert px["faults"] >= 2  # the requests did go out without If-Match
    msg = one_line(err.value, uri)
    assert "the object changed while it was being read (ETag" in msg


# ---------------------------------------------------------------------------------------------
# 3: verify-s3 says what the endpoint honours; the run lock refuses what it cannot rely on


def verify(endpoint: str, uri: str, capsys) -> tuple[int, dict[str, str]]:
    """`migrate.py verify-s3`: its exit code and {step: line}."""
    code = migrate.main(["verify-s3", uri, "--endpoint-url", endpoint])
    lines = capsys.readouterr().out.splitlines()
    return code, {ln.split("  ")[0].strip(): ln for ln in lines}


def test_verify_s3_says_which_conditions_and_ranges_the_endpoint_honours(
    s3, s3_endpoint, boto, capsys
):
    code, steps = verify(s3_endpoint, f"{s3}/p", capsys)
    assert code == 0 and all(" PASS " in ln for ln in steps.values()), steps
    for name in ("if-match get", "if-none-match put", "if-match put"):
        assert "honoured" in steps[name], steps

    with fault_proxy(s3_endpoint, "strip", headers=CONDITIONS, times=10**6, methods=EVERY) as px:
        code, steps = verify(px["endpoint"], f"{s3}/p", capsys)
    assert code == 1, steps
    assert " WARN  ignored: a GET at a stale ETag answered 200" in steps["if-match get"]
    assert "the kit checks every answer's ETag itself" in steps["if-match get"]
    for name in ("if-none-match put", "if-match put"):
        assert " FAIL " in steps[name] and "ignored" in steps[name], steps
        assert "run locks here cannot keep two trainers apart" in steps[name]
    others = ("list", "put", "get (ranged)", "multipart put", "delete")
    assert all(" PASS " in steps[name] for name in others), steps

    with fault_proxy(s3_endpoint, "strip", headers=(b"range",), times=10**6) as px:
        code, steps = verify(px["endpoint"], f"{s3}/p", capsys)
    assert code == 1 and " FAIL " in steps["get (ranged)"], steps
    assert "got 200 with no Content-Range and 1024 bytes" in steps["get (ranged)"]
    assert "Contents" not in boto.list_objects_v2(Bucket=BUCKET)  # every probe object deleted


def test_run_lock_refuses_an_endpoint_that_ignores_conditional_puts(s3, s3_endpoint, boto, capsys):
    run_dir = f"{s3}/runs/r"
    with fault_proxy(s3_endpoint, "strip", headers=CONDITIONS, times=10**6, methods=EVERY) as px:
        through(px)
        with pytest.raises(OSError) as err:
            wmtp_runs.lock_run_dir(run_dir)
        msg = one_line(err.value, run_dir)
        assert "ignores If-None-Match on PUT, so its run lock cannot keep two trainers apart" in msg
        assert "local or shared folder" in msg and "--force-unlock" in msg
        assert "Contents" not in boto.list_objects_v2(Bucket=BUCKET)  # the lock was given back
        # --force-unlock: the user says no other trainer uses this run; a warning, and the lock
        assert wmtp_runs.lock_run_dir(run_dir, force=True) is None
        assert "warning: " in capsys.readouterr().err
        wmtp_runs.release_run_locks()
    io_stream.configure_s3()
    assert wmtp_runs.lock_run_dir(run_dir) is None  # moto itself honours both: locked
    wmtp_runs.release_run_locks()


# ---------------------------------------------------------------------------------------------
# 5: an upload the endpoint accepts and never reads


@pytest.mark.parametrize("size", [8 * 2**20, 12 * 2**20])  # one PUT, then a multipart upload
def test_an_upload_the_endpoint_never_reads_fails_within_its_deadline(s3, s3_endpoint, boto, size):
    uri = f"{s3}/out.bin"
    part = 10 * 2**20
    with fault_proxy(s3_endpoint, "hang", times=10**6, methods=("PUT",), lifetime=120) as px:
        through(px, min_write_rate=4 * 2**20)  # 8-10 MiB: 1 + 2-2.5 s a try, two tries
        start = time.monotonic()
        with pytest.raises(ConnectionError) as err:
            with io_stream.open_stream(uri, "wb", block_size=part) as f:
                f.write(os.urandom(size))
        took = time.monotonic() - start
    msg = one_line(err.value, uri)
    what = "put_object" if size < part else "upload_part"
    assert (
        f"{what} to the S3 endpoint ({px['endpoint']}) did not finish in 2 tries" in msg
        and "s3.min_write_rate" in msg
    ), msg
    assert took < 60, took  # before: blocked for good (botocore's timeouts only cover answers)
    assert "Contents" not in boto.list_objects_v2(Bucket=BUCKET) and no_uploads(boto)


# ---------------------------------------------------------------------------------------------
# 6: a body that drips


def test_a_body_that_drips_is_cut_at_its_deadline(s3, s3_endpoint, boto):
    data = os.urandom(2000)
    boto.put_object(Bucket=BUCKET, Key="x.bin", Body=data)
    uri = f"{s3}/x.bin"
    with fault_proxy(s3_endpoint, "drip", after=100, interval=0.5, times=10**6) as px:
        through(px, min_read_rate=1000)  # 2000 bytes: 1 + 2 s a try, two tries
        start = time.monotonic()
        with pytest.raises(ConnectionError) as err:
            io_stream.read_bytes(uri)
        took = time.monotonic() - start
    msg = one_line(err.value, uri)
    assert "failed 2 times, last: " in msg and "s3.min_read_rate: 1000 bytes/s" in msg, msg
    assert took < 30, took  # before: 1 byte every 0.5 s never trips s3.read_timeout (1 s)
    assert px["faults"] == 2
    io_stream.configure_s3()
    assert io_stream.read_bytes(uri) == data


def test_an_answer_head_that_drips_is_cut_at_its_deadline(s3, s3_endpoint, boto):
    # one byte every 0.5 s never trips s3.read_timeout (1 s): the answer's head gets botocore's
    # tries at their timeouts, here 1 try x (1 + 1) s, then a one-line error
    boto.put_object(Bucket=BUCKET, Key="x.bin", Body=b"data")
    uri = f"{s3}/x.bin"
    with fault_proxy(s3_endpoint, "drip_head", interval=0.5, times=10**6) as px:
        through(px, retries=0)
        assert io_stream.answer_deadline() == 2
        start = time.monotonic()
        with pytest.raises(ConnectionError) as err:
            io_stream.read_bytes(uri)
        took = time.monotonic() - start
    assert one_line(err.value, uri).endswith(
        "sent no complete answer in 2 s (s3.connect_timeout, s3.read_timeout; s3.retries: 0)"
    )
    assert took < 10, took
    assert px["faults"] == 1


def test_rates_come_from_the_config_and_are_checked():
    cfg = wmtp.load_config(os.path.join(ROOT, "config.yaml"), ["s3.min_read_rate=5000"])
    assert (cfg.s3.min_read_rate, cfg.s3.min_write_rate) == (5000, io_stream.MIN_WRITE_RATE)
    try:
        io_stream.configure_s3(**msgspec.structs.asdict(cfg.s3))  # as the trainers do
        assert io_stream.request_deadline(10_000) == io_stream.READ_TIMEOUT + 2
        assert io_stream.request_deadline(2**20, writing=True) == io_stream.READ_TIMEOUT + 1
    finally:
        io_stream.configure_s3()
    for bad in ("s3.min_read_rate=0", "s3.min_write_rate=-1"):
        with pytest.raises(wmtp.ConfigError, match=bad.split("=")[0]):
            wmtp.load_config(os.path.join(ROOT, "config.yaml"), [bad])
    with pytest.raises(ValueError, match="s3.min_write_rate must be a positive number"):
        io_stream.configure_s3(min_write_rate=float("inf"))


# ---------------------------------------------------------------------------------------------
# 7: one huge record, .json arrays


def huge_line_gz(path: str, gib: int) -> None:
    """A .jsonl.gz of one line of `gib` GiB in about 1 MB per GiB: gzip members of 1 MiB of 'a'
    each, concatenated (a gzip file may hold several; readers join them)."""
    member = gzip.compress(b"a" * 2**20, compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(b'{"text": "'))
        for _ in range(gib * 1024):
            f.write(member)
        f.write(gzip.compress(b'"}\n'))


def test_a_4_gib_line_is_refused_in_bounded_memory(tmp_path):
    path = str(tmp_path / "huge.jsonl.gz")
    huge_line_gz(path, 4)
    assert os.path.getsize(path) < 8 * 2**20
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {ROOT!r})
        import io_stream
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))  # no 4 GiB string
        with open("/proc/self/clear_refs", "w") as f:  # the peak so far is pytest's, inherited
            f.write("5")
        try:
            list(io_stream.iter_records({path!r}))
        except ValueError as exc:
            print(exc)
        status = open("/proc/self/status").read().split("VmHWM:")[1]
        print(int(status.split()[0]) * 1024)  # the peak RSS since clear_refs
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    message, rss = out.stdout.splitlines()
    assert message == (
        f"{path}: line 1: longer than {io_stream.MAX_RECORD} bytes, the cap on one record "
        "(io_stream.MAX_RECORD); is this one JSON object per line?"
    )
    assert int(rss) < 2**30, int(rss) / 2**20  # measured: 0.29 GiB (the 128 MiB cap, twice)


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json"])
def test_a_record_over_the_cap_names_its_file_and_place(root, name):
    big = {"text": "x" * 3000}
    records = [{"a": 1}, {"b": 2}, big, {"c": 3}]
    if name.endswith(".json"):
        data = json.dumps(records).encode()
    else:
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
    uri = io_stream.join(root, name)
    io_stream.write_bytes(gzip.compress(data) if name.endswith(".gz") else data, uri)
    assert list(io_stream.iter_records(uri, max_record=4000)) == records
    it = io_stream.iter_records(uri, max_record=2000)
    assert [next(it), next(it)] == records[:2]
    with pytest.raises(ValueError) as err:
        next(it)
    where = "record 3" if name.endswith(".json") else "line 3"
    assert str(err.value).startswith(f"{uri}: {where}: longer than 2000 bytes, the cap")


def test_a_json_array_streams_in_memory_independent_of_its_size(tmp_path):
    record = {"prompt": "p" * 900, "completion": 'c"\\\n' * 25, "n": [1, 2.5, None, True]}
    peaks = {}
    for count in (2_000, 20_000):  # ~2 MB and ~20 MB
        path = tmp_path / f"{count}.json"
        with open(path, "w") as f:
            f.write("[\n")
            for i in range(count):
                f.write(("," if i else "") + json.dumps({**record, "i": i}) + "\n")
            f.write("]\n")
        tracemalloc.start()
        try:
            n = sum(1 for _ in io_stream.iter_records(str(path)))
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n == count
    assert peaks[20_000] < 2 * peaks[2_000] + 2**20, peaks
    assert peaks[20_000] < os.path.getsize(tmp_path / "20000.json") // 4, peaks


@pytest.mark.parametrize("split", ["train", "test", "validation"])
def test_shipped_mbpp_json_reads_as_json_does(split):
    shipped = wmtp.load_config(os.path.join(ROOT, "config.yaml")).paths.datasets["mbpp"]
    path = os.path.join(shipped, f"{split}.json")  # wherever the kit ships it
    with open(path) as f:
        assert list(io_stream.iter_records(path)) == json.load(f)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (b"", "expected a JSON array of records, got nothing"),
        (b"  []  ", None),
        (b'[{"a": 1},]', "record 2: not valid JSON"),
        (b'[{"a": 1} {"b": 2}]', "not valid JSON after record 1"),
        (b'[{"a": 1}] [', "more after the array"),
        (b'[{"a": "\xff"}]', "not UTF-8"),
        (b'[{"a": 1}, 7]', "record 2 is a int, not an object"),
        (b'[{"a": NaN}]', "not valid JSON (NaN is no JSON number)"),
    ],
)
def test_json_array_edge_cases(tmp_path, text, words):
    path = tmp_path / "d.json"
    path.write_bytes(text)
    if words is None:
        assert list(io_stream.iter_records(str(path))) == []
        return
    with pytest.raises(ValueError) as err:
        list(io_stream.iter_records(str(path)))
    assert str(err.value).startswith(f"{path}: ") and words in str(err.value), err.value


def test_json_array_split_at_every_chunk_boundary(tmp_path, monkeypatch):
    records = [{"i": i, "s": 'ü\\"' * (i % 7), "x": [i] * (i % 5)} for i in range(60)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    for chunk in (1, 2, 3, 7, 64):  # windows cut inside strings, escapes and UTF-8 sequences
        monkeypatch.setattr(io_stream, "JSON_CHUNK", chunk)
        assert list(io_stream.iter_records(str(path))) == records, chunk


# ---------------------------------------------------------------------------------------------
# 10: a run lock left empty (its trainer killed between creating and writing it)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_empty_lock_is_taken_over_after_its_time(where, tmp_path, request, monkeypatch, capsys):
    if where == "local":
        run_dir = str(tmp_path / "run")
        os.makedirs(run_dir)
        lock = os.path.join(run_dir, ".lock")
        open(lock, "wb").close()
    else:
        run_dir = request.getfixturevalue("s3") + "/run"
        boto = request.getfixturevalue("boto")
        boto.put_object(Bucket=BUCKET, Key="run/.lock", Body=b"")
        monkeypatch.setattr(wmtp_runs, "EMPTY_LOCK_S", 2.0)  # S3 stamps by its own clock
    with pytest.raises(FileExistsError) as err:
        wmtp_runs.lock_run_dir(run_dir)  # a trainer may be writing its record right now
    msg = str(err.value)
    assert msg.startswith(f"{run_dir} is in use by a starting trainer") and "\n" not in msg
    assert "its lock is empty" in msg and f"taken over after {wmtp_runs.EMPTY_LOCK_S:g} s" in msg
    if where == "local":
        old = time.time() - 61
        os.utime(lock, (old, old))
    else:
        time.sleep(3.5)
    assert wmtp_runs.lock_run_dir(run_dir) == {}  # taken over, without --force-unlock
    assert "took over an empty lock" in capsys.readouterr().err
    if where == "local":
        holder = json.loads(open(lock, "rb").read())
    else:
        holder = json.loads(boto.get_object(Bucket=BUCKET, Key="run/.lock")["Body"].read())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    wmtp_runs.release_run_locks()


def test_a_lock_holding_our_own_token_is_ours(s3, boto, monkeypatch):
    """A create whose answer was lost lands; the retry's 412 must not make it someone else's."""
    import uuid

    token = uuid.UUID(int=7)
    monkeypatch.setattr(wmtp_runs.uuid, "uuid4", lambda: token)
    boto.put_object(Bucket=BUCKET, Key="run/.lock", Body=json.dumps({"token": token.hex}))
    assert wmtp_runs.lock_run_dir(f"{s3}/run") is None
    wmtp_runs.release_run_locks()
    assert "Contents" not in boto.list_objects_v2(Bucket=BUCKET)


# ---------------------------------------------------------------------------------------------
# the second S3 implementation itself, where it is installed


@pytest.fixture
def s3rver(tmp_path, monkeypatch):
    """s3rver 3.7.1 (bench/s3rver.py) on a bucket of its own; skipped where it is not installed."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from s3rver import BIN, S3RVER_ENV, start_s3rver

    if not os.path.exists(BIN):
        pytest.skip("s3rver is not installed (python bench/s3rver.py installs it from npm)")
    for k, v in S3RVER_ENV.items():
        monkeypatch.setenv(k, v)
    endpoint, stop = start_s3rver(str(tmp_path / "s3rver"), buckets=("wmtp-s3rver",))
    io_stream.configure_s3(endpoint)
    yield endpoint
    stop()
    io_stream.configure_s3()


def test_s3rver_is_found_out_and_its_reads_never_mix(s3rver, capsys, monkeypatch):
    import boto3

    code, steps = verify(s3rver, "s3://wmtp-s3rver/p", capsys)
    assert code == 1, steps
    assert " WARN  ignored" in steps["if-match get"] and " PASS " in steps["get (ranged)"]
    assert " FAIL " in steps["if-none-match put"] and " FAIL " in steps["if-match put"], steps
    with pytest.raises(OSError, match="ignores If-None-Match on PUT"):
        wmtp_runs.lock_run_dir("s3://wmtp-s3rver/runs/r")

    boto = boto3.session.Session().client("s3", endpoint_url=s3rver)  # its credentials, not cached
    old = safetensors.torch.save({"w": torch.zeros(1_000_000)})  # 4 MB: GETs in flight
    new = safetensors.torch.save({"w": torch.ones(1_000_000)})
    boto.put_object(Bucket="wmtp-s3rver", Key="w.safetensors", Body=old)
    real = io_stream.read_safetensors_header

    def header_then_replace(path, f):
        out = real(path, f)
        boto.put_object(Bucket="wmtp-s3rver", Key="w.safetensors", Body=new)
        return out

    monkeypatch.setattr(io_stream, "read_safetensors_header", header_then_replace)
    io_stream.configure_s3(s3rver, block_size=2**20)
    with pytest.raises(OSError, match="the object changed while it was being read"):
        io_stream.read_safetensors("s3://wmtp-s3rver/w.safetensors")
