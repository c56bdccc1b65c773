"""Object storage behind one root URI: ``file:///...`` (or a bare path) and ``s3://bucket/prefix``.

Built on ``pyarrow.fs`` so the same code reads and writes local disks, AWS S3 and any S3-compatible
server (endpoint override). Paths given to methods are relative to the root and use ``/``.
Nothing stored is ever unpickled: tables are Parquet, metadata JSON, weights safetensors.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


class PreconditionFailed(StorageError):
    """A compare-and-swap lost: the object changed since the caller read it."""


def _endpoint_from_env() -> Optional[str]:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def normalize_root(root: str) -> str:
    """A bare or relative path becomes an absolute ``file://`` URI; URIs lose a trailing slash."""
    if root.startswith("s3://"):
        return root.rstrip("/")
    if root.startswith("file://"):
        path = root[len("file://"):]
    elif "://" in root:
        raise StorageError(f"unsupported storage URI scheme: {root!r} (use file:// or s3://)")
    else:
        path = root
    return "file://" + os.path.abspath(os.path.expanduser(path or "."))


class Storage:
    """Files under one root URI.

    Args:
        root: ``file:///abs/dir``, a local path, or ``s3://bucket/prefix``.
        endpoint_url: S3-compatible endpoint (e.g. ``http://127.0.0.1:9000``); default from
            ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``.
        region: S3 region; default from the AWS chain.
    """

    def __init__(self, root: str, endpoint_url: Optional[str] = None, region: Optional[str] = None):
        self.root = normalize_root(root)
        self.endpoint_url = endpoint_url or (_endpoint_from_env() if self.is_s3 else None)
        self.region = region
        self._fs: Optional[pafs.FileSystem] = None
        self._client = None  # boto3 S3 client (thread-safe), made on first use

    @classmethod
    def from_config(cls, cfg: Any, root: Optional[str] = None) -> "Storage":
        """From a StorageConfig; ``root`` overrides the configured root (same credentials)."""
        return cls(root or cfg.root, endpoint_url=cfg.endpoint_url, region=cfg.region)

    def child(self, rel: str) -> "Storage":
        """A Storage rooted at ``rel`` below this root."""
        return Storage(self.uri(rel), endpoint_url=self.endpoint_url, region=self.region)

    # -- plumbing -------------------------------------------------------------------------
    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            if self.is_s3:
                kwargs = {"allow_bucket_creation": True}
                if self.endpoint_url:
                    kwargs["endpoint_override"] = self.endpoint_url
                    kwargs["scheme"] = "https" if self.endpoint_url.startswith("https") else "http"
                if self.region:
                    kwargs["region"] = self.region
                elif self.endpoint_url:
                    kwargs["region"] = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
                self._fs = pafs.S3FileSystem(**kwargs)
            else:
                self._fs = pafs.LocalFileSystem()
        return self._fs

    def __getstate__(self):  # filesystems are rebuilt in each process (Ray workers)
        state = dict(self.__dict__)
        state["_fs"] = None
        state["_client"] = None
        return state

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    @property
    def _base(self) -> str:
        return self.root[len("s3://"):] if self.is_s3 else self.root[len("file://"):]

    def path(self, rel: str = "") -> str:
        """Filesystem path (for ``self.fs``) of a path relative to the root."""
        rel = rel.strip("/")
        if rel.startswith("..") or "/../" in f"/{rel}/":
            raise StorageError(f"path escapes the storage root: {rel!r}")
        return posixpath.join(self._base, rel) if rel else self._base

    def uri(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def _wrap(self, what: str, rel: str, exc: Exception) -> StorageError:
        return StorageError(f"{what} {self.uri(rel)} failed: {exc}")

    # -- queries --------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def list_files(self, rel: str = "", suffixes: Optional[Sequence[str]] = None) -> List[str]:
        """Files below ``rel`` (recursive), relative to the root, sorted; hidden/temp files skipped."""
        base = self.path(rel)
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        out = []
        for fi in infos:
            if fi.type != pafs.FileType.File:
                continue
            name = posixpath.basename(fi.path)
            if name.startswith((".", "_")):
                continue
            if suffixes and not name.lower().endswith(tuple(suffixes)):
                continue
            out.append(_relative(fi.path, self._base))
        return sorted(out)

    def size(self, rel: str) -> int:
        return int(self.fs.get_file_info(self.path(rel)).size or 0)

    # -- bytes, JSON, Parquet -------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel), compression=None) as f:
                return f.read()
        except (OSError, pa.ArrowException) as exc:
            raise self._wrap("read", rel, exc) from exc

    def open_input(self, rel: str):
        """A random-access file (for Parquet) or stream; the caller closes it."""
        return self.fs.open_input_file(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        try:
            if not self.is_s3:
                self.fs.create_dir(posixpath.dirname(path), recursive=True)
            with self.fs.open_output_stream(path) as f:
                f.write(data)
        except (OSError, pa.ArrowException) as exc:
            raise self._wrap("write", rel, exc) from exc

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self.uri(rel)} is not valid JSON: {exc}") from exc

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def write_json_atomic(self, rel: str, obj: Any) -> None:
        """Write so that readers see the old or the new document, never a partial one."""
        self.write_bytes_atomic(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Durable, all-or-nothing write: when this returns the bytes are stored; readers never see
        a partial object.

        Local: write a temporary sibling, fsync, then rename over the target (atomic on POSIX).
        S3: a single PUT is atomic per object (readers get the old or new object).
        """
        if self.is_s3:  # one PutObject: one round trip, where a stream would do a multipart upload
            bucket, key = split_uri(self.uri(rel))
            try:
                self._s3_client().put_object(Bucket=bucket, Key=key, Body=data)
            except Exception as exc:  # botocore's connection and client errors alike
                raise self._wrap("atomic write", rel, exc) from exc
            return
        path = self.path(rel)
        tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise self._wrap("atomic write", rel, exc) from exc

    # -- compare-and-swap (the registry pointer) -------------------------------------------
    def read_versioned(self, rel: str) -> Tuple[Optional[bytes], Optional[str]]:
        """(content or None when absent, token) for ``compare_and_swap``: the S3 ETag, or the
        sha256 of a local file."""
        if self.is_s3:
            from botocore.exceptions import ClientError

            bucket, key = split_uri(self.uri(rel))
            try:
                obj = self._s3_client().get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None, None
                raise self._wrap("read", rel, exc) from exc
            return obj["Body"].read(), obj["ETag"]
        if not self.is_file(rel):
            return None, None
        data = self.read_bytes(rel)
        return data, hashlib.sha256(data).hexdigest()

    def compare_and_swap(self, rel: str, data: bytes, expected: Optional[str]) -> None:
        """Replace ``rel`` with ``data`` only if it is still at token ``expected`` (None: only if
        it does not exist); otherwise raise ``PreconditionFailed`` and change nothing.

        S3: a conditional PUT (If-Match on the ETag / If-None-Match: *), atomic on the server.
        Local: an exclusive ``flock`` on a sibling lock file around check + atomic rename (atomic
        between processes of one host; not across hosts on a network filesystem).
        """
        if self.is_s3:
            from botocore.exceptions import ClientError

            bucket, key = split_uri(self.uri(rel))
            cond = {"IfMatch": expected} if expected is not None else {"IfNoneMatch": "*"}
            try:
                self._s3_client().put_object(Bucket=bucket, Key=key, Body=data, **cond)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey"):
                    raise PreconditionFailed(f"{self.uri(rel)} changed since it was read ({code})") from None
                raise self._wrap("conditional write", rel, exc) from exc
            return
        path = self.path(rel)
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        lock = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.lock")
        with open(lock, "a+") as lf:
            fcntl.flock(lf, fcntl.LOCK_EX)
            try:
                _, current = self.read_versioned(rel)
                if current != expected:
                    raise PreconditionFailed(f"{self.uri(rel)} changed since it was read")
                self.write_bytes_atomic(rel, data)
            finally:
                fcntl.flock(lf, fcntl.LOCK_UN)

    def _s3_client(self):
        if self._client is None:
            self._client = self._new_s3_client()
        return self._client

    def _new_s3_client(self):
        import boto3
        from botocore.config import Config

        # Bounded: an unreachable endpoint fails in seconds (the caller answers 503 / retries)
        # instead of botocore's 60 s connect timeout times its legacy retries.
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            config=Config(connect_timeout=5, read_timeout=60,
                                          retries={"mode": "standard", "max_attempts": 3}))

    def read_parquet(self, rel: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """Read one Parquet file, or every Parquet file below a folder, as one table."""
        files = [rel] if self.is_file(rel) else self.list_files(rel, (".parquet",))
        if not files:
            raise StorageError(f"no Parquet files at {self.uri(rel)}")
        try:
            tables = [pq.read_table(self.path(f), filesystem=self.fs, columns=columns) for f in files]
        except (OSError, pa.ArrowException) as exc:
            raise self._wrap("read parquet", rel, exc) from exc
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

    def write_parquet(self, rel: str, table: pa.Table, **kwargs: Any) -> None:
        path = self.path(rel)
        try:
            if not self.is_s3:
                self.fs.create_dir(posixpath.dirname(path), recursive=True)
            pq.write_table(table, path, filesystem=self.fs, compression="zstd", **kwargs)
        except (OSError, pa.ArrowException) as exc:
            raise self._wrap("write parquet", rel, exc) from exc

    def delete(self, rel: str) -> None:
        """Delete a file or a folder tree; missing paths are fine."""
        path = self.path(rel)
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(path)

    # -- folders --------------------------------------------------------------------------
    def upload_dir(self, local_dir: str | os.PathLike, rel: str) -> List[str]:
        """Copy a local folder tree to ``rel``; returns the relative paths written."""
        local_dir = Path(local_dir)
        written = []
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                dest = posixpath.join(rel.strip("/"), p.relative_to(local_dir).as_posix())
                self.write_bytes(dest, p.read_bytes())
                written.append(dest)
        return written

    def download_dir(self, rel: str, local_dir: str | os.PathLike) -> List[Path]:
        """Copy every file below ``rel`` into ``local_dir``; returns the local paths."""
        local_dir = Path(local_dir)
        out = []
        prefix = rel.strip("/")
        for f in self.list_files(prefix):
            target = local_dir / _relative(f, prefix)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(f))
            out.append(target)
        return out


MODEL_CACHE_ENV = "LLMREC_MODEL_CACHE"


def is_storage_uri(name: Optional[str]) -> bool:
    """Whether a model name is a storage URI (fetched) rather than a local path or hub name."""
    return bool(name) and name.startswith(("s3://", "file://"))


def fetch_cached(uri: str, cache_root: Optional[str | os.PathLike] = None) -> Path:
    """A local copy of the folder at ``uri`` (``s3://`` or ``file://``), kept under
    ``$LLMREC_MODEL_CACHE`` (default ``~/.cache/llmrec/models``) and keyed by the URI and its
    listing (names and sizes), so a changed folder is fetched again and an unchanged one never.
    The copy is written beside and renamed into place: a killed fetch leaves no half folder."""
    import shutil
    import tempfile

    src = Storage(uri)
    files = sorted(src.list_files(""))
    if not files:
        raise StorageError(f"{uri}: no files to fetch (is the model uploaded there?)")
    key = hashlib.sha256(json.dumps([uri, [(f, src.size(f)) for f in files]]).encode()).hexdigest()[:20]
    root = Path(cache_root or os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "llmrec" / "models")
    dest = root / key
    if dest.is_dir():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        src.download_dir("", tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process put the same copy in place first
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def split_uri(uri: str) -> Tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    if not uri.startswith("s3://"):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def iter_json_lines(data: bytes) -> Iterable[Any]:
    for line in io.BytesIO(data):
        line = line.strip()
        if line:
            yield json.loads(line)


def _relative(path: str, base: str) -> str:
    """``path`` below ``base`` (both as the filesystem names them), by string: ``posixpath.relpath``
    would make both absolute against the working directory, which a job's runtime may remove."""
    base = base.rstrip("/")
    if not base:
        return path.lstrip("/")
    if path == base:
        return posixpath.basename(path)
    if not path.startswith(base + "/"):
        raise ValueError(f"{path} is not below {base}")
    return path[len(base) + 1:]
