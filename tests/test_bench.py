"""Benchmark tooling that must not rot: the device-sized loss chunking, bench_gpu_loss's CPU mode,
the shaping proxy in front of a real S3 API, and the s3.max_concurrency / s3.block_size settings."""

import argparse
import os
import socket
import sys
import threading
import time

import pytest
import safetensors.torch
import torch
from helpers import naive_loss

import io_stream
import wmtp_train
from wmtp import ConfigError, parse_config
from wmtp_loss import default_chunk_rows, mtp_loss, mtp_targets
from wmtp_model import init_mtp_model

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)

import bench_gpu_loss  # noqa: E402
from shaping_proxy import start_proxy  # noqa: E402

GiB = 2**30


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on one thread: two spin against each other on a busy 2-core machine (10x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# chunking


@pytest.mark.parametrize(
    ("vocab", "dim", "device", "memory", "rows"),
    [
        (32000, 4096, "cpu", None, 524),  # 2**24 // 32000 logits: today's CPU rule
        (128256, 4096, "cpu", None, 130),
        # 141 GiB / 32 = 4,731,174,912 B; less the bf16 dW product 2*128256*4096 = 1,050,673,152 B,
        # over 6*128256 B a row = 4782 rows -> 4096
        (128256, 4096, "cuda", 141 * GiB, 4096),
        (
            128256,
            4096,
            torch.device("cuda", 0),
            80 * GiB,
            2048,
        ),  # (2,684,354,560 - ...) / ... = 2122
        (32000, 4096, "cuda", 141 * GiB, 8192),  # 23,276 rows fit: capped at 8192
        (128256, 4096, "cuda", 16 * GiB, 1024),  # nothing fits in 1/32: the 1024-row floor
    ],
)
def test_default_chunk_rows(vocab, dim, device, memory, rows):
    assert default_chunk_rows(vocab, dim, device, memory) == rows


@pytest.mark.parametrize("chunk", [1, 5, 37, None, 100_000])
def test_mtp_loss_does_not_depend_on_the_chunk(chunk):
    model = init_mtp_model(vocab_size=300, dim=32, n_layers=6, n_heads=4, n_attn_heads=4, seed=1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 300, (2, 29), generator=g)
    labels = mtp_targets(ids, torch.ones_like(ids, dtype=torch.bool), 4)
    weights = torch.rand(labels.shape, generator=g)

    expected = naive_loss(model, ids, None, labels, weights)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    loss, _ = mtp_loss(model, ids, labels, weights, chunk_size=chunk)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bench/bench_gpu_loss.py


def test_bench_gpu_loss_cpu_mode(capsys):
    args = ["--cpu", "--shapes", "tiny", "--steps", "1", "--warmup", "0", "--threads", "1"]
    args += ["--chunk-rows", "16"]
    results = bench_gpu_loss.main(args)["tiny"]
    assert list(results) == ["kit", "kit, chunk 16", "naive", "kit H=1"]
    # the kit's loss and the naive [B,S,H,V] loss of the same random model agree
    assert results["kit"]["loss"] == pytest.approx(results["naive"]["loss"], rel=1e-5)
    assert results["kit, chunk 16"]["loss"] == pytest.approx(results["naive"]["loss"], rel=1e-5)
    out = capsys.readouterr().out
    assert "| kit H=1 |" in out and "liger: not run" in out


def test_bench_gpu_loss_refuses_gpu_shapes_on_cpu():
    with pytest.raises(SystemExit) as exc:
        bench_gpu_loss.main(["--cpu", "--shapes", "7b_1t_4"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------
# bench/shaping_proxy.py and the S3 read settings


def test_read_through_shaping_proxy_honours_s3_settings(s3, s3_endpoint, boto, tmp_path):
    tensors = {"a": torch.randn(512, 512), "b": torch.arange(1000), "c": torch.randn(7)}
    local = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(local))
    boto.put_object(Bucket="wmtp-test", Key="m.safetensors", Body=local.read_bytes())

    endpoint, stats, stop = start_proxy(s3_endpoint, latency_ms=5, mbps_per_conn=20)
    block, in_flight, most, spans = 256 * 2**10, [0], [0], []
    io_stream.configure_s3(endpoint_url=endpoint, max_concurrency=2, block_size=block)
    events = io_stream.s3_filesystem().s3.meta.events

    def sent(request, **kwargs):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        if request.headers.get("Range"):
            first, last = request.headers["Range"].decode().removeprefix("bytes=").split("-")
            spans.append(int(last) - int(first) + 1)

    def answered(**kwargs):
        in_flight[0] -= 1

    events.register("before-send.s3", sent)
    events.register("after-call.s3", answered)
    try:
        got = io_stream.read_safetensors(f"{s3}/m.safetensors")
    finally:
        stop()
    assert got.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(got[k], tensors[k])
    assert max(spans) <= block and len(spans) >= 4  # tensor "a" alone is 1 MiB: 4 blocks
    assert most[0] <= 2  # no more GETs in flight than s3.max_concurrency
    assert stats["requests"] >= len(spans)
    assert stats["bytes_down"] >= local.stat().st_size


def test_shaping_proxy_bounds_connections_and_stops_by_itself(s3_endpoint):
    endpoint, stats, stop = start_proxy(s3_endpoint, max_conns=1, lifetime_s=2.0)
    port = int(endpoint.rsplit(":", 1)[1])
    first = socket.create_connection(("127.0.0.1", port))  # held open, so it keeps the one slot
    second = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert second.recv(1) == b""  # over max_conns: closed at once
    assert stats["refused"] == 1 and stats["connections"] == 1
    while True:  # after lifetime_s nobody listens any more
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.1)
    first.close()
    second.close()
    stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("shaping")]


def test_s3_settings_from_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  train: []\ns3:\n  max_concurrency: 32\n  block_size: 16777216\n")
    try:
        cfg = wmtp_train.setup(argparse.Namespace(config=str(path), set=[]))
        assert (cfg.s3.max_concurrency, cfg.s3.block_size) == (32, 16 * 2**20)
        # aiobotocore's pool must hold every GET in flight (its default is 10)
        assert io_stream.s3_options()["config_kwargs"]["max_pool_connections"] == 32
    finally:
        io_stream.configure_s3()
    with pytest.raises(ConfigError, match="s3.max_concurrency"):
        parse_config("s3:\n  max_concurrency: 0\n", "c.yaml")
    with pytest.raises(ConfigError, match="s3.block_size"):
        parse_config("", "c.yaml", ["s3.block_size=-1"])
    with pytest.raises(ValueError, match="s3.block_size must be a positive integer"):
        io_stream.configure_s3(block_size=0)
