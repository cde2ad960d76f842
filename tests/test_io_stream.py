"""io_stream on local paths and on a real S3 API (moto server): streams, records, safetensors,
checkpoints, and every error case named in issue 2.

Expected values come from independent code paths: plain `open`, boto3, Python's `json`,
`gzip`, `struct`, and the `safetensors` library itself.
"""

import gzip
import json
import os
import random
import struct
import tracemalloc

import pytest
import safetensors.torch
import torch
from botocore.exceptions import ClientError
from conftest import BUCKET, iam_user, moto_auth

import io_stream

# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def store(root, request):
    """(put, get) for raw bytes under `root` that bypass io_stream: plain files or boto3."""
    if root.startswith("s3://"):
        client = request.getfixturevalue("boto")
        prefix = root[len(f"s3://{BUCKET}/") :]

        def put(name: str, data: bytes) -> None:
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=data)

        def get(name: str) -> bytes:
            return client.get_object(Bucket=BUCKET, Key=f"{prefix}/{name}")["Body"].read()

        return put, get

    def put(name: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)

    def get(name: str) -> bytes:
        with open(os.path.join(root, name), "rb") as f:
            return f.read()

    return put, get


@pytest.fixture
def s3_requests(s3):
    """Every request the kit's S3 client sends, as (operation, Range header, body length)."""
    seen = []

    def record(request, event_name, **kwargs):
        rng = request.headers.get("Range")
        size = int(request.headers.get("Content-Length", 0) or 0)
        seen.append((event_name.rsplit(".", 1)[-1], rng.decode() if rng else None, size))

    io_stream.s3_filesystem().s3.meta.events.register("before-send.s3", record)
    return seen


def ranges(requests) -> list[tuple[int, int]]:
    """(first, last) byte of every GetObject, in request order."""
    out = []
    for op, rng, _ in requests:
        if op == "GetObject":
            assert rng is not None, "a GET without a Range header fetches the whole object"
            first, last = rng.removeprefix("bytes=").split("-")
            out.append((int(first), int(last)))
    return out


def secret() -> str:
    return os.environ.get("AWS_SECRET_ACCESS_KEY", "no-secret-set")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and raw bytes (NaN payloads and float8 bit patterns included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8),
            b.contiguous().reshape(-1).view(torch.uint8),
        )
    )


def every_dtype_tensors() -> dict[str, torch.Tensor]:
    """One random tensor per dtype io_stream maps, plus awkward shapes and layouts."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in io_stream.dtypes().items():
        if dtype == torch.bool:
            out[name] = torch.randint(0, 2, (3, 5), generator=g).bool()
        else:
            n = 3 * 5 * dtype.itemsize
            out[name] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype)
            out[name] = out[name].reshape(3, 5)
    out["scalar"] = torch.tensor(2.5, dtype=torch.float32)
    out["empty"] = torch.zeros(0, 4, dtype=torch.float16)
    out["transposed"] = torch.arange(12, dtype=torch.int32).reshape(3, 4).t()
    out["offset_view"] = torch.arange(20, dtype=torch.float64)[7:13]
    return out


def safetensors_file(header: dict, data: bytes, n: int | None = None) -> bytes:
    """Hand-built safetensors bytes: 8-byte little-endian length, JSON header, data."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


# ---------------------------------------------------------------------------------------------
# resolve


def test_resolve_local_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert io_stream.resolve("data/x.jsonl") == ("local", str(tmp_path / "data" / "x.jsonl"))
    assert io_stream.resolve("/abs/x.bin") == ("local", "/abs/x.bin")
    assert io_stream.resolve("~/m/x.bin") == ("local", str(tmp_path / "home" / "m" / "x.bin"))
    assert io_stream.resolve("file:///abs/y.bin") == ("local", "/abs/y.bin")
    assert io_stream.resolve("file://~/z") == ("local", str(tmp_path / "home" / "z"))
    # the kind comes from the scheme, never from a substring of the path
    assert io_stream.resolve("runs/my-s3-bucket/s3:x") == (
        "local",
        str(tmp_path / "runs" / "my-s3-bucket" / "s3:x"),
    )


def test_resolve_s3():
    assert io_stream.resolve("s3://bucket/models/7b/") == ("s3", "s3://bucket/models/7b")
    assert io_stream.resolve("s3://bucket") == ("s3", "s3://bucket")


@pytest.mark.parametrize(
    "bad", ["gs://bucket/key", "http://host/x.bin", "hdfs://nn/data", "s3://", "s3:///key", ""]
)
def test_resolve_rejects(bad):
    with pytest.raises(ValueError) as err:
        io_stream.resolve(bad)
    assert repr(bad) in str(err.value) or bad in str(err.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda p: io_stream.open_stream(p),
        lambda p: io_stream.open_stream(p, "wb"),
        lambda p: list(io_stream.iter_records(p)),
        lambda p: io_stream.read_safetensors(p),
        lambda p: io_stream.write_safetensors({"a": torch.zeros(1)}, p),
        lambda p: io_stream.save_ckpt({"a": 1}, p),
        lambda p: io_stream.load_ckpt(p),
        lambda p: io_stream.latest_ckpt(p),
    ],
)
def test_unsupported_scheme_everywhere(call):
    with pytest.raises(ValueError, match="gs://bucket/x.jsonl"):
        call("gs://bucket/x.jsonl")


def test_join(tmp_path):
    assert (
        io_stream.join("s3://b/run/", "step_1", "manifest.json")
        == "s3://b/run/step_1/manifest.json"
    )
    assert io_stream.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")


# ---------------------------------------------------------------------------------------------
# open_stream


def test_open_stream_round_trip(root, store):
    put, get = store
    data = os.urandom(300_000) + b"\nlast line\n"
    with io_stream.open_stream(io_stream.join(root, "w.bin"), "wb") as f:
        f.write(data[:1000])
        f.write(memoryview(data)[1000:])
    assert get("w.bin") == data

    put("r.bin", data)
    with io_stream.open_stream(io_stream.join(root, "r.bin")) as f:
        assert f.read(10) == data[:10]
        f.seek(200_000)
        assert f.read(5000) == data[200_000:205_000]
        f.seek(len(data) - 10)
        assert f.readline() == b"last line\n"
        assert f.read() == b""
    assert io_stream.read_bytes(io_stream.join(root, "r.bin")) == data


def test_open_stream_rejects_mode(tmp_path):
    with pytest.raises(ValueError, match="'r\\+b'"):
        io_stream.open_stream(str(tmp_path / "x"), "r+b")


def test_s3_reads_are_bounded_ranges(s3, boto, s3_requests):
    data = os.urandom(3 * 2**20 + 12345)
    boto.put_object(Bucket=BUCKET, Key="big.bin", Body=data)
    block = 512 * 2**10
    with io_stream.open_stream(f"{s3}/big.bin", block_size=block) as f:
        got = b"".join(iter(lambda: f.read(100_000), b""))
    assert got == data
    spans = ranges(s3_requests)
    assert all(last - first + 1 <= block for first, last in spans)
    assert len(spans) == -(-len(data) // block)  # each byte fetched once, block by block


def test_s3_large_read_goes_straight_into_the_buffer(s3, boto, s3_requests):
    data = os.urandom(2 * io_stream.BLOCK_SIZE + 999)
    boto.put_object(Bucket=BUCKET, Key="big.bin", Body=data)
    with io_stream.open_stream(f"{s3}/big.bin", block_size=2**16) as f:
        assert f.read(10) == data[:10]  # one small GET fills the 64 KiB buffer
        got = bytearray(len(data) - 10)
        assert f.readinto(got) == len(got)  # larger than the buffer: ranged GETs into `got`
        assert f.read() == b""
    assert bytes(got) == data[10:]
    spans = ranges(s3_requests)
    assert spans[0] == (0, 2**16 - 1)
    assert all(last - first + 1 <= io_stream.BLOCK_SIZE for first, last in spans)
    fetched = sum(last - first + 1 for first, last in spans)
    assert fetched <= len(data) + 2**16  # nothing read twice beyond the first buffer
    assert io_stream.read_bytes(f"{s3}/big.bin") == data  # read() to the end, also by ranges


def test_s3_object_replaced_mid_read_fails(s3, boto):
    boto.put_object(Bucket=BUCKET, Key="d.jsonl", Body=b'{"v": 1}\n' * 100_000)
    with io_stream.open_stream(f"{s3}/d.jsonl", block_size=2**16) as f:
        assert f.readline() == b'{"v": 1}\n'
        boto.put_object(Bucket=BUCKET, Key="d.jsonl", Body=b'{"v": 2}\n' * 100_000)
        with pytest.raises(OSError, match="changed while it was being read"):
            f.read(2**20)  # every GET is pinned to the ETag seen at open: no mixed versions


def test_iter_records_on_s3_fetches_blocks(s3, boto, s3_requests):
    lines = [{"i": i, "text": "x" * 1000} for i in range(10_000)]  # ~10 MiB
    body = "".join(json.dumps(r) + "\n" for r in lines).encode()
    boto.put_object(Bucket=BUCKET, Key="d.jsonl", Body=body)
    assert list(io_stream.iter_records(f"{s3}/d.jsonl")) == lines
    spans = ranges(s3_requests)
    assert len(spans) >= 2
    assert all(last - first + 1 <= io_stream.BLOCK_SIZE for first, last in spans)


def test_s3_write_is_multipart_with_bounded_parts(s3, boto, s3_requests):
    data = os.urandom(12 * 2**20 + 7)
    block = 5 * 2**20
    with io_stream.open_stream(f"{s3}/parts.bin", "wb", block_size=block) as f:
        f.write(data)  # one big write must still go out part by part
    parts = [size for op, _, size in s3_requests if op == "UploadPart"]
    assert [op for op, _, _ in s3_requests if op == "CreateMultipartUpload"] == [
        "CreateMultipartUpload"
    ]
    assert len(parts) == 3 and max(parts) <= block and sum(parts) == len(data)
    assert boto.get_object(Bucket=BUCKET, Key="parts.bin")["Body"].read() == data


@pytest.mark.parametrize("existing", [False, True])
def test_s3_write_abort_leaves_old_object(s3, boto, existing):
    if existing:
        boto.put_object(Bucket=BUCKET, Key="obj.bin", Body=b"old contents")
    with pytest.raises(RuntimeError, match="boom"):
        with io_stream.open_stream(f"{s3}/obj.bin", "wb", block_size=5 * 2**20) as f:
            f.write(os.urandom(11 * 2**20))  # two parts already uploaded
            assert len(boto.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])) == 1
            raise RuntimeError("boom")
    assert boto.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    listed = [o["Key"] for o in boto.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    if existing:
        assert listed == ["obj.bin"]
        assert boto.get_object(Bucket=BUCKET, Key="obj.bin")["Body"].read() == b"old contents"
    else:
        assert listed == []


@pytest.mark.parametrize("existing", [False, True])
def test_local_write_abort_leaves_no_partial_file(tmp_path, existing):
    target = tmp_path / "out.bin"
    if existing:
        target.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="boom"):
        with io_stream.open_stream(str(target), "wb") as f:
            f.write(b"x" * 100_000)
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == (["out.bin"] if existing else [])
    if existing:
        assert target.read_bytes() == b"old contents"


def test_unclosed_writer_publishes_nothing(root, store):
    _, get = store
    f = io_stream.open_stream(io_stream.join(root, "dropped.bin"), "wb")
    f.write(b"half of something")
    del f  # garbage-collected without close(): that is not a finished write
    with pytest.raises((FileNotFoundError, ClientError)):  # ClientError: NoSuchKey on S3
        get("dropped.bin")
    if not root.startswith("s3://"):
        assert os.listdir(root) == []


def test_exists_list_dir_remove(root, store):
    put, _ = store
    put("a/x.bin", b"1")
    put("a/y.bin", b"2")
    put("b.bin", b"3")
    assert io_stream.list_dir(root) == ["a", "b.bin"]
    assert io_stream.list_dir(io_stream.join(root, "a")) == ["x.bin", "y.bin"]
    assert io_stream.list_dir(io_stream.join(root, "nothing")) == []
    assert io_stream.exists(io_stream.join(root, "a", "x.bin"))
    assert not io_stream.exists(io_stream.join(root, "a", "z.bin"))
    io_stream.remove(io_stream.join(root, "a"))
    assert io_stream.list_dir(root) == ["b.bin"]
    assert io_stream.file_size(io_stream.join(root, "b.bin")) == 1


# ---------------------------------------------------------------------------------------------
# iter_records

RECORDS = [
    {"task_id": 1, "text": "Write a function", "test_list": ["assert f(1) == 2"]},
    {"task_id": 2, "text": 'Ünïcødé ✓ and "quotes"', "nested": {"a": [1, 2.5, None, True]}},
    {"task_id": 3, "text": ""},
]


def jsonl_bytes(records, blank_lines=True) -> bytes:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if blank_lines:  # blank and whitespace-only lines are skipped
        lines = ["", lines[0], "   ", lines[1], "\t", lines[2], ""]
    return ("\n".join(lines) + "\n").encode()


def test_iter_records_formats(root, store):
    put, _ = store
    put("d.jsonl", jsonl_bytes(RECORDS))
    put("d.jsonl.gz", gzip.compress(jsonl_bytes(RECORDS)))
    put("d.json", json.dumps(RECORDS).encode())
    put("nonl.jsonl", b'{"a": 1}\n{"a": 2}')  # no newline at the end
    for name in ("d.jsonl", "d.jsonl.gz", "d.json"):
        assert list(io_stream.iter_records(io_stream.join(root, name))) == RECORDS, name
    assert list(io_stream.iter_records(io_stream.join(root, "nonl.jsonl"))) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz"])
def test_iter_records_malformed_line(root, store, name):
    put, _ = store
    body = b'{"a": 1}\n\n{"a": 2, oops}\n{"a": 3}\n'  # the bad record is on line 3
    put(name, gzip.compress(body) if name.endswith(".gz") else body)
    uri = io_stream.join(root, name)
    it = io_stream.iter_records(uri)
    assert next(it) == {"a": 1}
    with pytest.raises(ValueError) as err:
        next(it)
    assert uri in str(err.value) and "line 3" in str(err.value)


def test_iter_records_bad_files(root, store):
    put, _ = store
    put("obj.json", b'{"not": "an array"}')
    put("scalars.json", b"[1, 2]")
    put("broken.json", b"[{")
    put("list.jsonl", b'{"a": 1}\n[1, 2]\n')
    put("corrupt.jsonl.gz", gzip.compress(b'{"a": 1}\n' * 1000)[:-30] + b"\x00" * 30)
    put("data.csv", b"a,b\n")
    cases = {
        "obj.json": "expected a JSON array",
        "scalars.json": "record 1",
        "broken.json": "not valid JSON",
        "list.jsonl": "line 2",
        "corrupt.jsonl.gz": "corrupt compressed data",
        "data.csv": "unsupported record file",
    }
    for name, words in cases.items():
        uri = io_stream.join(root, name)
        with pytest.raises(ValueError) as err:
            list(io_stream.iter_records(uri))
        assert uri in str(err.value) and words in str(err.value), name


def _peak_iterating(path: str) -> int:
    tracemalloc.start()
    try:
        n = sum(1 for _ in io_stream.iter_records(path))
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_iter_records_memory_does_not_grow_with_file_size(tmp_path, suffix):
    line = (json.dumps({"prompt": "p" * 900, "completion": "c" * 100}) + "\n").encode()
    sizes = {}
    for count in (2_000, 20_000):  # ~2 MB and ~20 MB
        path = str(tmp_path / f"{count}{suffix}")
        opener = gzip.open if suffix.endswith(".gz") else open
        with opener(path, "wb") as f:
            for _ in range(count // 100):
                f.write(line * 100)
        n, peak = _peak_iterating(path)
        assert n == count
        sizes[count] = peak
    assert sizes[20_000] < 2 * sizes[2_000] + 256 * 2**10, sizes
    assert sizes[20_000] < 20_000 * len(line) // 20, sizes  # far below the file size


# ---------------------------------------------------------------------------------------------
# safetensors


def test_write_safetensors_is_read_by_safetensors(root, store, tmp_path):
    _, get = store
    tensors = every_dtype_tensors()
    meta = {"format": "pt", "step": "12"}
    io_stream.write_safetensors(tensors, io_stream.join(root, "w.safetensors"), metadata=meta)
    raw = get("w.safetensors")
    local = (
        tmp_path / "copy.safetensors"
    )  # safetensors' bytes loader lacks F8_E8M0; its file one has it
    local.write_bytes(raw)
    loaded = safetensors.torch.load_file(str(local))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert same_bytes(loaded[name], t), name
    with safetensors.safe_open(str(local), "pt") as f:
        assert f.metadata() == meta
    n = struct.unpack("<Q", raw[:8])[0]
    assert (8 + n) % 8 == 0  # data section aligned like safetensors' own writer


def test_safetensors_file_is_read_by_read_safetensors(root, store, tmp_path):
    put, _ = store
    tensors = every_dtype_tensors()
    local = tmp_path / "ref.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(local))
    put("ref.safetensors", local.read_bytes())
    loaded = io_stream.read_safetensors(io_stream.join(root, "ref.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert same_bytes(loaded[name], t), name
    # each tensor owns its storage, so one can be resized or freed without the others
    assert len({t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}) == sum(
        1 for t in loaded.values() if t.numel()
    )


def test_read_safetensors_keys_subset(root, store, tmp_path):
    put, _ = store
    tensors = {"a": torch.randn(300, 300), "b": torch.arange(10), "c": torch.randn(200, 200)}
    local = tmp_path / "k.safetensors"
    safetensors.torch.save_file(tensors, str(local))
    put("k.safetensors", local.read_bytes())
    got = io_stream.read_safetensors(io_stream.join(root, "k.safetensors"), keys=["b"])
    assert list(got) == ["b"] and torch.equal(got["b"], tensors["b"])
    with pytest.raises(KeyError, match="'zz'"):
        io_stream.read_safetensors(io_stream.join(root, "k.safetensors"), keys=["a", "zz"])


def test_read_safetensors_keys_fetch_only_their_bytes(s3, boto, s3_requests, tmp_path, monkeypatch):
    monkeypatch.setattr(io_stream, "BLOCK_SIZE", 256 * 2**10)
    tensors = {"a": torch.randn(300, 300), "b": torch.randn(200, 1000), "c": torch.randn(100)}
    local = tmp_path / "k.safetensors"
    safetensors.torch.save_file(tensors, str(local))
    raw = local.read_bytes()
    boto.put_object(Bucket=BUCKET, Key="k.safetensors", Body=raw)
    n = struct.unpack("<Q", raw[:8])[0]
    begin, end = json.loads(raw[8 : 8 + n])["b"]["data_offsets"]
    b_first, b_last = 8 + n + begin, 8 + n + end - 1

    got = io_stream.read_safetensors(f"{s3}/k.safetensors", keys=["b"])
    assert torch.equal(got["b"], tensors["b"])
    probe, *data = ranges(s3_requests)
    assert probe[0] == 0 and probe[1] < io_stream.HEADER_PROBE
    assert all(b_first <= first <= last <= b_last for first, last in data)
    assert sum(last - first + 1 for first, last in data) == 200 * 1000 * 4
    assert max(last - first + 1 for first, last in data) <= 256 * 2**10


BAD_SAFETENSORS = {
    "header longer than file": (safetensors_file({}, b"", n=10_000), "exceeds the file size"),
    "header over 100 MB": (safetensors_file({}, b"", n=200 * 2**20), "byte cap"),
    "header not JSON": (struct.pack("<Q", 6) + b"\xff\xfe{{{{", "not JSON"),
    "header not an object": (safetensors_file([1, 2], b""), "not a JSON object"),
    "too short": (b"\x01\x02", "not a safetensors file"),
    "unknown dtype": (
        safetensors_file({"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 2]}}, b"xx"),
        "unknown dtype 'F7'",
    ),
    "offsets out of range": (
        safetensors_file({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"x" * 8),
        "outside",
    ),
    "offsets overlap": (
        safetensors_file(
            {
                "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"x" * 12,
        ),
        "overlap",
    ),
    "size not shape x dtype": (
        safetensors_file({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"x" * 8),
        "needs 12",
    ),
    "truncated after header": (
        safetensors_file({"w": {"dtype": "F16", "shape": [4, 4], "data_offsets": [0, 32]}}, b""),
        "truncated",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SAFETENSORS))
def test_bad_safetensors_files(root, store, case):
    put, _ = store
    data, words = BAD_SAFETENSORS[case]
    put("bad.safetensors", data)
    uri = io_stream.join(root, "bad.safetensors")
    with pytest.raises(ValueError) as err:
        io_stream.read_safetensors(uri)
    assert uri in str(err.value) and words in str(err.value)
    assert secret() not in str(err.value)


def test_write_safetensors_rejects_non_tensors(tmp_path):
    with pytest.raises(TypeError, match="'x'"):
        io_stream.write_safetensors({"x": [1, 2]}, str(tmp_path / "x.safetensors"))
    with pytest.raises(TypeError, match="complex128"):
        io_stream.write_safetensors(
            {"c": torch.zeros(2, dtype=torch.complex128)}, str(tmp_path / "c.st")
        )
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# checkpoints


def trained_optimizer_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return model, opt


def assert_same_tree(a, b, where="state"):
    """Deep equality that keeps container types: tuples stay tuples, int keys stay ints."""
    assert type(a) is type(b) or isinstance(a, dict) and isinstance(b, dict), where
    if isinstance(a, torch.Tensor):
        assert same_bytes(a, b), where
    elif isinstance(a, dict):  # OrderedDict from state_dict() comes back as a plain dict
        assert list(a) == list(b), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_ckpt_round_trip_optimizer_and_rng(root):
    model, opt = trained_optimizer_state()
    random.seed(7)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "step": 2,
        "loss": 0.125,
        "algo": "rho1-weighted",
        "data": {"epoch": 0, "position": [3, None, True]},
    }
    path = io_stream.join(root, "step_2")
    io_stream.save_ckpt(state, path)
    back = io_stream.load_ckpt(path)
    assert_same_tree(back, state)
    assert list(back["optimizer"]["state"]) == [0, 1, 2, 3]  # int keys survive
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)

    # the restored optimizer and RNGs continue exactly like the originals
    model2, opt2 = trained_optimizer_state()
    model2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optimizer"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)
    random.setstate(state["rng"]["python"])
    expected = [random.random() for _ in range(3)]
    random.setstate(back["rng"]["python"])
    assert [random.random() for _ in range(3)] == expected
    torch.set_rng_state(state["rng"]["torch"])
    expected = torch.rand(4)
    torch.set_rng_state(back["rng"]["torch"])
    assert torch.equal(torch.rand(4), expected)


def test_ckpt_is_json_and_safetensors(root, store):
    _, get = store
    io_stream.save_ckpt({"w": torch.ones(2), "step": 5}, io_stream.join(root, "step_5"))
    manifest = json.loads(get("step_5/manifest.json"))  # plain JSON, no pickle
    assert manifest["state"]["step"] == 5
    assert torch.equal(
        safetensors.torch.load(get("step_5/tensors.safetensors"))["w"], torch.ones(2)
    )


def test_ckpt_rejects_unsupported_values(tmp_path):
    with pytest.raises(TypeError, match="'opt.fn'"):
        io_stream.save_ckpt({"opt": {"fn": object()}}, str(tmp_path / "step_1"))


def test_latest_ckpt_skips_incomplete(root, store):
    put, _ = store
    assert io_stream.latest_ckpt(root) is None
    for step in (2, 9, 10):
        io_stream.save_ckpt(
            {"step": step, "w": torch.full((2,), float(step))}, io_stream.join(root, f"step_{step}")
        )
    put("step_11/tensors.safetensors", b"written, but the run died before its manifest")
    put("step_99.tmp/manifest.json", b"{}")  # not a checkpoint name
    put("notes.txt", b"hello")
    assert io_stream.latest_ckpt(root) == io_stream.join(root, "step_10")  # 10 > 9 > 2, numerically
    assert io_stream.load_ckpt(io_stream.latest_ckpt(root))["step"] == 10
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        io_stream.load_ckpt(io_stream.join(root, "step_11"))


def test_ckpt_overwrite_that_dies_reads_as_incomplete(root, monkeypatch):
    path = io_stream.join(root, "step_3")
    io_stream.save_ckpt({"w": torch.zeros(2)}, path)

    def die(*args, **kwargs):
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(io_stream, "write_safetensors", die)
    with pytest.raises(RuntimeError):
        io_stream.save_ckpt({"w": torch.ones(2)}, path)
    assert io_stream.latest_ckpt(root) is None  # never old manifest + new tensors


# ---------------------------------------------------------------------------------------------
# errors: missing things, credentials, endpoints


def test_missing_local_file(tmp_path):
    missing = str(tmp_path / "nope" / "x.safetensors")
    for call in (
        lambda: io_stream.open_stream(missing),
        lambda: list(io_stream.iter_records(missing.replace(".safetensors", ".jsonl"))),
        lambda: io_stream.read_safetensors(missing),
    ):
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
            call()
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        io_stream.load_ckpt(str(tmp_path / "nope"))
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        io_stream.open_stream(str(tmp_path))


def test_missing_s3_key(s3):
    for call, uri in (
        (lambda u: io_stream.open_stream(u), f"{s3}/none.bin"),
        (lambda u: list(io_stream.iter_records(u)), f"{s3}/none.jsonl"),
        (lambda u: io_stream.read_safetensors(u), f"{s3}/none.safetensors"),
    ):
        with pytest.raises(FileNotFoundError) as err:
            call(uri)
        assert str(err.value) == f"{uri}: no such object"
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        io_stream.load_ckpt(f"{s3}/runs/step_1")


def test_missing_bucket(s3):
    uri = "s3://no-such-bucket-here/x"
    for call in (
        lambda: io_stream.open_stream(uri),
        lambda: io_stream.write_bytes(b"data", uri),
        lambda: io_stream.write_safetensors({"a": torch.zeros(3)}, uri),
        lambda: list(io_stream.iter_records(uri + ".jsonl")),
        lambda: io_stream.read_safetensors(uri),
        lambda: io_stream.load_ckpt(uri),
        lambda: io_stream.save_ckpt({"a": torch.zeros(1)}, uri),
        lambda: io_stream.list_dir(uri),
    ):
        with pytest.raises(FileNotFoundError) as err:
            call()
        assert "s3://no-such-bucket-here/x" in str(err.value)
        assert "no such bucket 'no-such-bucket-here'" in str(err.value)
        assert secret() not in str(err.value)


@pytest.fixture
def enforce_auth(s3, s3_endpoint, boto):
    """moto checks signatures from now on; yields a real IAM user's (key id, secret)."""
    key_id, key_secret = iam_user(s3_endpoint, "reader", ["s3:*"])
    boto.put_object(Bucket=BUCKET, Key="d.jsonl", Body=b'{"a": 1}\n')
    moto_auth(s3_endpoint, b"0")
    try:
        yield key_id, key_secret
    finally:
        moto_auth(s3_endpoint, b"inf")


def test_wrong_credentials(s3, enforce_auth, monkeypatch):
    key_id, real_secret = enforce_auth
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", real_secret)
    io_stream.configure_s3()
    assert list(io_stream.iter_records(f"{s3}/d.jsonl")) == [{"a": 1}]  # auth really is checked

    for bad_id, bad_secret in (
        (key_id, "wrong-secret-6f1d2c"),
        ("AKIAUNKNOWNKEY000000", "other-secret-9a8b"),
    ):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", bad_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
        io_stream.configure_s3()
        for call, uri in (
            (lambda u: list(io_stream.iter_records(u)), f"{s3}/d.jsonl"),
            (lambda u: io_stream.read_safetensors(u), f"{s3}/d.jsonl"),
            (lambda u: io_stream.write_bytes(b"x", u), f"{s3}/new.bin"),
            (lambda u: io_stream.latest_ckpt(u), f"{s3}/runs"),
        ):
            with pytest.raises(PermissionError) as err:
                call(uri)
            msg = str(err.value)
            assert msg.startswith(uri + ": ") and "credentials" in msg
            assert bad_secret not in msg and real_secret not in msg and bad_id not in msg


def test_missing_profile(s3, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    io_stream.configure_s3()
    with pytest.raises(PermissionError) as err:
        io_stream.read_bytes(f"{s3}/x.bin")
    assert str(err.value) == f"{s3}/x.bin: AWS profile 'no-such-profile' not found"


def test_unreachable_endpoint(s3, monkeypatch):
    from conftest import free_port

    io_stream.configure_s3(endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectionError) as err:
        io_stream.read_bytes(f"{s3}/x.bin")
    assert f"{s3}/x.bin" in str(err.value) and secret() not in str(err.value)


def test_error_verdict_ignores_words_in_the_url(s3):
    # The URL is quoted in botocore's messages: a port with "404" in it is still unreachable, and a
    # missing key named after an error code is still just missing (CI once hit port 40412).
    import socket

    with socket.socket() as sock:
        for port in range(40400, 40500):
            try:
                sock.bind(("127.0.0.1", port))  # bound, never listening: connections are refused
                break
            except OSError:
                continue
        io_stream.configure_s3(endpoint_url=f"http://127.0.0.1:{port}")
        with pytest.raises(ConnectionError, match="S3 endpoint unreachable"):
            io_stream.read_bytes(f"{s3}/x.bin")
        with pytest.raises(ConnectionError, match="S3 endpoint unreachable"):
            io_stream.list_dir(f"{s3}/p")
    io_stream.configure_s3()
    for key in ("AccessDenied.bin", "Timeout/Connect.bin", "Forbidden-404.bin"):
        with pytest.raises(FileNotFoundError) as err:
            io_stream.read_bytes(f"{s3}/{key}")
        assert str(err.value) == f"{s3}/{key}: no such object"


def test_configure_s3_overrides_environment(s3, s3_endpoint, boto, monkeypatch):
    boto.put_object(Bucket=BUCKET, Key="c.bin", Body=b"configured")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    io_stream.configure_s3(endpoint_url=s3_endpoint, region="us-east-1")
    assert io_stream.read_bytes(f"{s3}/c.bin") == b"configured"
