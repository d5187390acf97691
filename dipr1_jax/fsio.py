"""One small path layer for run directories that may be local or ``gs://`` (``s3://``).

Paths are plain ``str`` in and out. A local path (or ``file://...``) goes through
``os`` / ``shutil`` as before; a URI (``gs://bucket/key``) goes through
``etils.epath``, which uses ``tf.io.gfile`` when TensorFlow is installed and
fsspec (``gcsfs`` / ``s3fs``) otherwise. Without either a clear ``ImportError``
says what to install (``pip install gcsfs``, or the project's ``gcs`` extra).

Writes are whole and atomic: locally a temporary file in the same folder then
``os.replace``; remotely one object write (an object store replaces whole
objects atomically and has no append). Object stores have no directories:
``makedirs`` of a URI does nothing, ``isdir`` / ``listdir`` work by prefix.

    fsio.makedirs(out)
    fsio.write_text(fsio.join(out, "report.json"), text)
    with fsio.staged(fsio.join(out, "model.safetensors")) as tmp:  # a large file
        save_file(tensors, tmp)
    local = fsio.local_dir("gs://bucket/export")  # read-side: a local copy

``register_tensorboardx()`` makes tensorboardX write ``gs://`` / ``s3://`` event
files through this layer.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Iterator

from absl import logging

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# what epath handles, and what to install for it (fsspec backends)
_EPATH_SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_CACHE_ENV = "DIPR1_JAX_CACHE"
_MANIFEST = ".fsio_manifest.json"


class MissingBackendError(ImportError):
    """A ``gs://`` (``s3://`` ...) path was used and no filesystem package handles it."""


def scheme(path: str) -> str | None:
    """The URI scheme of ``path`` (``'gs'``), or None for a plain local path."""
    m = _SCHEME.match(os.fspath(path))
    return m.group(1).lower() if m else None


def is_remote(path: str) -> bool:
    """True for a URI such as ``gs://b/x`` or ``s3://b/x``; False for local paths and
    ``file://``."""
    return scheme(path) not in (None, "file")


def _local(path: str) -> str:
    path = os.fspath(path)
    return path[len("file://"):] if scheme(path) == "file" else path


def _epath(path: str):
    """``epath.Path(path)`` for a URI, checking that a backend for its scheme is installed."""
    from etils import epath
    from etils.epath import backend as epath_backend

    s = scheme(path)
    if s not in _EPATH_SCHEMES:
        raise ValueError(f"{path}: unsupported URI scheme {s}:// (supported: "
                         + ", ".join(f"{k}://" for k in _EPATH_SCHEMES) + ", local paths)")
    path = f"{s}://" + os.fspath(path).split("://", 1)[1]  # epath knows lower-case schemes
    p = epath.Path(path)
    backend = getattr(p, "_backend", None)  # which one epath picked (tf, fsspec, a test fake)
    if backend is epath_backend.fsspec_backend:
        try:
            backend.fs(path)
        except ImportError as e:
            pkg = _EPATH_SCHEMES[s]
            extra = " (or this project's extra: `pip install -e '.[gcs]'`)" if s == "gs" else ""
            raise MissingBackendError(
                f"{path}: no filesystem backend for {s}:// paths ({e}). "
                f"Install one: `pip install {pkg}`{extra}, or TensorFlow (tf.io.gfile).") from None
    return p


def join(*parts: str) -> str:
    """``os.path.join`` for local paths; ``/``-joined for URIs (``join('gs://b', 'x')``)."""
    parts = tuple(os.fspath(p) for p in parts)
    if parts and is_remote(parts[0]):
        out = parts[0]
        for p in parts[1:]:
            out = p if is_remote(p) else (out.rstrip("/") + "/" + p.lstrip("/") if p else out)
        return out
    return os.path.join(*parts)


def makedirs(path: str) -> None:
    """``mkdir -p`` locally; nothing for a URI (object stores have no directories)."""
    if is_remote(path):
        _epath(path)  # still fail early when no backend is installed
        return
    path = _local(path)
    if path:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(_local(path))


def isdir(path: str) -> bool:
    """A local directory, or a URI prefix that has objects under it."""
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(_local(path))


def isfile(path: str) -> bool:
    if is_remote(path):
        p = _epath(path)
        return p.exists() and not p.is_dir()
    return os.path.isfile(_local(path))


def listdir(path: str) -> list[str]:
    """Sorted names (not paths) of the entries of a directory / URI prefix."""
    if is_remote(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return sorted(os.listdir(_local(path)))


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        with _epath(path).open("rb") as f:
            return f.read()
    with open(_local(path), "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def _temp_name(path: str) -> str:
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def staged(path: str) -> Iterator[str]:
    """Yields a local file path to write; on success it becomes ``path`` whole.

    Local: a temporary name in the same folder, then ``os.replace`` (atomic, and the
    permissions an ordinary ``open`` would give). URI: a local temporary file (in
    ``tempfile.gettempdir()``, i.e. ``$TMPDIR``), uploaded as one object. On an
    exception the temporary file is removed and ``path`` is untouched. For large files
    (safetensors shards) written by a library that wants a file name."""
    if is_remote(path):
        _epath(path)
        fd, tmp = tempfile.mkstemp(prefix="dipr1_jax_", suffix=".tmp")
        os.close(fd)
        try:
            yield tmp
            copy(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    path = _local(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` as the whole content of ``path``, atomically (see module doc)."""
    if is_remote(path):
        with _epath(path).open("wb") as f:
            f.write(data)
        return
    path = _local(path)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as open()
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def copy(src: str, dst: str) -> None:
    """Copies the file ``src`` to ``dst`` (either side local or a URI), streaming; the
    destination is written atomically."""
    fin_cm = _epath(src).open("rb") if is_remote(src) else open(_local(src), "rb")
    with fin_cm as fin:
        if is_remote(dst):
            with _epath(dst).open("wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 22)
        else:
            with staged(dst) as tmp, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 22)


def remove(path: str) -> None:
    """Deletes one file / object (FileNotFoundError when absent)."""
    if is_remote(path):
        _epath(path).unlink()
    else:
        os.remove(_local(path))


def check_writable(path: str) -> None:
    """Creates the directory ``path`` and writes then deletes a small probe file in it;
    ``OSError`` naming ``path`` and the cause when that fails."""
    probe = join(path, f".write_probe.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        makedirs(path)
        write_bytes(probe, b"ok\n")
        remove(probe)
    except MissingBackendError:
        raise
    except Exception as e:  # noqa: BLE001 - backends raise all sorts (auth, HTTP, OSError)
        raise OSError(f"{path}: the run directory is not writable "
                      f"({type(e).__name__}: {e})") from e


def _cache_root(cache_dir: str | None) -> str:
    return (cache_dir or os.environ.get(_CACHE_ENV)
            or os.path.join(os.path.expanduser("~"), ".cache", "dipr1_jax"))


def local_dir(path: str, cache_dir: str | None = None) -> str:
    """A local directory with the files of ``path``: ``path`` itself when local; for a URI
    its top-level files (not sub-folders) copied to ``<cache>/remote/<scheme>/<bucket>/<key>``
    (``cache_dir``, else ``$DIPR1_JAX_CACHE``, else ``~/.cache/dipr1_jax``).

    A file whose remote size and modification time match the previous fetch is not
    copied again (a resumed run does not download the model twice); files gone from
    the remote directory are removed from the copy. Every fetch is logged."""
    if not is_remote(path):
        return _local(path)
    if not isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    s = scheme(path)
    rest = path.split("://", 1)[1].strip("/")
    dest = os.path.join(_cache_root(cache_dir), "remote", s, *rest.split("/"))
    os.makedirs(dest, exist_ok=True)
    mpath = os.path.join(dest, _MANIFEST)
    try:
        with open(mpath, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}
    new, fetched = {}, 0
    for name in listdir(path):
        src = join(path, name)
        st = _epath(src).stat()
        if st.is_directory:
            continue
        key = [int(st.length or 0), int(st.mtime or 0)]
        local = os.path.join(dest, name)
        fresh = (old.get(name) == key and key[1] != 0 and os.path.isfile(local)
                 and os.path.getsize(local) == key[0])
        if not fresh:
            logging.info("fetching %s (%.1f MB) -> %s", src, key[0] / 2 ** 20, local)
            copy(src, local)
            fetched += key[0]
        new[name] = key
    for name in os.listdir(dest):
        if name != _MANIFEST and name not in new and os.path.isfile(os.path.join(dest, name)):
            os.remove(os.path.join(dest, name))
    write_text(mpath, json.dumps(new, indent=1))
    if fetched:
        logging.info("%s: fetched %.1f MB into %s", path, fetched / 2 ** 20, dest)
    return dest


# ---------------------------------------------------------------- tensorboardX


class _ObjectRecordWriter:
    """tensorboardX record writer for an object store: the event bytes are kept in
    memory and every ``flush()`` / ``close()`` rewrites the whole object (objects
    cannot be appended to), so each flush costs the file's size in upload."""

    def __init__(self, path: str):
        self.path = path
        self._buf = io.BytesIO()
        self._dirty = True  # the object is created on the first flush, even if empty
        self.closed = False

    def write(self, data: bytes) -> None:
        self._buf.write(data)
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            write_bytes(self.path, self._buf.getvalue())
            self._dirty = False

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _ObjectWriterFactory:
    def open(self, path: str) -> _ObjectRecordWriter:
        _epath(path)  # a missing backend fails here, when the SummaryWriter opens
        return _ObjectRecordWriter(path)

    def directory_check(self, path: str) -> None:
        """Object stores need no directory."""


def register_tensorboardx() -> None:
    """Makes tensorboardX write ``gs://`` and ``s3://`` event files through this layer
    (its own writers need google-cloud-storage / boto3). Idempotent."""
    from tensorboardX import record_writer

    factory = _ObjectWriterFactory()
    for prefix in ("gs", "s3"):
        if not isinstance(record_writer.REGISTERED_FACTORIES.get(prefix), _ObjectWriterFactory):
            record_writer.register_writer_factory(prefix, factory)


__all__ = [
    "MissingBackendError", "scheme", "is_remote", "join", "makedirs", "exists", "isdir",
    "isfile", "listdir", "read_bytes", "read_text", "write_bytes", "write_text", "staged",
    "copy", "remove", "check_writable", "local_dir", "register_tensorboardx",
]
