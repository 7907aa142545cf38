"""A real S3-compatible server for the tests: `moto_server` (moto[server]) as a child process on
127.0.0.1, plus a TCP relay in front of it that can be cut and restored to take the endpoint down
mid-run. (Stopping moto itself would lose its buckets, which live in its memory; the relay makes the
server unreachable exactly as a crashed or partitioned server is, while the data survives.) The relay
can also stall: connections stay open and requests get no answer, as behind a hung load balancer, and
it counts the requests that pass through it (bench/storage.py reports them)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import typing
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto_server on a free port; `env` adds variables (e.g. INITIAL_NO_AUTH_ACTION_COUNT=0 makes it
    check credentials, so every key is wrong)."""

    def __init__(self, *, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env={**os.environ, **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start on {self.url} (exit {self.proc.poll()})") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# the request line of an HTTP/1.x request: at the start of what a client sends, or after the blank line
# that ends the previous request's headers (bodies of the S3 API calls here are image bytes and XML)
REQUEST_LINE = re.compile(rb"(?:^|\r\n)(?:GET|PUT|POST|HEAD|DELETE) /\S* HTTP/1\.[01]\r\n")


class Relay:
    """TCP relay 127.0.0.1:port -> target port. cut() closes the listener and every open connection
    (clients get 'connection refused'); stall() keeps accepting connections and requests but forwards
    nothing, in either direction (clients wait for an answer that never comes); restore() undoes both.
    `requests` counts the HTTP requests clients sent through it (request lines split across two reads
    are missed: the count is a lower bound, exact in practice since clients write headers whole)."""

    requests = 0

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._trip: tuple[re.Pattern, int, typing.Callable[[], None]] | None = None
        self._stalled = threading.Event()
        self.restore()

    def cut_at(self, pattern: bytes, *, after: int) -> None:
        """Cut when a request matching the regex `pattern` arrives after `after` such requests went
        through (e.g. the 3rd completed upload to a staging prefix): a failure at a known point of a run."""
        self._trip = (re.compile(pattern), after, self.cut)

    def stall_at(self, pattern: bytes, *, after: int) -> None:
        """As cut_at, but stall (that request and every later one) instead of cutting."""
        self._trip = (re.compile(pattern), after, self.stall)

    def stall(self) -> None:
        self._stalled.set()

    def restore(self) -> None:
        if self._stalled.is_set():
            # the stalled connections have swallowed bytes: close them, so that clients reconnect cleanly
            self._stalled.clear()
            self._close_connections()
        if getattr(self, "_listener", None) is not None and self._listener.fileno() != -1:
            return                                           # listening already
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        self._listener.close()
        self._close_connections()

    def _close_connections(self) -> None:
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:                                  # cut(): the listener is closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _tripped(self, data: bytes) -> typing.Callable[[], None] | None:
        """The action to take when `data` trips the armed request, else None."""
        with self._lock:
            if self._trip is None or not self._trip[0].search(data):
                return None
            pattern, left, action = self._trip
            self._trip = (pattern, left - 1, action) if left else None
            return None if left else action

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if from_client:
                    n = len(REQUEST_LINE.findall(data))
                    with self._lock:
                        self.requests += n
                if from_client and (action := self._tripped(data)) is not None:
                    action()
                    if action == self.cut:
                        return
                if not self._stalled.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            # the first direction to end closes both sockets (the other one's recv then ends too), so a
            # long run does not accumulate descriptors
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self._lock:
                self._conns = [c for c in self._conns if c not in (src, dst)]


def serve_names(buckets: list[str], names_per_bucket: int, *, template: str) -> None:
    """Run moto's server in this process, on a free port, with `buckets` each holding the 0-byte objects
    template.format(i=0) .. template.format(i=names_per_bucket - 1); print its URL on one line, then
    serve until killed. The objects are put into moto's own store directly (a PUT each over HTTP goes at
    ~20 objects/s); every listing still goes through the S3 API over HTTP. Each list request scans every
    key of its bucket in moto, so a large listing is spread over many buckets."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import FakeKey, s3_backends
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for bucket_name in buckets:
        bucket = backend.create_bucket(bucket_name, "us-east-1")
        for i in range(names_per_bucket):
            key = template.format(i=i)
            bucket.keys[key] = FakeKey(key, b"", account_id=DEFAULT_ACCOUNT_ID, region_name="us-east-1",
                                       bucket_name=bucket_name)
    print(f"http://127.0.0.1:{port}", flush=True)
    threading.Event().wait()
