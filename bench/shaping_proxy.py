"""A TCP proxy on 127.0.0.1 that makes a loopback S3 server answer like a cloud one.

Each request's first response byte leaves the proxy no sooner than `latency_ms` after the
request's first byte arrived, and each connection carries at most `mbps_per_conn` megabytes
(10^6 bytes) per second, so throughput depends on concurrency as it does against real S3
(~20-60 ms to first byte, ~50-100 MB/s per connection). Plain threads, two per connection, at
most `max_conns` connections (more are closed at once) and 64 KiB buffers; the proxy stops by
itself after `lifetime_s` or on stop().

    endpoint, stats, stop = start_proxy("http://127.0.0.1:9000", latency_ms=30, mbps_per_conn=80)
    ...  # AWS_ENDPOINT_URL=endpoint
    stop()

    python bench/shaping_proxy.py --upstream http://127.0.0.1:9000 --latency-ms 30 --mbps-per-conn 80
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlparse

BUFFER = 64 * 2**10  # bytes per recv


def _relay_requests(src: socket.socket, dst: socket.socket, asked: list, counts: dict) -> None:
    """Client -> server: forward bytes; the first byte after a response marks a new request."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    try:
        while n := src.recv_into(buf):
            if asked[0] is None:  # set before forwarding, so the response cannot beat it
                asked[0] = time.monotonic()
                counts["requests"] += 1
            dst.sendall(view[:n])
            counts["bytes_up"] += n
    except OSError:
        pass
    _shutdown(dst)


def _relay_responses(
    src: socket.socket, dst: socket.socket, asked: list, counts: dict, latency: float, rate: float
) -> None:
    """Server -> client: hold a response's first byte until its request is `latency` s old, then
    pace the bytes at `rate` bytes/s (0: unlimited)."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    free_at = 0.0  # when the connection may send its next byte
    try:
        while n := src.recv_into(buf):
            if asked[0] is not None:
                free_at = max(free_at, asked[0] + latency)
                asked[0] = None
            now = time.monotonic()
            if free_at > now:
                time.sleep(free_at - now)
            if rate:
                free_at = max(free_at, now) + n / rate
            dst.sendall(view[:n])
            counts["bytes_down"] += n
    except OSError:
        pass
    _shutdown(dst)


def _shutdown(sock: socket.socket) -> None:
    """Pass an end of stream on (the other direction may still be open)."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def start_proxy(
    upstream: str,
    *,
    latency_ms: float = 0.0,
    mbps_per_conn: float = 0.0,
    max_conns: int = 256,
    lifetime_s: float = 3600.0,
) -> tuple[str, dict, Callable[[], None]]:
    """Listen on 127.0.0.1 (a free port) and relay to `upstream` ("http://host:port" or "host:port")
    with the shaping above; return (endpoint URL, counters, stop). The byte and request counters
    take in a connection once it has closed."""
    target = urlparse(upstream if "://" in upstream else f"tcp://{upstream}")
    address = (target.hostname, target.port)
    latency, rate = latency_ms / 1e3, mbps_per_conn * 1e6
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stats = {"connections": 0, "refused": 0, "requests": 0, "bytes_up": 0, "bytes_down": 0}
    slots = threading.BoundedSemaphore(max_conns)
    done = threading.Event()
    live: set[socket.socket] = set()
    handlers: list[threading.Thread] = []
    lock = threading.Lock()

    def handle(client: socket.socket) -> None:
        """Relay one client connection both ways until both sides have finished."""
        try:
            server = socket.create_connection(address, timeout=10)
        except OSError:
            client.close()
            slots.release()
            return
        server.settimeout(None)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with lock:
            if done.is_set():  # the proxy closed while this connection was opening
                server.shutdown(socket.SHUT_RDWR)
                client.shutdown(socket.SHUT_RDWR)
            live.update((client, server))
        asked = [None]  # monotonic time of the unanswered request's first byte
        counts = {"requests": 0, "bytes_up": 0, "bytes_down": 0}  # each key has one writer
        up = threading.Thread(
            target=_relay_requests,
            args=(client, server, asked, counts),
            name="shaping-proxy-up",
            daemon=True,
        )
        up.start()
        _relay_responses(server, client, asked, counts, latency, rate)
        up.join()
        with lock:
            live.difference_update((client, server))
            for k, v in counts.items():
                stats[k] += v
        client.close()
        server.close()
        slots.release()

    def serve() -> None:
        """Accept until stopped or out of lifetime, then close every open connection."""
        deadline = time.monotonic() + lifetime_s
        while not done.is_set() and time.monotonic() < deadline:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            if not slots.acquire(blocking=False):
                stats["refused"] += 1
                client.close()
                continue
            stats["connections"] += 1
            handlers[:] = [t for t in handlers if t.is_alive()]
            handlers.append(
                threading.Thread(target=handle, args=(client,), name="shaping-proxy", daemon=True)
            )
            handlers[-1].start()
        listener.close()
        with lock:
            done.set()
            for s in live:  # wakes the relay threads blocked in recv
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in handlers:
            t.join()

    acceptor = threading.Thread(target=serve, name="shaping-proxy-accept", daemon=True)
    acceptor.start()

    def stop() -> None:
        """Stop accepting, cut open connections and wait for every proxy thread to end."""
        done.set()
        acceptor.join()

    return f"http://127.0.0.1:{listener.getsockname()[1]}", stats, stop


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--upstream", required=True, help="server to relay to, e.g. http://127.0.0.1:9000"
    )
    ap.add_argument("--latency-ms", type=float, default=30.0, help="first-byte latency per request")
    ap.add_argument(
        "--mbps-per-conn", type=float, default=80.0, help="MB/s per connection (0: no cap)"
    )
    ap.add_argument("--max-conns", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3600.0, help="stop after this long")
    args = ap.parse_args()
    endpoint, stats, stop = start_proxy(
        args.upstream,
        latency_ms=args.latency_ms,
        mbps_per_conn=args.mbps_per_conn,
        max_conns=args.max_conns,
        lifetime_s=args.seconds,
    )
    print(f"{endpoint} -> {args.upstream}", flush=True)
    try:
        time.sleep(args.seconds)
    except KeyboardInterrupt:
        pass
    stop()
    print(stats)


if __name__ == "__main__":
    main()
