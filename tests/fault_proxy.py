"""A fault-injecting TCP proxy on 127.0.0.1 in front of the moto server, for the network tests.

The moto server answers every request with `Connection: close`, so each client connection
carries one request and one response; the proxy pipes both ways and, to the `times` requests
after the first `skip` of those whose method is in `methods` (and whose request line contains
`match`), does one of:

- "drop":  forward the response head and `after` body bytes, then close the connection
- "stall": forward the response head and `after` body bytes, then send nothing more
- "hang":  accept the request and never answer (nor read its body: an upload stalls)
- "503":   answer 503 SlowDown without asking the server (after `delay` seconds)
- "drip":  forward the response head and `after` body bytes, then one byte every `interval` s
- "drip_head": send the response head one byte every `interval` s (its body never)
- "strip": forward the request without the headers named in `headers` (lower case), as an
           endpoint that ignores them would answer: `Range` (200 and the whole object), or
           `If-Match` / `If-None-Match` (s3rver 3.7.1 ignores both); moto checks no signatures

At most MAX_CONNECTIONS connections are served at once (two daemon threads each), sockets
have timeouts, and everything stops when the context exits (or, whatever happens, after
`lifetime` seconds).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

MAX_CONNECTIONS = 64
SLOW_DOWN = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
)
SLOW_DOWN_BODY = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head up to and including the blank line, bytes already read past it); b"" at EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return b"", b""
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def _pipe(src: socket.socket, dst: socket.socket, stop: threading.Event) -> None:
    """Copy src to dst until either side closes."""
    try:
        while not stop.is_set():
            try:
                chunk = src.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            dst.sendall(chunk)
    except OSError:
        pass


def _strip(head: bytes, names: tuple[bytes, ...]) -> bytes:
    """The request head without the header lines named in `names` (lower case)."""
    lines = head.split(b"\r\n")
    keep = [ln for ln in lines[1:] if ln.split(b":", 1)[0].strip().lower() not in names]
    return b"\r\n".join([lines[0], *keep])


def _serve(client: socket.socket, upstream: tuple[str, int], plan: dict, stop: threading.Event):
    """One client connection: one request, one (maybe faulty) response."""
    server = None
    try:
        client.settimeout(0.5)
        head, rest = _read_head(client)
        if not head:
            return
        line = head.split(b"\r\n", 1)[0]
        with plan["lock"]:
            plan["requests"] += 1
            matching = line.split(b" ", 1)[0].decode() in plan["methods"] and plan["match"] in line
            plan["matching"] += matching
            faulty = matching and plan["matching"] > plan["skip"] and plan["faults"] < plan["times"]
            plan["faults"] += faulty
        fault = plan["fault"] if faulty else None
        if fault == "503":
            body = b"" if line.startswith(b"HEAD ") else SLOW_DOWN_BODY  # a HEAD answer has none
            stop.wait(plan["delay"])
            client.sendall(SLOW_DOWN % (len(SLOW_DOWN_BODY), body))
            return
        if fault == "hang":
            stop.wait()
            return
        if fault == "strip":
            head = _strip(head, plan["headers"])
        server = socket.create_connection(upstream, timeout=0.5)
        server.sendall(head + rest)
        threading.Thread(target=_pipe, args=(client, server, stop), daemon=True).start()
        resp_head, body = b"", b""
        while not resp_head and not stop.is_set():
            try:
                resp_head, body = _read_head(server)
            except TimeoutError:
                continue
            if not resp_head:
                return
        if fault == "drip_head":
            for i in range(len(resp_head)):
                if stop.wait(plan["interval"]):
                    return
                client.sendall(resp_head[i : i + 1])
            return
        length = _content_length(resp_head)
        limit = plan["after"] if fault in ("drop", "stall", "drip") else None
        client.sendall(resp_head)
        sent = 0
        while not stop.is_set() and (length is None or sent < length):
            if body:
                take = body if limit is None else body[: max(0, limit - sent)]
                client.sendall(take)
                sent += len(take)
                if limit is not None and sent >= limit:
                    if fault == "drip":
                        left = 2**62 if length is None else length - sent
                        _drip(client, server, body[len(take) :], left, plan, stop)
                    if fault == "stall":
                        stop.wait()
                    return
            try:
                body = server.recv(65536)
            except TimeoutError:
                body = b""
                continue
            if not body:
                break
    except OSError:
        pass
    finally:
        for s in (client, server):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        plan["slots"].release()


def _drip(client, server, body: bytes, left: int, plan: dict, stop: threading.Event) -> None:
    """Send the rest of a response (`body` read already, then the server's) one byte at a time."""
    while left > 0 and not stop.is_set():
        if not body:
            try:
                body = server.recv(65536)
            except TimeoutError:
                continue
            if not body:
                return
        client.sendall(body[:1])
        body, left = body[1:], left - 1
        stop.wait(plan["interval"])


@contextmanager
def fault_proxy(
    upstream_url: str,
    fault: str,
    *,
    times: int = 1,
    skip: int = 0,
    after: int = 0,
    methods: tuple[str, ...] = ("GET",),
    match: bytes = b"",
    headers: tuple[bytes, ...] = (),
    interval: float = 0.5,
    delay: float = 0.0,
    lifetime: float = 60.0,
) -> Iterator[dict]:
    """Run the proxy; yields {"endpoint": its URL, "requests": seen, "faults": injected}."""
    if fault not in ("drop", "stall", "hang", "503", "drip", "drip_head", "strip"):
        raise ValueError(f"unknown fault {fault!r}")
    up = urlparse(upstream_url)
    upstream = (up.hostname, up.port)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()
    plan = {
        "endpoint": f"http://127.0.0.1:{listener.getsockname()[1]}",
        "fault": fault,
        "times": times,
        "skip": skip,
        "after": after,
        "methods": methods,
        "match": match,
        "headers": tuple(h.lower() for h in headers),
        "interval": interval,
        "delay": delay,
        "requests": 0,
        "matching": 0,
        "faults": 0,
        "lock": threading.Lock(),
        "slots": threading.BoundedSemaphore(MAX_CONNECTIONS),
    }
    deadline = time.monotonic() + lifetime

    def accept() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            if not plan["slots"].acquire(blocking=False):
                client.close()  # bounded: never more than MAX_CONNECTIONS threads at once
                continue
            args = (client, upstream, plan, stop)
            threading.Thread(target=_serve, args=args, daemon=True).start()
        stop.set()
        listener.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield plan
    finally:
        stop.set()
        thread.join(timeout=5)
