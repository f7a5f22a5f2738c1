"""All output I/O: fsspec filesystems, atomic and conditional writes, the per-shard commit protocol.

Layout under the output URI:
  _pipeline/attempts/<attempt>/<unit>/part-<k>.parquet   written while a unit is in flight
  _pipeline/commits/<unit>.json                          created once, conditionally: the commit
  samples/, data/, README.md, _manifest.json             published from the commits (publish.py)
A unit is committed iff its commit record exists; the record names the parts that make it up,
so parts of failed or concurrent attempts are never published.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

INTERNAL = "_pipeline"


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and path for a local path or URI; `s3://` honours AWS_ENDPOINT_URL."""
    options: dict[str, Any] = {}
    if uri.startswith("s3://"):
        # Throttling, 5xx and dropped connections are retried with backoff by botocore.
        options["config_kwargs"] = {"retries": {"max_attempts": 10, "mode": "adaptive"}}
        options["skip_instance_cache"] = True  # credentials are read now, not from a cached client
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class LeaseHeld(RuntimeError):
    """Another run is writing to this output."""


def _lease_stale(held: dict[str, Any], ttl_s: float) -> bool:
    if time.time() - float(held.get("heartbeat", 0)) > ttl_s:
        return True
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


@dataclass(frozen=True)
class Commit:
    unit: str
    attempt: str
    parts: list[str]
    rows: int
    accepted: int
    source: str


class Storage:
    """One output location. Every file the pipeline writes goes through here."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def url(self, rel: str = "") -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def check_writable(self) -> None:
        """Write and delete a probe, so a missing bucket or denied access stops the run before GPU work."""
        probe = f"{INTERNAL}/probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"")
            self.fs.rm(self.path(probe))
        except (OSError, PermissionError) as e:
            kind = "access denied" if isinstance(e, PermissionError) else type(e).__name__
            raise OSError(f"output {self.uri} is not writable ({kind}: {e})") from None

    # -- plain files --------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace a file atomically: readers see the old or the new content, never a mix."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)  # a single PUT is atomic on object stores

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create a file only if absent (If-None-Match: * / link(2)); False if it already existed."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except OSError:
            self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                raise
            # The precondition failed (FileExistsError on AWS, EINVAL on SeaweedFS). A retried PUT
            # whose first try succeeded but lost its response fails it too: our own bytes there
            # (commit and lease records name their attempt) mean we created it.
            return self.fs.cat_file(path) == data

    @contextlib.contextmanager
    def parquet_writer(self, rel: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """Stream a large Parquet file; it appears at `rel` only once complete, and not at all if
        the block raises (or the generator is dropped): locally a temp file is renamed into place,
        on object stores the upload is completed only on success and aborted otherwise."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                    yield writer
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        # Not `with fs.open(...)`: fsspec's __exit__ (and __del__) close the file, which completes
        # the upload, so an error would publish a valid-looking Parquet file of the rows so far.
        f = self.fs.open(path, "wb")
        writer = None
        try:
            writer = pq.ParquetWriter(f, schema, compression="zstd")
            yield writer
            writer.close()
        except BaseException:
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()  # into the buffer about to be dropped: no footer written later by __del__
            f.discard()  # aborts the multipart upload if one was started; small files were never sent
            f.closed = True  # and __del__ must not upload what is buffered
            raise
        f.close()  # the object appears: a single PUT, or the multipart upload completed

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_table(self, rel: str, table: pa.Table) -> None:
        self.write_bytes(rel, table_bytes(table))

    def read_table(self, rel: str) -> pa.Table:
        with self.fs.open(self.path(rel), "rb") as f:
            return pq.read_table(f)

    def list(self, rel: str) -> list[str]:
        """Relative paths of the files directly under a folder (empty if absent)."""
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(e[len(prefix):] if e.startswith(prefix) else e for e in entries)

    def remove(self, rel: str) -> None:
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # -- commit protocol ----------------------------------------------------------------------
    def part_path(self, attempt: str, unit: str, seq: int) -> str:
        return f"{INTERNAL}/attempts/{attempt}/{unit}/part-{seq:05d}.parquet"

    def commit(self, commit: Commit) -> bool:
        """Commit a unit exactly once; False if another attempt committed it first."""
        return self.create_exclusive(f"{INTERNAL}/commits/{commit.unit}.json", json.dumps(commit.__dict__).encode())

    def commits(self) -> dict[str, Commit]:
        out = {}
        for rel in self.list(f"{INTERNAL}/commits"):
            if rel.endswith(".json"):
                c = Commit(**self.read_json(rel))
                out[c.unit] = c
        return out

    def committed_tables(self, commit: Commit) -> Iterator[pa.Table]:
        for part in commit.parts:
            yield self.read_table(part)

    # -- run lease: one run per output at a time -------------------------------------------------
    LEASE = f"{INTERNAL}/lease.json"

    def acquire_lease(self, attempt: str, ttl_s: float) -> None:
        """Become the only run writing here, or raise LeaseHeld naming the holder.

        A lease is stale when its heartbeat is older than `ttl_s`, or when its holder was a process
        on this host that no longer exists (a driver killed with -9 and restarted at once)."""
        me = {"attempt": attempt, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        for _ in range(2):
            if self.create_exclusive(self.LEASE, json.dumps(me).encode()):
                return
            try:
                held = self.read_json(self.LEASE)
            except FileNotFoundError:
                continue
            if not _lease_stale(held, ttl_s):
                age = time.time() - held["heartbeat"]
                raise LeaseHeld(
                    f"another run (attempt {held['attempt']}, {held['host']} pid {held['pid']}) is writing {self.uri} "
                    f"(heartbeat {age:.0f}s ago); if it is dead, rerun after {ttl_s:.0f}s or delete {self.LEASE}"
                )
            self.remove(self.LEASE)
        raise LeaseHeld(f"could not take the lease on {self.uri}: another run took it first")

    def renew_lease(self, attempt: str) -> None:
        held = self.read_json(self.LEASE)
        if held.get("attempt") != attempt:
            raise LeaseHeld(f"lost the lease on {self.uri} to attempt {held.get('attempt')}")
        self.write_json(self.LEASE, {**held, "heartbeat": time.time()})

    def release_lease(self, attempt: str) -> None:
        try:
            if self.read_json(self.LEASE).get("attempt") == attempt:
                self.remove(self.LEASE)
        except FileNotFoundError:
            pass

    def clean_attempts(self, keep: set[str]) -> None:
        """Delete attempt folders no commit refers to (failed or losing attempts)."""
        for rel in self.list(f"{INTERNAL}/attempts"):
            if posixpath.basename(rel) not in keep:
                self.remove(rel)
