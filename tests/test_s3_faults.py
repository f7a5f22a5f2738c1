"""S3 transient faults against the real server: a proxy on 127.0.0.1 answers some requests with
503 SlowDown and drops the connection after forwarding others (the write happened, the answer is
lost). Retries with backoff must hide both, and conditional commits must stay exactly-once."""

import http.client
import itertools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pyarrow as pa
import pytest

from pipeline.storage import Storage

pytestmark = pytest.mark.slow
SLOW_DOWN = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>'


def faulty_proxy(upstream: str):
    target = urlparse(upstream)
    counter = itertools.count(1)
    faults = {"503": 0, "dropped": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _handle(self):
            n = next(counter)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if n % 4 == 1:  # throttled before it reaches the server
                faults["503"] += 1
                self.send_response(503)
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            conn.request(self.command, self.path, body=body, headers=dict(self.headers))  # Host kept: the signature covers it
            resp = conn.getresponse()
            data = resp.read()
            if n % 4 == 3:  # the server did the work; the client never hears back
                faults["dropped"] += 1
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            # a HEAD answer carries the object's length, not the (empty) body's
            length = resp.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, faults


def test_transient_errors_are_retried_and_commits_stay_exactly_once(s3, bucket, monkeypatch):
    server, faults = faulty_proxy(s3["AWS_ENDPOINT_URL"])
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
        storage = Storage(f"s3://{bucket}/run")
        t = pa.table({"x": list(range(1000))})
        for i in range(4):
            storage.write_table(f"samples/part-{i}.parquet", t)
        assert [storage.read_table(f"samples/part-{i}.parquet").num_rows for i in range(4)] == [1000] * 4
        commit = "_pipeline/commits/fp/group-{}.parquet"
        won = [storage.create_exclusive(commit.format(i), b"attempt-a") for i in range(6)]
        lost = [storage.create_exclusive(commit.format(i), b"attempt-b") for i in range(6)]
        assert won == [True] * 6 and lost == [False] * 6
        assert {storage.read_bytes(commit.format(i)) for i in range(6)} == {b"attempt-a"}
        assert faults["503"] > 3 and faults["dropped"] > 3, faults
    finally:
        server.shutdown()
