"""All output I/O: filesystems, atomic and conditional writes, output ownership, the fenced lease.

The commit protocol (docs/guarantees.md has the user's view; each line names its test):

Layout under an output the pipeline owns:
  _pipeline/owner.json                  ownership marker, created exclusively before anything else
  _pipeline/lease/<epoch>.json|.beat    the lease log: one exclusively created record per holder
  _pipeline/configs/<fp>.json, head.json the configuration fingerprints and the current one
  _pipeline/commits/<fp>/<name>.parquet commits: complete prompts' samples, created exclusively
  _pipeline/versions/<seq>.json         published versions, created exclusively, in order
  data/<version>/, samples/<version>/   a version's files (immutable once its record exists)
  README.md, report.md, _manifest.json  pointers to the current version, each replaced atomically

Invariants:
1. Ownership. A run writes only into an empty location or one holding its marker of the same
   kind; it deletes only files a record of its own names (a version's file list, its own
   interrupted version's folder, its own superseded lease records).
2. One writer. The lease is a log of exclusively created records `<epoch>.json`; the holder of
   the highest epoch writes. Taking over creates epoch+1 with If-None-Match (S3) or link(2)
   (local), so of two takers exactly one wins; the epoch is the fencing token. Every commit,
   version claim, pointer write and cleanup first checks that no later epoch exists.
   A holder is stale when it released the lease, when it is a dead process on this very kernel
   (boot id, pid namespace, pid and start time all match), or when its heartbeat counter did
   not move for half of *its* TTL as measured by the taker's monotonic clock. Wall clocks only
   decide to refuse early (a fresh heartbeat), never to take over.
3. Commits by content. A commit is one Parquet file holding every sample of a set of complete
   prompts; its name is a hash of the prompt keys (id, prompt content hash, round) and it is
   created exclusively in one PUT, so it exists whole or not at all. A prompt is done when a
   commit holds it; publish takes each prompt from exactly one commit (the first by name).
4. Versions. Publish writes a version's files under fresh folders, claims the next version
   number exclusively, then replaces the pointers. Readers that follow the card or the manifest
   see one complete version; `data/` holds no file of its own, so a listing of
   `data/*.parquet` never mixes versions. Files of version k are deleted only after version
   k+2 is visible, so a reader that resolved the card just before a switch can still read.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import RunFailed

INTERNAL = "_pipeline"
OWNER = f"{INTERNAL}/owner.json"
TOOL = "distill-pipeline"
LAYOUT = 2
SINGLE_PUT_LIMIT = 5 * 2**30  # S3's largest single PUT: conditional creates must not become multipart uploads


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


def table_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class NotOwned(ValueError):
    """The output location holds files this pipeline did not write: nothing is touched."""


class LeaseHeld(RuntimeError):
    """Another run is writing to this output."""


class LeaseLost(LeaseHeld, RunFailed):
    """This run's lease was taken over: it may change nothing more (the run fails, exit 1)."""


class Storage:
    """One output location. Every file the pipeline writes goes through here."""

    def __init__(self, uri: str) -> None:
        if not uri or not uri.strip():
            raise NotOwned("the output location is empty; name a folder or s3:// prefix")
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.root = os.path.realpath(self.root)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def url(self, rel: str = "") -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def contains(self, fs: fsspec.AbstractFileSystem, path: str) -> bool:
        """Whether `path` on `fs` lies inside this output (symlinks resolved locally)."""
        if isinstance(fs, LocalFileSystem) != self.local:
            return False
        if self.local:
            path = os.path.realpath(path)
        root = self.root.rstrip("/")
        return path == root or path.startswith(root + "/")

    def check_writable(self) -> None:
        """Write and delete a probe, so a missing bucket or denied access stops the run before GPU work."""
        probe = f"{INTERNAL}/probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"")
            self.fs.rm(self.path(probe))
        except (OSError, PermissionError) as e:
            kind = "access denied" if isinstance(e, PermissionError) else type(e).__name__
            raise OSError(f"output {self.uri} is not writable ({kind}: {e})") from None

    # -- ownership ------------------------------------------------------------------------------
    def claim(self, kind: str) -> None:
        """Make sure this output is ours to write: empty (then mark it) or marked by us for `kind`.

        Raises NotOwned, touching nothing, for a location with other files or another kind."""
        marker = self._marker()
        if marker is None:
            foreign = self._first_file()
            if foreign is not None:
                raise NotOwned(
                    f"output {self.uri} already holds files this pipeline did not write (e.g. {foreign}); "
                    "choose an empty or new location")
            self.check_writable()
            mine = {"tool": TOOL, "kind": kind, "layout": LAYOUT, "created": time.time()}
            if self.create_exclusive(OWNER, json.dumps(mine).encode()):
                return
            marker = self._marker() or {}  # another run marked it at the same moment
        if marker.get("tool") != TOOL or marker.get("layout") != LAYOUT:
            raise NotOwned(f"output {self.uri} was written by {marker.get('tool')} layout {marker.get('layout')}, "
                           f"not this version's layout {LAYOUT}; choose a new location")
        if marker.get("kind") != kind:
            raise NotOwned(f"output {self.uri} holds a {marker.get('kind')} output, not a {kind}; choose another location")

    def _marker(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.read_bytes(OWNER))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _first_file(self) -> str | None:
        """Any file under the output (a pipeline layout of an older version counts as foreign)."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise OSError(f"output {self.uri} cannot be listed ({type(e).__name__}: {e})") from None
        return found[0] if found else None

    # -- plain files --------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace a file atomically: readers see the old or the new content, never a mix."""
        path = self.path(rel)
        if self.local:
            tmp = self._local_tmp(path, data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data, chunksize=SINGLE_PUT_LIMIT)  # a single PUT is atomic on object stores

    def _local_tmp(self, path: str, data: bytes) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{os.path.dirname(path)}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create a file only if absent (If-None-Match: * / link(2)); False if it already existed."""
        path = self.path(rel)
        if self.local:
            tmp = self._local_tmp(path, data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if len(data) >= SINGLE_PUT_LIMIT:
            raise ValueError(f"{rel}: {len(data)} bytes is more than one conditional PUT can carry")
        try:
            self.fs.pipe_file(path, data, mode="create", chunksize=SINGLE_PUT_LIMIT)
            return True
        except OSError:
            self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                raise
            # The precondition failed (FileExistsError on AWS, EINVAL on SeaweedFS). A retried PUT
            # whose first try succeeded but lost its response fails it too: our own bytes there
            # (every record names its attempt) mean we created it.
            return self.fs.cat_file(path) == data

    @contextlib.contextmanager
    def parquet_writer(self, rel: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """Stream a large Parquet file; it appears at `rel` only once complete, and not at all if
        the block raises (or the generator is dropped): locally a temp file is renamed into place,
        on object stores the upload is completed only on success and aborted otherwise."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{os.path.dirname(path)}/.tmp-{uuid.uuid4().hex}"
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

    def read_table(self, rel: str, columns: list[str] | None = None, present_only: bool = False) -> pa.Table:
        """A Parquet file (only `columns`; with `present_only`, those of them it has)."""
        with self.fs.open(self.path(rel), "rb") as f:
            if not present_only or columns is None:
                return pq.read_table(f, columns=columns)
            file = pq.ParquetFile(f)
            return file.read(columns=[c for c in columns if c in file.schema_arrow.names])

    def read_metadata(self, rel: str) -> dict[bytes, bytes]:
        """A Parquet file's key-value metadata (only the footer is read)."""
        with self.fs.open(self.path(rel), "rb") as f:
            return pq.ParquetFile(f).schema_arrow.metadata or {}

    def _entries(self, rel: str) -> list[tuple[str, bool]]:
        """(relative path, is a folder) of what lies directly under a folder (empty if absent)."""
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        # SeaweedFS lists an emptied folder as an object named with a trailing slash: a folder
        return [(e["name"].rstrip("/").removeprefix(prefix), e.get("type") == "directory" or e["name"].endswith("/"))
                for e in entries]

    def list(self, rel: str) -> list[str]:
        """Relative paths of the files directly under a folder (empty if absent)."""
        return sorted(name for name, folder in self._entries(rel)
                      if not folder and not posixpath.basename(name).startswith(".tmp-"))

    def folders(self, rel: str) -> list[str]:
        """Relative paths of the folders directly under a folder (empty if absent)."""
        return sorted(name for name, folder in self._entries(rel) if folder)

    def remove(self, rel: str) -> None:
        """Delete one file (never a folder: a run deletes only files its records name)."""
        path = self.path(rel)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def remove_folder(self, rel: str) -> None:
        """Delete a folder the caller created whole under a name of its own (a staging folder):
        everything below it is the caller's."""
        path = self.path(rel)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)


# -- the lease --------------------------------------------------------------------------------

def _holder_identity() -> dict[str, Any]:
    """Who holds a lease, precisely enough to tell a dead local process from a live one:
    hostnames repeat across containers, pids across pid namespaces and reboots."""
    ident: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    with contextlib.suppress(OSError):
        ident["boot_id"] = open("/proc/sys/kernel/random/boot_id").read().strip()
        ident["pidns"] = os.readlink("/proc/self/ns/pid")
        ident["start"] = _start_time(os.getpid())
    return ident


def _start_time(pid: int) -> str:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    stat = open(f"/proc/{pid}/stat").read()
    return stat.rsplit(")", 1)[1].split()[19]


def _same_kernel(holder: dict[str, Any]) -> bool:
    mine = _holder_identity()
    return bool(holder.get("boot_id")) and all(holder.get(k) == mine.get(k) for k in ("boot_id", "pidns"))


def _alive(holder: dict[str, Any]) -> bool:
    try:
        return _start_time(int(holder["pid"])) == holder.get("start")
    except (OSError, ValueError, KeyError, IndexError):
        return False


class Lease:
    """The fenced right to write one output; see invariant 2 in this module's docstring.

    `acquire` takes it or raises LeaseHeld; `check` raises LeaseLost once a later epoch exists;
    `hold` renews it from a background thread for the length of a block."""

    DIR = f"{INTERNAL}/lease"

    def __init__(self, storage: Storage, attempt: str, ttl_s: float) -> None:
        self.storage, self.attempt, self.ttl_s = storage, attempt, ttl_s
        self.epoch = 0
        self.beats = 0
        self.lost: str | None = None

    @staticmethod
    def _rec(epoch: int) -> str:
        return f"{Lease.DIR}/{epoch:010d}.json"

    @staticmethod
    def _beat(epoch: int) -> str:
        return f"{Lease.DIR}/{epoch:010d}.beat"

    def _epochs(self) -> list[int]:
        return sorted(int(posixpath.basename(p)[:-5]) for p in self.storage.list(self.DIR) if p.endswith(".json"))

    def _read_beat(self, epoch: int) -> dict[str, Any] | None:
        try:
            return self.storage.read_json(self._beat(epoch))
        except FileNotFoundError:
            return None

    def acquire(self, on_wait: Callable[[str], None] | None = None) -> None:
        """Take the lease, waiting only to confirm that a silent holder is really gone."""
        epochs = self._epochs()
        top = epochs[-1] if epochs else 0
        if top:
            self._check_stale(top, on_wait)
        me = {"attempt": self.attempt, "epoch": top + 1, "ttl_s": self.ttl_s, "holder": _holder_identity(),
              "created": time.time()}
        if not self.storage.create_exclusive(self._rec(top + 1), json.dumps(me).encode()):
            raise LeaseHeld(f"could not take the lease on {self.storage.uri}: another run took it at the same moment")
        self.epoch = top + 1
        self._write_beat(released=False)
        for old in epochs[:-1]:  # superseded records of our own log; the last one stays as history
            self.storage.remove(self._rec(old))
            self.storage.remove(self._beat(old))

    def _check_stale(self, epoch: int, on_wait: Callable[[str], None] | None) -> None:
        held = self.storage.read_json(self._rec(epoch))
        beat = self._read_beat(epoch)
        if beat and beat.get("released"):
            return
        holder, ttl = held.get("holder", {}), float(held.get("ttl_s", 600))  # the holder's TTL, not ours
        who = f"attempt {held.get('attempt')} on {holder.get('host')} pid {holder.get('pid')}"
        if _same_kernel(holder):
            if _alive(holder):
                raise LeaseHeld(f"another run ({who}) is writing {self.storage.uri}")
            return
        last_wall = float((beat or held).get("wall", held.get("created", 0)))
        age = time.time() - last_wall
        if age < ttl:
            raise LeaseHeld(f"another run ({who}) is writing {self.storage.uri} (heartbeat {age:.0f}s ago, "
                            f"TTL {ttl:.0f}s); if it is dead, rerun after the TTL")
        # Stale by our clock, which may be ahead of the holder's: confirm by watching its counter.
        seen = (beat or {}).get("seq")
        window = ttl / 2
        if on_wait:
            on_wait(f"the lease of {who} looks abandoned; watching its heartbeat for {window:.0f}s before taking over")
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            time.sleep(min(1.0, window / 20))
            now = self._read_beat(epoch)
            if (now or {}).get("seq") != seen:
                if now and now.get("released"):
                    return
                raise LeaseHeld(f"another run ({who}) is writing {self.storage.uri}: its heartbeat moved while "
                                "we watched (its clock is behind ours)")

    def _write_beat(self, released: bool) -> None:
        self.beats += 1
        self.storage.write_json(self._beat(self.epoch),
                                {"seq": self.beats, "wall": time.time(), "released": released, "attempt": self.attempt})

    def check(self) -> None:
        """The fence: raise LeaseLost if a later holder exists. Call before every change."""
        if self.lost:
            raise LeaseLost(self.lost)
        if self.storage.exists(self._rec(self.epoch + 1)):
            self.lost = (f"lost the lease on {self.storage.uri}: another run took it over (this run's heartbeat "
                         "stopped for longer than its TTL); nothing more is written by this run")
            raise LeaseLost(self.lost)

    def renew(self) -> None:
        self.check()
        self._write_beat(released=False)

    def release(self) -> None:
        with contextlib.suppress(LeaseLost, FileNotFoundError):
            self.check()
            self._write_beat(released=True)

    @contextlib.contextmanager
    def hold(self, warn: Callable[[str], None]) -> Iterator["Lease"]:
        """Renew every TTL/4 for the length of the block, then release."""
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(self.ttl_s / 4):
                try:
                    self.renew()
                except LeaseLost:
                    return
                except Exception as e:  # storage hiccup: the fence on the next change decides
                    warn(f"lease renewal failed: {e}")

        thread = threading.Thread(target=heartbeat, name="lease-heartbeat", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.release()


@dataclass(frozen=True)
class Fenced:
    """Storage bound to a held lease: every change first proves the lease is still held."""

    storage: Storage
    lease: Lease

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.lease.check()
        self.storage.write_bytes(rel, data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, default=str).encode())

    def write_table(self, rel: str, table: pa.Table) -> None:
        self.write_bytes(rel, table_bytes(table))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        self.lease.check()
        return self.storage.create_exclusive(rel, data)

    @contextlib.contextmanager
    def parquet_writer(self, rel: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        self.lease.check()
        with self.storage.parquet_writer(rel, schema) as writer:
            yield writer

    def remove(self, rel: str) -> None:
        self.lease.check()
        self.storage.remove(rel)


@contextlib.contextmanager
def writing(storage: Storage, kind: str, ttl_s: float, log: Any) -> Iterator[Fenced]:
    """The one way a run writes an output: claim it for `kind`, take the lease under a fresh
    attempt id (`fenced.lease.attempt`), renew it for the block, release it after."""
    storage.claim(kind)
    lease = Lease(storage, f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}", ttl_s)
    lease.acquire(on_wait=log.info)
    with lease.hold(log.warning):
        yield Fenced(storage, lease)
