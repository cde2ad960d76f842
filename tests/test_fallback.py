"""S3 down (issue 16): reads fall back to a local mirror (`s3.fallback_root`), checkpoints are
written there while S3 cannot take them, and `migrate.py mirror` / `sync-checkpoints` fill the
mirror and bring the checkpoints back.

"Down" is real: a moto server of this test's own that is stopped, or the fault proxy that
accepts connections and never answers. Expected bytes come from independent paths: boto3 straight
to moto, the objects as written, hashlib, and the same reads while S3 was still up.
"""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import boto3
import mlflow
import pytest
import torch
from conftest import BUCKET, ROOT, free_port, iam_user, moto_auth
from fault_proxy import fault_proxy
from helpers import TINY, write_dataset, write_hf_llama, write_meta_native

import io_stream
import migrate
import train_mtp
import wmtp_ckpt
from wmtp import load_config, load_model

ALL = ("GET", "HEAD", "PUT", "POST", "DELETE")
FAST = {"connect_timeout": 0.5, "read_timeout": 0.5, "retries": 1}  # a dead S3 fails in seconds


@pytest.fixture
def own_s3(monkeypatch):
    """A moto server of this test's own (stopping it breaks no other test), one bucket; yields
    (endpoint, stop)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing-secret")):
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("WMTP_S3_FALLBACK", raising=False)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket="wmtp-fb"
    )
    io_stream.configure_s3(endpoint)
    stopped = []

    def stop() -> None:
        server.stop()
        stopped.append(True)

    yield endpoint, stop
    if not stopped:
        server.stop()
    io_stream.configure_s3()


@pytest.fixture(autouse=True)
def _reset():
    yield
    io_stream.configure_s3()
    while mlflow.active_run():
        mlflow.end_run()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it


def mirror_cmd(uri: str, folder, endpoint: str, capsys) -> list[str]:
    """`python migrate.py mirror URI DIR` in this process; its lines (exit code 0 asserted)."""
    code = migrate.main(["mirror", uri, str(folder), "--endpoint-url", endpoint])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return out.out.splitlines()


def warnings_of(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]


# ---------------------------------------------------------------------------------------------
# reads


def test_reads_come_from_the_mirror_when_the_server_is_stopped(own_s3, tmp_path, capsys):
    endpoint, stop = own_s3
    root, mirror = "s3://wmtp-fb", tmp_path / "mirror"
    write_meta_native(f"{root}/models/meta", dim=32, n_attn_heads=2, n_kv_heads=1)  # a .pth
    write_hf_llama(f"{root}/models/hf", dim=32, n_layers=2)
    lines = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(50)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    boto = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    boto.put_object(Bucket="wmtp-fb", Key="data/train.jsonl.gz", Body=data)
    # what the same reads give while S3 is up
    meta = load_model(f"{root}/models/meta", kind="mtp").state_dict()
    hf = io_stream.read_safetensors(f"{root}/models/hf/model.safetensors")
    records = list(io_stream.iter_records(f"{root}/data/train.jsonl.gz"))
    listing = io_stream.list_dir(f"{root}/models/meta")
    assert mirror_cmd(root, mirror, endpoint, capsys)[-1].endswith("0 failed")

    stop()
    io_stream.configure_s3(endpoint, **FAST)  # no fallback: S3 down is an error, as before
    with pytest.raises(ConnectionError, match=r"^s3://wmtp-fb/data/train.jsonl.gz: S3 endpoint"):
        io_stream.read_bytes(f"{root}/data/train.jsonl.gz")
    assert io_stream.fallback_used() == []

    io_stream.configure_s3(endpoint, fallback_root=str(mirror), **FAST)
    assert io_stream.read_bytes(f"{root}/data/train.jsonl.gz") == data
    first = warnings_of(capsys)
    local = f"{mirror}/wmtp-fb/data/train.jsonl.gz"
    assert first == [
        f"warning: {root}/data/train.jsonl.gz: S3 endpoint unreachable ({endpoint}); "
        f"reading {local} (s3.fallback_root) instead"
    ]
    assert list(io_stream.iter_records(f"{root}/data/train.jsonl.gz")) == records
    got = load_model(f"{root}/models/meta", kind="mtp").state_dict()  # list_dir, json, .pth
    assert got.keys() == meta.keys() and all(torch.equal(got[k], meta[k]) for k in meta)
    got = io_stream.read_safetensors(f"{root}/models/hf/model.safetensors")
    assert got.keys() == hf.keys() and all(torch.equal(got[k], hf[k]) for k in hf)
    assert io_stream.list_dir(f"{root}/models/meta") == listing
    assert io_stream.exists(f"{root}/models/hf/config.json")
    assert not io_stream.exists(f"{root}/models/hf/nothing.json")
    size = io_stream.file_size(f"{root}/models/meta/consolidated.00.pth")
    assert size == os.path.getsize(f"{mirror}/wmtp-fb/models/meta/consolidated.00.pth")
    # one warning per input, naming it and its copy; every input recorded for the MLflow tag
    later = warnings_of(capsys)
    pth = f"{root}/models/meta/consolidated.00.pth"
    assert any(ln.startswith(f"warning: {pth}: S3 failed") and "reading " in ln for ln in later)
    used = dict(io_stream.fallback_used())
    assert used[pth] == f"{mirror}/wmtp-fb/models/meta/consolidated.00.pth"
    assert used[f"{root}/models/hf/model.safetensors"].startswith(str(mirror))
    assert len(later) == len(used) - 1  # the first read's warning came before
    tags = wmtp_ckpt.fallback_tags()
    assert f"{pth} <- {used[pth]}" in tags["s3_fallback_reads"]

    # WMTP_S3_FALLBACK does the same; a bucket the mirror lacks is an error naming the cause
    os.environ["WMTP_S3_FALLBACK"] = str(mirror)
    try:
        io_stream.configure_s3(endpoint, **FAST)
        assert io_stream.read_bytes(f"{root}/data/train.jsonl.gz") == data
        with pytest.raises(ConnectionError, match="^s3://other-bucket/x: S3 endpoint unreachable"):
            io_stream.read_bytes("s3://other-bucket/x")
    finally:
        del os.environ["WMTP_S3_FALLBACK"]


def test_an_endpoint_that_never_answers_falls_back_after_its_timeouts(s3, boto, tmp_path, capsys):
    mirror = tmp_path / "mirror"
    boto.put_object(Bucket=BUCKET, Key="d/a.bin", Body=b"a" * 1000)
    boto.put_object(Bucket=BUCKET, Key="d/b.bin", Body=b"b" * 2000)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    mirror_cmd(f"{s3}/d", mirror, endpoint, capsys)
    with fault_proxy(endpoint, "hang", times=10**6, methods=ALL) as proxy:
        io_stream.configure_s3(proxy["endpoint"], fallback_root=str(mirror), **FAST)
        assert io_stream.read_bytes(f"{s3}/d/a.bin") == b"a" * 1000
        (line,) = warnings_of(capsys)
        assert line.startswith(f"warning: {s3}/d/a.bin: the S3 endpoint ({proxy['endpoint']})")
        assert "sent nothing for 0.5 s (s3.read_timeout; s3.retries: 1)" in line
        assert line.endswith(f"reading {mirror}/{BUCKET}/d/a.bin (s3.fallback_root) instead")
        asked = proxy["requests"]
        # the next read does not wait out the timeouts again: straight to the mirror
        assert io_stream.read_bytes(f"{s3}/d/b.bin") == b"b" * 2000
        assert proxy["requests"] == asked
        (line,) = warnings_of(capsys)
        assert line.startswith(f"warning: {s3}/d/b.bin: S3 failed ") and "sent nothing" in line


def test_no_such_object_or_access_denied_never_falls_back(
    s3, boto, s3_endpoint, tmp_path, capsys, monkeypatch
):
    mirror = tmp_path / "mirror"
    os.makedirs(mirror / BUCKET)
    (mirror / BUCKET / "only-here.txt").write_bytes(b"stale copy")
    (mirror / BUCKET / "secret.txt").write_bytes(b"stale copy")
    boto.put_object(Bucket=BUCKET, Key="secret.txt", Body=b"the real one")
    io_stream.configure_s3(fallback_root=str(mirror), **FAST)
    with pytest.raises(FileNotFoundError, match=f"^{s3}/only-here.txt: no such object$"):
        io_stream.read_bytes(f"{s3}/only-here.txt")
    assert not io_stream.exists(f"{s3}/only-here.txt")
    with pytest.raises(FileNotFoundError):
        io_stream.read_safetensors(f"{s3}/only-here.txt")

    key_id, key_secret = iam_user(s3_endpoint, "lister", ["s3:ListBucket"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key_secret)
    io_stream.configure_s3(fallback_root=str(mirror), **FAST)
    moto_auth(s3_endpoint, b"0")
    try:
        with pytest.raises(PermissionError, match=f"^{s3}/secret.txt: access denied"):
            io_stream.read_bytes(f"{s3}/secret.txt")
    finally:
        moto_auth(s3_endpoint, b"inf")
    assert io_stream.fallback_used() == [] and warnings_of(capsys) == []


# ---------------------------------------------------------------------------------------------
# a stream that fails mid-way (issue 24, item 9)


def records_on_s3(endpoint: str, name: str) -> tuple[str, list[dict]]:
    """3000 records (~660 KB) as s3://wmtp-fb/data/<name>; (URI, records)."""
    records = [{"i": i, "text": os.urandom(100).hex()} for i in range(3000)]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    body = gzip.compress(body) if name.endswith(".gz") else body
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").put_object(
        Bucket="wmtp-fb", Key=f"data/{name}", Body=body
    )
    return f"s3://wmtp-fb/data/{name}", records


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_a_stream_that_fails_mid_way_continues_from_the_mirror(own_s3, tmp_path, capsys, name):
    endpoint, stop = own_s3
    uri, records = records_on_s3(endpoint, name)
    mirror = tmp_path / "mirror"
    mirror_cmd("s3://wmtp-fb/data", mirror, endpoint, capsys)
    io_stream.configure_s3(endpoint, fallback_root=str(mirror), block_size=2**16, **FAST)
    it = io_stream.iter_records(uri)
    got = [next(it) for _ in range(100)]  # the dataset stream is open, one 64 KiB GET read
    assert warnings_of(capsys) == []
    stop()  # the endpoint dies
    got += list(it)
    assert got == records
    local = f"{mirror}/wmtp-fb/data/{name}"
    (line,) = warnings_of(capsys)
    assert line.startswith(f"warning: {uri}: S3 endpoint unreachable ({endpoint}) at byte ")
    assert line.endswith(f"; reading {local} (s3.fallback_root) instead")
    assert io_stream.fallback_used() == [(uri, local)]


@pytest.mark.parametrize("change", ["a byte already read", "the size"])
def test_a_mirror_copy_of_other_bytes_is_never_mixed_in(own_s3, tmp_path, capsys, change):
    endpoint, stop = own_s3
    uri, _ = records_on_s3(endpoint, "d.jsonl")
    mirror = tmp_path / "mirror"
    mirror_cmd("s3://wmtp-fb/data", mirror, endpoint, capsys)
    local = mirror / "wmtp-fb" / "data" / "d.jsonl"
    data = bytearray(local.read_bytes())
    if change == "the size":
        data += b"\n"
    else:
        data[1000] ^= 1  # a stale copy: another version of the object
    local.write_bytes(bytes(data))
    io_stream.configure_s3(endpoint, fallback_root=str(mirror), block_size=2**16, **FAST)
    it = io_stream.iter_records(uri)
    [next(it) for _ in range(100)]
    stop()
    with pytest.raises(ConnectionError) as err:
        list(it)
    msg = str(err.value)
    assert msg.startswith(f"{uri}: ") and "\n" not in msg
    assert f"; the fallback copy {local} is another object (" in msg
    other = "bytes 0-65535 differ from those read from S3" if change != "the size" else "bytes, the"
    assert other in msg, msg


def test_read_safetensors_cut_mid_way_is_read_again_from_the_mirror(s3, boto, tmp_path, capsys):
    import safetensors.torch

    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(64, 256, generator=g) for i in range(4)}  # 4 x 64 KiB
    boto.put_object(Bucket=BUCKET, Key="m/w.safetensors", Body=safetensors.torch.save(tensors))
    uri, mirror = f"{s3}/m/w.safetensors", tmp_path / "mirror"
    mirror_cmd(f"{s3}/m", mirror, os.environ["AWS_ENDPOINT_URL"], capsys)
    # the header's GET goes through; every GET of tensor bytes is cut, and so is each resume
    with fault_proxy(os.environ["AWS_ENDPOINT_URL"], "drop", after=1000, skip=1, times=10**6) as px:
        io_stream.configure_s3(px["endpoint"], fallback_root=str(mirror), block_size=2**16, **FAST)
        got = io_stream.read_safetensors(uri)
    assert px["faults"] >= 2
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    (line,) = warnings_of(capsys)
    assert line.startswith(f"warning: {uri}: reading bytes ") and "failed 2 times" in line
    assert dict(io_stream.fallback_used())[uri] == f"{mirror}/{BUCKET}/m/w.safetensors"


def test_a_trainer_whose_endpoint_dies_mid_dataset_trains_on_from_the_mirror(
    s3, s3_endpoint, tmp_path, capsys
):
    from msgspec.structs import asdict

    uri, mirror, local = f"{s3}/data/train.jsonl", tmp_path / "mirror", str(tmp_path / "d.jsonl")
    write_dataset(uri, n=2000)  # ~140 KB: five GETs of 32 KiB
    write_dataset(local, n=2000)
    mirror_cmd(f"{s3}/data", mirror, s3_endpoint, capsys)

    def cfg(data: str, run: str, endpoint: str):
        sets = [
            *TINY,
            f"paths.datasets.toy={data}",  # added: the shipped datasets stay (data.heldout's)
            "data.train=[toy]",
            f"paths.checkpoints={tmp_path}/ckpt",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"mlflow.artifact_location={tmp_path}/mlartifacts",
            "train.max_steps=4",
            "train.save_every=100",
            f"train.run_name={run}",
            f"s3.endpoint_url={endpoint}",
            "s3.block_size=32768",
            f"s3.fallback_root={mirror}",
            *(f"s3.{k}={v}" for k, v in FAST.items()),
        ]
        config = load_config(os.path.join(ROOT, "config.yaml"), sets)
        io_stream.configure_s3(**asdict(config.s3))  # as the trainers' setup does
        return config

    full = train_mtp.train(cfg(local, "local", s3_endpoint))
    # the dataset's first GET goes through; from its second on, the endpoint never answers
    with fault_proxy(s3_endpoint, "hang", skip=1, times=10**6, match=b"/data/train.jsonl") as px:
        cut = train_mtp.train(cfg(uri, "cut", px["endpoint"]))
    assert px["faults"] >= 1
    assert losses_by_step(cut["run_id"]) == losses_by_step(full["run_id"])
    warned = [ln for ln in capsys.readouterr().err.splitlines() if f"warning: {uri}: " in ln]
    assert len(warned) == 1 and " at byte 32768; reading " in warned[0], warned


# ---------------------------------------------------------------------------------------------
# checkpoints


def losses_by_step(run_id: str) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint)."""
    history = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")
    return {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}


def test_checkpoints_go_to_the_fallback_while_s3_is_down_resume_exactly_and_sync_back(
    s3, s3_endpoint, boto, tmp_path, capsys
):
    data, mirror = str(tmp_path / "train.jsonl"), tmp_path / "mirror"
    write_dataset(data, n=40)

    def cfg(checkpoints: str, run: str):
        sets = [
            *TINY,
            f"paths.datasets={{toy: {data}}}",
            "data.heldout=[]",
            "data.train=[toy]",
            f"paths.checkpoints={checkpoints}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"mlflow.artifact_location={tmp_path}/mlartifacts",
            "train.max_steps=3",
            "train.save_every=1",
            "train.keep_last=5",
            f"train.run_name={run}",
            f"s3.fallback_root={mirror}",
            "train.checkpoint_fallback=true",
        ]
        return load_config(os.path.join(ROOT, "config.yaml"), sets)

    full = train_mtp.train(cfg(str(tmp_path / "local-ckpt"), "full"))
    run_dir, local_dir = f"{s3}/ckpt/cut", mirror / BUCKET / "ckpt" / "cut"
    local_2 = str(local_dir / "step_2")
    # every request about step_2 hangs: S3 is down for that save, up before and after it
    with fault_proxy(s3_endpoint, "hang", times=10**6, methods=ALL, match=b"/ckpt/cut/step_2/",
                     lifetime=600) as proxy:  # fmt: skip
        io_stream.configure_s3(proxy["endpoint"], fallback_root=str(mirror), **FAST)
        cut = train_mtp.train(cfg(f"{s3}/ckpt", "cut"), stop_after=2)
        loud = [ln for ln in capsys.readouterr().err.splitlines() if "!!!" in ln]
        assert f"checkpoint step 2 is NOT on S3: {run_dir}/step_2/" in loud[0]
        assert f"written whole to {local_2} instead" in loud[1]
        assert f"sync-checkpoints {local_dir} {run_dir}" in loud[2]
        assert os.path.isfile(f"{local_2}/manifest.json")
        io_stream.configure_s3(proxy["endpoint"], **FAST)  # S3's own view, no mirror
        assert io_stream.list_dir(run_dir) == ["step_1"]  # and the run's lock is gone
        tags = mlflow.MlflowClient().get_run(cut["run_id"]).data.tags
        assert tags["checkpoint_step_2"] == local_2 and local_2 in tags["s3_fallback_checkpoints"]

        # --resume auto takes the newest complete checkpoint of both places: the local step_2
        io_stream.configure_s3(proxy["endpoint"], fallback_root=str(mirror), **FAST)
        assert wmtp_ckpt.find_resume("auto", f"{s3}/ckpt", "cut", "baseline") == local_2
        train_mtp.train(cfg(f"{s3}/ckpt", "cut"), "auto")
    assert losses_by_step(cut["run_id"]) == losses_by_step(full["run_id"])
    assert len(losses_by_step(full["run_id"])) == 3
    io_stream.configure_s3()
    assert io_stream.list_dir(run_dir) == ["final", "step_1", "step_3"]

    # S3 down altogether: resume finds the newest checkpoint it can read, the local one
    with fault_proxy(s3_endpoint, "hang", times=10**6, methods=ALL) as dead:
        io_stream.configure_s3(dead["endpoint"], fallback_root=str(mirror), **FAST)
        assert wmtp_ckpt.find_resume("auto", f"{s3}/ckpt", "cut", "baseline") == local_2

    # S3 is back: upload what was written locally, manifest last; twice changes nothing
    args = ["sync-checkpoints", str(local_dir), run_dir, "--endpoint-url", s3_endpoint]
    code = migrate.main(args)
    out = capsys.readouterr().out.splitlines()
    size = sum(os.path.getsize(f) for f in (local_dir / "step_2").iterdir())
    assert code == 0 and out == [
        f"synced {local_2} -> {run_dir}/step_2 (2 files, {size} bytes, manifest last; "
        "each checked by size and ETag)"
    ], out
    for name in ("tensors.safetensors", "manifest.json"):
        body = boto.get_object(Bucket=BUCKET, Key=f"ckpt/cut/step_2/{name}")["Body"].read()
        assert body == (local_dir / "step_2" / name).read_bytes()
    io_stream.configure_s3()
    on_s3, here = io_stream.load_ckpt(f"{run_dir}/step_2"), io_stream.load_ckpt(local_2)
    assert on_s3["step"] == here["step"] == 2
    assert all(torch.equal(on_s3["model"][k], here["model"][k]) for k in here["model"])
    (local_dir / "step_2" / "manifest.json").write_bytes(b"{}")  # S3's complete copy stays
    etag = boto.head_object(Bucket=BUCKET, Key="ckpt/cut/step_2/manifest.json")["ETag"]
    assert migrate.main(args) == 0
    assert capsys.readouterr().out.startswith(f"kept   {run_dir}/step_2: complete on S3 already")
    assert boto.head_object(Bucket=BUCKET, Key="ckpt/cut/step_2/manifest.json")["ETag"] == etag


def test_sync_checkpoints_replaces_a_half_written_s3_copy_and_skips_incomplete_local_ones(
    s3, boto, tmp_path, capsys
):
    local = tmp_path / "ckpts"
    io_stream.save_ckpt({"step": 3, "w": torch.arange(10.0)}, str(local / "run" / "step_3"))
    os.makedirs(local / "run" / "step_5")  # a save killed before its manifest: not uploaded
    (local / "run" / "step_5" / "tensors.safetensors").write_bytes(b"partial")
    boto.put_object(Bucket=BUCKET, Key="ck/run/step_3/tensors.safetensors", Body=b"half")
    boto.put_object(Bucket=BUCKET, Key="ck/run/step_3/stray.bin", Body=b"x")
    assert migrate.main(["sync-checkpoints", str(local), f"{s3}/ck"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"synced {local}/run/step_3 -> {s3}/ck/run/step_3 (2 files")
    assert out[1] == f"skip   {local}/run/step_5: incomplete (no manifest.json), not uploaded"
    keys = [o["Key"] for o in boto.list_objects_v2(Bucket=BUCKET, Prefix="ck/")["Contents"]]
    assert sorted(keys) == ["ck/run/step_3/manifest.json", "ck/run/step_3/tensors.safetensors"]
    assert torch.equal(io_stream.load_ckpt(f"{s3}/ck/run/step_3")["w"], torch.arange(10.0))
    assert migrate.main(["sync-checkpoints", str(tmp_path / "none"), f"{s3}/ck"]) == 2
    assert "no such folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# migrate.py mirror


def test_mirror_checks_every_copy_and_replaces_a_corrupted_one(s3, boto, tmp_path, capsys):
    endpoint, mirror = os.environ["AWS_ENDPOINT_URL"], tmp_path / "m"
    big = os.urandom(11 * 2**20 + 5)
    with io_stream.open_stream(f"{s3}/p/big.bin", "wb", block_size=5 * 2**20) as f:
        f.write(big)  # multipart: 3 parts, ETag = MD5 of the parts' MD5s + "-3"
    boto.put_object(Bucket=BUCKET, Key="p/small.txt", Body=b"hello")
    boto.put_object(Bucket=BUCKET, Key="pq/not-under-p.txt", Body=b"no")
    etag = boto.head_object(Bucket=BUCKET, Key="p/big.bin")["ETag"].strip('"')
    parts = [big[i : i + 5 * 2**20] for i in range(0, len(big), 5 * 2**20)]
    md5s = b"".join(hashlib.md5(p).digest() for p in parts)
    assert etag == hashlib.md5(md5s).hexdigest() + "-3"  # what the mirror checks against

    lines = mirror_cmd(f"{s3}/p", mirror, endpoint, capsys)
    assert lines[0].startswith(f"copied {mirror}/{BUCKET}/p/big.bin ({len(big)} bytes; size")
    assert lines[-1].endswith(": 2 copied, 0 already complete, 0 failed")
    assert (mirror / BUCKET / "p" / "big.bin").read_bytes() == big
    assert not (mirror / BUCKET / "pq").exists()
    with open(mirror / BUCKET / "p" / "big.bin", "r+b") as f:  # same size, one byte changed
        f.seek(7 * 2**20)
        f.write(b"\x00" if big[7 * 2**20] else b"\x01")
    lines = mirror_cmd(f"{s3}/p", mirror, endpoint, capsys)
    assert lines[0].startswith(f"copied {mirror}/{BUCKET}/p/big.bin")
    assert lines[1] == f"kept   {mirror}/{BUCKET}/p/small.txt (size and ETag match)"
    assert (mirror / BUCKET / "p" / "big.bin").read_bytes() == big

    assert migrate.main(["mirror", "/not/s3", str(mirror)]) == 2
    assert migrate.main(["mirror", f"{s3}/nothing-here", str(mirror)]) == 2
    err = capsys.readouterr().err
    assert "not an s3:// URI" in err and f"{s3}/nothing-here: no objects under this prefix" in err


def test_mirror_killed_mid_object_continues_where_it_stopped(s3, boto, tmp_path, capsys):
    endpoint, mirror = os.environ["AWS_ENDPOINT_URL"], tmp_path / "m"
    big = os.urandom(6 * 2**20)
    boto.put_object(Bucket=BUCKET, Key="p/a.txt", Body=b"first")
    boto.put_object(Bucket=BUCKET, Key="p/big.bin", Body=big)
    boto.put_object(Bucket=BUCKET, Key="p/z.txt", Body=b"last")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = ROOT
    code = "import sys, migrate; migrate.MIRROR_CHUNK = 2**20; sys.exit(migrate.main(sys.argv[1:]))"
    folder = mirror / BUCKET / "p"
    # the 4th ranged GET of big.bin never ends: the mirror has 3 MiB of it when it is killed
    with fault_proxy(endpoint, "stall", skip=3, times=10**6, match=b"big.bin") as proxy:
        cmd = [sys.executable, "-c", code, "mirror", f"{s3}/p", str(mirror)]
        proc = subprocess.Popen(
            [*cmd, "--endpoint-url", proxy["endpoint"]], env=env, stdout=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 120
            while not any(
                n.startswith(".tmp-") and os.path.getsize(folder / n) >= 3 * 2**20
                for n in (os.listdir(folder) if folder.is_dir() else [])
            ):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (folder / "a.txt").read_bytes() == b"first" and not (folder / "big.bin").exists()
    lines = mirror_cmd(f"{s3}/p", mirror, endpoint, capsys)
    assert lines[0] == f"kept   {folder}/a.txt (size and ETag match)"
    assert lines[1] == (
        f"copied {folder}/big.bin ({len(big)} bytes, continued from byte {3 * 2**20}; "
        "size and ETag match)"
    )
    assert (folder / "big.bin").read_bytes() == big and (folder / "z.txt").read_bytes() == b"last"
    assert sorted(os.listdir(folder)) == ["a.txt", "big.bin", "z.txt"]  # no temp file left
