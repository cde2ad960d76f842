"""A faulty world (issue 13, the I/O items): dropped and silent connections and 503s from a
fault-injecting proxy in front of the moto server, a bucket that refuses deletes, corrupted
checkpoint bytes, killed writers' leftovers, the umask, a full disk, hostile JSON and headers.

Expected bytes come from independent paths: boto3 straight to moto, plain files, hashlib,
`safetensors` and `torch.load` on the same bytes.
"""

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from conftest import BUCKET, ROOT, iam_user, moto_auth
from fault_proxy import fault_proxy

import io_stream
import wmtp
import wmtp_cli
import wmtp_train

# ---------------------------------------------------------------------------------------------
# helpers


def through(proxy: dict, *, retries: int = 3, **settings) -> None:
    """Point io_stream at the proxy with test-sized timeouts."""
    io_stream.configure_s3(
        endpoint_url=proxy["endpoint"],
        read_timeout=1,
        connect_timeout=1,
        retries=retries,
        **settings,
    )


def get_ranges(events: list) -> list[tuple[int, int]]:
    """(first, last) byte of every GetObject the kit sent, in order."""
    out = []
    for rng in events:
        first, last = rng.removeprefix("bytes=").split("-")
        out.append((int(first), int(last)))
    return out


def record_ranges() -> list:
    """Collect the Range header of every GetObject the current filesystem sends."""
    seen = []

    def record(request, **kwargs):
        seen.append(request.headers["Range"].decode())

    io_stream.s3_filesystem().s3.meta.events.register("before-send.s3.GetObject", record)
    return seen


def one_line(exc: BaseException, uri: str) -> str:
    msg = str(exc)
    assert msg.startswith(f"{uri}: ") and "\n" not in msg, msg
    assert "testing-secret-value" not in msg
    return msg


def keys(boto, prefix: str = "") -> list[str]:
    return [
        o["Key"] for o in boto.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    ]


def raw_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes, by numpy (not io_stream)."""
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# 10: a dropped connection resumes from the byte it reached


def test_read_resumes_after_a_dropped_connection(s3, s3_endpoint, boto):
    data = os.urandom(300_000)
    boto.put_object(Bucket=BUCKET, Key="big.bin", Body=data)
    with fault_proxy(s3_endpoint, "drop", after=100_000, times=2) as px:
        through(px)
        seen = record_ranges()
        assert io_stream.read_bytes(f"{s3}/big.bin") == data
    assert px["faults"] == 2
    spans = get_ranges(seen)
    assert spans[0] == (0, len(data) - 1)
    # each retry asks only for what is missing: it starts after the bytes that did arrive
    assert spans[1][0] > 0 and spans[2][0] > spans[1][0] and spans[-1][1] == len(data) - 1
    assert len(spans) == 3


def test_read_resumes_after_a_stalled_body(s3, s3_endpoint, boto):
    data = os.urandom(200_000)
    boto.put_object(Bucket=BUCKET, Key="big.bin", Body=data)
    with fault_proxy(s3_endpoint, "stall", after=50_000) as px:
        through(px)
        seen = record_ranges()
        with io_stream.open_stream(f"{s3}/big.bin") as f:
            assert f.read() == data
    assert px["faults"] == 1 and get_ranges(seen)[1][0] > 0


def test_read_safetensors_parallel_ranges_resume(s3, s3_endpoint, boto, tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(128, 256, generator=g) for i in range(4)}  # 4 x 128 KiB
    safetensors.torch.save_file(tensors, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    boto.put_object(Bucket=BUCKET, Key="m.safetensors", Body=raw)
    truth = safetensors.torch.load(raw)
    with fault_proxy(s3_endpoint, "drop", after=20_000, times=5, skip=1) as px:
        through(px, block_size=2**16, max_concurrency=4)  # 8 GETs in flight, 5 of them cut
        got = io_stream.read_safetensors(f"{s3}/m.safetensors")
    assert px["faults"] == 5
    assert got.keys() == truth.keys() and all(torch.equal(got[k], truth[k]) for k in truth)


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_iter_records_resumes(s3, s3_endpoint, boto, name):
    records = [{"i": i, "text": os.urandom(100).hex()} for i in range(2000)]  # ~430 KB, gzip too
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    boto.put_object(Bucket=BUCKET, Key=name, Body=gzip.compress(body) if ".gz" in name else body)
    with fault_proxy(s3_endpoint, "drop", after=30_000, times=3) as px:
        through(px, block_size=2**17)
        assert list(io_stream.iter_records(f"{s3}/{name}")) == records
    assert px["faults"] == 3


def test_503_answers_are_retried(s3, s3_endpoint, boto):
    data = os.urandom(50_000)
    boto.put_object(Bucket=BUCKET, Key="x.bin", Body=data)
    with fault_proxy(s3_endpoint, "503", times=2, methods=("HEAD", "GET")) as px:
        through(px)
        assert io_stream.read_bytes(f"{s3}/x.bin") == data
    assert px["faults"] == 2


def test_permanent_drop_is_one_line_after_bounded_attempts(s3, s3_endpoint, boto):
    boto.put_object(Bucket=BUCKET, Key="x.bin", Body=os.urandom(200_000))
    uri = f"{s3}/x.bin"
    with fault_proxy(s3_endpoint, "drop", after=10_000, times=10**6) as px:
        through(px, retries=2)
        with pytest.raises(ConnectionError) as err:
            io_stream.read_bytes(uri)
    assert px["faults"] == 3  # the first GET and two resumes
    msg = one_line(err.value, uri)
    assert "failed 3 times" in msg and "s3.retries: 2" in msg


def test_permanent_503_is_one_line_after_bounded_attempts(s3, s3_endpoint, boto):
    boto.put_object(Bucket=BUCKET, Key="x.bin", Body=b"data")
    uri = f"{s3}/x.bin"
    with fault_proxy(s3_endpoint, "503", times=10**6) as px:
        through(px, retries=1)
        with pytest.raises(ConnectionError) as err:
            io_stream.read_bytes(uri)
    assert px["faults"] == 2  # the GET and one retry
    assert one_line(err.value, uri).endswith(": S3 answered 503 SlowDown (s3.retries: 1)")


def test_a_get_body_deadline_counts_from_the_answer_not_botocores_tries(s3, s3_endpoint, boto):
    # each 503 comes 0.6 s after its GET: botocore's two tries take over 1.2 s, more than the
    # 1 s deadline of a 4-byte body at these settings; that deadline starts with the answer, so
    # the tries are neither cut (and tried again: more than s3.retries + 1 GETs) nor called slow
    boto.put_object(Bucket=BUCKET, Key="x.bin", Body=b"data")
    uri = f"{s3}/x.bin"
    with fault_proxy(s3_endpoint, "503", times=10**6, delay=0.6) as px:
        through(px, retries=1)
        with pytest.raises(ConnectionError) as err:
            io_stream.read_bytes(uri)
    assert px["faults"] == 2
    assert one_line(err.value, uri).endswith(": S3 answered 503 SlowDown (s3.retries: 1)")


def test_trainer_prints_one_line_for_a_broken_dataset_stream(s3, s3_endpoint, boto, capsys):
    boto.put_object(Bucket=BUCKET, Key="d.jsonl", Body=b'{"text": "x"}\n' * 20_000)
    uri = f"{s3}/d.jsonl"
    with fault_proxy(s3_endpoint, "drop", after=1000, times=10**6) as px:
        through(px, retries=1)
        with pytest.raises(SystemExit) as code:
            wmtp_cli.run_cli(lambda argv: list(io_stream.iter_records(uri)), [])
    err = capsys.readouterr().err
    assert code.value.code == 1
    assert err.startswith(f"error: {uri}: ") and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------
# 11: timeouts


def test_never_answering_endpoint_fails_in_bounded_attempts(s3, s3_endpoint, boto):
    boto.put_object(Bucket=BUCKET, Key="x.bin", Body=b"data")
    uri = f"{s3}/x.bin"
    with fault_proxy(s3_endpoint, "hang", times=10**6, methods=("HEAD", "GET")) as px:
        through(px, retries=1)
        with pytest.raises(ConnectionError) as err:
            io_stream.read_bytes(uri)
    msg = one_line(err.value, uri)
    assert "sent nothing for 1 s" in msg and "s3.read_timeout" in msg
    assert px["requests"] <= 2 * 2  # two tries of at most two requests (HEAD, then a listing)


def test_s3_timeouts_and_retries_come_from_the_config(tmp_path):
    cfg_path = os.path.join(ROOT, "config.yaml")
    sets = ["s3.read_timeout=2.5", "s3.connect_timeout=3", "s3.retries=5"]
    args = argparse.Namespace(config=cfg_path, set=sets)
    try:
        cfg = wmtp_train.setup(args)
        assert (cfg.s3.read_timeout, cfg.s3.connect_timeout, cfg.s3.retries) == (2.5, 3.0, 5)
        conf = io_stream.s3_options()["config_kwargs"]
        assert conf["read_timeout"] == 2.5 and conf["connect_timeout"] == 3.0
        assert conf["retries"]["total_max_attempts"] == 6
    finally:
        io_stream.configure_s3()
    assert wmtp.S3().read_timeout < 60
    for bad in ("s3.read_timeout=0", "s3.retries=-1", "s3.connect_timeout=-2"):
        with pytest.raises(wmtp.ConfigError, match=bad.split("=")[0]):
            wmtp.load_config(cfg_path, [bad])


# ---------------------------------------------------------------------------------------------
# 12: a network failure while reading a .bin is a network error


def test_bin_network_failure_is_a_network_error(s3, s3_endpoint, boto):
    buf = io.BytesIO()
    truth = {"w": torch.randn(1024, 1024), "b": torch.arange(10)}  # 4 MiB: several GETs
    torch.save(truth, buf)
    boto.put_object(Bucket=BUCKET, Key="m/pytorch_model.bin", Body=buf.getvalue())
    from wmtp_model import load_pth

    uri = f"{s3}/m/pytorch_model.bin"
    # the zip directory comes in the first GET; then the tensor bytes, cut, once, then for good
    with fault_proxy(s3_endpoint, "drop", after=50_000, times=1, skip=1) as px:
        through(px)
        got = load_pth(uri)
    assert px["faults"] == 1 and all(torch.equal(got[k], truth[k]) for k in truth)
    with fault_proxy(s3_endpoint, "drop", after=50_000, times=10**6, skip=1) as px:
        through(px, retries=1)
        with pytest.raises(ConnectionError) as err:
            load_pth(uri)
    msg = one_line(err.value, uri)
    assert "weights-only" not in msg and "failed 2 times" in msg


# ---------------------------------------------------------------------------------------------
# 6 and 9: deletes that fail, checksums in the manifest


@pytest.fixture
def deny_deletes(s3, s3_endpoint, monkeypatch):
    """A context in which requests come from a user who may put, get and list, not delete."""
    actions = ["s3:ListBucket", "s3:GetObject", "s3:PutObject"]
    key_id, secret = iam_user(s3_endpoint, "no-delete", actions)

    @contextlib.contextmanager
    def denied():
        with monkeypatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", key_id)
            env.setenv("AWS_SECRET_ACCESS_KEY", secret)
            io_stream.configure_s3()
            moto_auth(s3_endpoint, b"0")
            try:
                yield
            finally:
                moto_auth(s3_endpoint, b"inf")
        io_stream.configure_s3()

    return denied


def test_remove_raises_when_s3_refuses_deletes(s3, boto, deny_deletes):
    for name in ("p/a.bin", "p/b/c.bin"):
        boto.put_object(Bucket=BUCKET, Key=name, Body=b"x")
    with deny_deletes(), pytest.raises(PermissionError) as err:
        io_stream.remove(f"{s3}/p")
    assert str(err.value).startswith(f"{s3}/p/") and "not deleted (AccessDenied" in str(err.value)
    assert keys(boto, "p/") == ["p/a.bin", "p/b/c.bin"]


def test_resave_without_delete_permission_keeps_the_old_checkpoint(s3, deny_deletes):
    path = f"{s3}/run/step_1"
    io_stream.save_ckpt({"w": torch.zeros(100), "step": 1}, path)
    with deny_deletes(), pytest.raises(PermissionError, match="manifest.json: not deleted"):
        io_stream.save_ckpt({"w": torch.ones(100), "step": 2}, path)
    state = io_stream.load_ckpt(path)  # the old checkpoint, whole
    assert state["step"] == 1 and torch.equal(state["w"], torch.zeros(100))


def test_old_manifest_never_vouches_for_new_tensors(root):
    old, new = io_stream.join(root, "step_1"), io_stream.join(root, "other")
    io_stream.save_ckpt({"w": torch.zeros(64), "step": 1}, old)
    io_stream.save_ckpt({"w": torch.ones(64), "step": 2}, new)
    # a save that died after its tensors landed, over a folder whose manifest could not go
    src, dst = (
        io_stream.join(new, "tensors.safetensors"),
        io_stream.join(old, "tensors.safetensors"),
    )
    io_stream.write_bytes(io_stream.read_bytes(src), dst)
    assert io_stream.latest_ckpt(root) == old  # it looks complete...
    with pytest.raises(ValueError) as err:
        io_stream.load_ckpt(old)  # ...but its manifest does not vouch for these bytes
    assert str(err.value).startswith(f"{dst}: tensor 'w' does not match the checksum")


def test_corrupted_tensor_bytes_are_named(tmp_path):
    path = str(tmp_path / "step_1")
    state = {"model": {"a": torch.randn(300), "b": torch.randn(500)}, "step": 7}
    io_stream.save_ckpt(state, path)
    manifest = json.loads((tmp_path / "step_1" / "manifest.json").read_text())
    # the manifest records what an independent hash of each tensor's bytes gives
    assert manifest["tensors"]["model.b"] == {
        "dtype": "F32",
        "shape": [500],
        "sha256": raw_sha256(state["model"]["b"]),
    }
    file = tmp_path / "step_1" / "tensors.safetensors"
    header, _, start = io_stream.read_safetensors_header(str(file))
    begin = start + header["model.b"]["data_offsets"][0]
    with open(file, "r+b") as f:  # 256 overwritten bytes inside tensor model.b
        f.seek(begin + 400)
        f.write(os.urandom(256))
    with pytest.raises(ValueError) as err:
        io_stream.load_ckpt(path)
    assert str(err.value).startswith(f"{file}: tensor 'model.b' does not match the checksum")


def test_manifest_without_checksums_still_loads(tmp_path):
    # checkpoints saved before checksums existed keep loading
    path = tmp_path / "step_1"
    io_stream.save_ckpt({"w": torch.arange(5.0)}, str(path))
    doc = json.loads((path / "manifest.json").read_text())
    del doc["tensors"]
    (path / "manifest.json").write_text(json.dumps(doc))
    assert torch.equal(io_stream.load_ckpt(str(path))["w"], torch.arange(5.0))


# ---------------------------------------------------------------------------------------------
# 13: leftovers of killed writers


def test_next_save_cleans_what_killed_writers_left(s3, s3_endpoint, boto, tmp_path):
    local, remote = tmp_path / "run" / "step_2", f"{s3}/run/step_2"
    # a process writing a local file and an S3 object (one 5 MiB part sent), killed by SIGKILL
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        import io_stream
        a = io_stream.open_stream({str(local / "tensors.safetensors")!r}, "wb")
        a.write(os.urandom(100_000))
        a.flush()
        b = io_stream.open_stream({remote + "/tensors.safetensors"!r}, "wb", block_size=5 * 2**20)
        b.write(os.urandom(6 * 2**20))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    assert len([n for n in os.listdir(local) if n.startswith(".tmp-")]) == 1  # what it leaves
    (local / ".tmp-notes.txt").write_text("a user's file that merely looks alike")
    elsewhere = boto.create_multipart_upload(Bucket=BUCKET, Key="run/step_20/x")["UploadId"]
    uploads = boto.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert sorted(u["Key"] for u in uploads) == ["run/step_2/tensors.safetensors", "run/step_20/x"]

    io_stream.save_ckpt({"w": torch.ones(3)}, str(local))
    io_stream.save_ckpt({"w": torch.ones(3)}, remote)
    assert sorted(os.listdir(local)) == [".tmp-notes.txt", "manifest.json", "tensors.safetensors"]
    uploads = boto.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [("run/step_20/x", elsewhere)]


def test_cleanup_partial_by_age_and_prefix(s3, boto, tmp_path):
    names = [".tmp-0123456789abcdef-a.bin", ".tmp-notes.txt", "tmp-0123456789abcdef-b.bin"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert io_stream.cleanup_partial(str(tmp_path), older_than_s=3600) == []  # too recent
    for name in names:
        old = os.path.getmtime(tmp_path / name) - 7200
        os.utime(tmp_path / name, (old, old))
    leftover = str(tmp_path / names[0])
    assert io_stream.cleanup_partial(str(tmp_path), older_than_s=3600) == [leftover]
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])  # look-alikes stay
    for key in ("run/a.bin", "run/sub/b.bin", "run2/c.bin", "other/d.bin"):
        boto.create_multipart_upload(Bucket=BUCKET, Key=key)
    removed = io_stream.cleanup_partial(f"{s3}/run", older_than_s=0)
    assert sorted(r.split(" ")[0] for r in removed) == [f"{s3}/run/a.bin", f"{s3}/run/sub/b.bin"]
    uploads = boto.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert sorted(u["Key"] for u in uploads) == ["other/d.bin", "run2/c.bin"]


# ---------------------------------------------------------------------------------------------
# 16: the umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        io_stream.write_bytes(b"x", str(tmp_path / "a.txt"))
        io_stream.write_safetensors({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
        io_stream.save_ckpt({"w": torch.zeros(2)}, str(tmp_path / "step_1"))
    finally:
        os.umask(old)
    files = ["a.txt", "w.safetensors", "step_1/manifest.json", "step_1/tensors.safetensors"]
    for name in files:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


# ---------------------------------------------------------------------------------------------
# 19: a full disk, hostile JSON and headers, version ids


FULL_DISK = """
import os, sys
sys.path.insert(0, {root!r})
import torch, io_stream
folder = sys.argv[1]
io_stream.write_bytes(b"old", os.path.join(folder, "keep.bin"))
for write in (
    lambda: io_stream.write_bytes(os.urandom(3 * 2**20), os.path.join(folder, "keep.bin")),
    lambda: io_stream.save_ckpt({{"w": torch.zeros(2**20)}}, os.path.join(folder, "step_1")),
):
    try:
        write()
    except OSError as exc:
        print("ERR", exc)
print(sorted(os.listdir(folder)), os.listdir(os.path.join(folder, "step_1")))
print(open(os.path.join(folder, "keep.bin"), "rb").read())
"""


def test_full_disk_is_one_line_naming_the_file(tmp_path):
    if (
        not shutil.which("unshare")
        or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode
    ):
        pytest.skip("needs unshare -rm to mount a small tmpfs")
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = f'mount -t tmpfs -o size=1m tmpfs {folder} && exec "$@"'
    script = FULL_DISK.format(root=ROOT)
    cmd = ["unshare", "-rm", "sh", "-c", mount, "sh", sys.executable, "-c", script, str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == f"ERR [Errno 28] {folder / 'keep.bin'}: No space left on device", out
    tensors = folder / "step_1" / "tensors.safetensors"
    assert out[1] == f"ERR [Errno 28] {tensors}: No space left on device", out
    assert out[2:] == ["['keep.bin', 'step_1'] []", "b'old'"]  # no temp file, old bytes intact


def test_file_size_limit_is_one_line_naming_the_file(tmp_path, capsys):
    # the same write path on any Linux: over a 1 MiB file size limit the kernel says EFBIG
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limit[1]))
    try:
        with pytest.raises(OSError) as err:
            io_stream.write_bytes(os.urandom(3 * 2**20), str(target))
        step = str(tmp_path / "step_1")
        with pytest.raises(SystemExit) as code:
            wmtp_cli.run_cli(lambda argv: io_stream.save_ckpt({"w": torch.zeros(2**20)}, step))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert str(err.value) == f"[Errno 27] {target}: File too large"
    assert sorted(os.listdir(tmp_path)) == ["keep.bin", "step_1"] and target.read_bytes() == b"old"
    assert os.listdir(step) == []
    assert code.value.code == 1
    tensors = os.path.join(step, "tensors.safetensors")
    assert capsys.readouterr().err == f"error: [Errno 27] {tensors}: File too large\n"


DEEP = b"[" * 20_000 + b"]" * 20_000  # deeper than Python's recursion limit


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_deeply_nested_json_records(root, name):
    data = b'{"a": 1}\n' + b'{"a": ' + DEEP + b"}\n" if name.endswith("l") else b"[" + DEEP + b"]"
    uri = io_stream.join(root, name)
    io_stream.write_bytes(data, uri)
    with pytest.raises(ValueError) as err:
        list(io_stream.iter_records(uri))
    where = f"{uri}: line 2: " if name.endswith("l") else f"{uri}: "
    assert str(err.value) == f"{where}JSON nested too deeply"


def test_deeply_nested_safetensors_header_and_manifest(tmp_path):
    bad = tmp_path / "deep.safetensors"
    bad.write_bytes(struct.pack("<Q", len(DEEP)) + DEEP)
    with pytest.raises(ValueError, match=f"^{bad}: safetensors header is not JSON"):
        io_stream.read_safetensors(str(bad))
    path = tmp_path / "step_1"
    io_stream.save_ckpt({"w": torch.zeros(1)}, str(path))
    (path / "manifest.json").write_bytes(b'{"state": ' + DEEP + b"}")
    with pytest.raises(ValueError, match="manifest.json: not a checkpoint manifest$"):
        io_stream.load_ckpt(str(path))


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]},
        {"dtype": "U8", "shape": [1], "data_offsets": [False, True]},
        {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
    ],
)
def test_safetensors_header_with_bool_or_negative_numbers(tmp_path, entry):
    header = json.dumps({"t": entry}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ValueError, match=f"^{bad}: tensor 't': (bad shape|bad data_offsets|data_)"):
        io_stream.read_safetensors(str(bad))


def test_version_id_in_an_s3_key_is_refused(s3, boto):
    boto.put_object(Bucket=BUCKET, Key="k.bin", Body=b"latest")
    uri = f"{s3}/k.bin?versionId=3HL4kqtJlcpXroDTDmJ"
    for call in (
        lambda: io_stream.read_bytes(uri),
        lambda: io_stream.write_bytes(b"overwrite", uri),
        lambda: io_stream.read_safetensors(uri),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert (
            str(err.value) == f"{uri}: S3 version ids are not supported; name the object by its key"
        )
    assert boto.get_object(Bucket=BUCKET, Key="k.bin")["Body"].read() == b"latest"
