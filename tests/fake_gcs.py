"""A fake object store for ``gs://`` (and ``s3://``) paths, at the etils.epath backend level.

    from tests.fake_gcs import fake_gcs  # noqa: F401  (the fixture)

    def test_x(fake_gcs):
        fsio.write_text("gs://bucket/run/a.json", "{}")
        assert fake_gcs.read("gs://bucket/run/a.json") == b"{}"
        fake_gcs.local("gs://bucket/run/a.json")  # the local file holding that object

``FakeObjectStore`` replaces the backend ``etils.epath`` picks for ``gs://`` and
``s3://`` paths (``gpath._PREFIX_TO_BACKEND``; TensorFlow's gfile backend is
switched off for the test), so ``dipr1_jax.fsio`` and anything else going
through ``epath.Path`` run unmodified. Objects live as files under
``<tmp_path>/objects/<scheme>/<bucket>/<key>``. Object-store semantics:

* a write is one whole object, visible only when the writer is closed;
  append (``"a"``) and update (``"+"``) modes raise;
* there are no directories: ``makedirs`` / ``mkdir`` do nothing, a "directory"
  exists exactly while some object has it as a prefix, ``listdir`` lists by
  prefix (and raises FileNotFoundError for an empty one);
* renaming a single object is a copy then a delete (as gcsfs does); renaming or
  replacing a "directory" raises (there is no atomic prefix rename);
* every completed write is recorded in ``writes`` (URIs, in order), renames in
  ``renames``.

The fixture also runs the test from an empty working directory and fails it if
anything wrote a local ``gs:`` / ``s3:`` folder there (``open("gs://...")`` or
``os.makedirs("gs://...")`` bypassing the layer).

Limits: only what goes through ``etils.epath`` is faked. orbax writes array data
through tensorstore's own GCS driver (and tensorboardX's built-in ``gs`` writer
uses google-cloud-storage), which this fake does not see; an object and a
"directory" of the same name cannot coexist here (they can on GCS); there is no
consistency delay, generation precondition or permission model; ``glob`` /
``walk`` come from the local mirror.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import shutil
from typing import Iterator
from unittest import mock

import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from etils.epath import stat_utils


class _ObjectUpload(io.BytesIO):
    """A write handle: the bytes become the object when it is closed."""

    def __init__(self, store: "FakeObjectStore", uri: str, text: bool):
        super().__init__()
        self._store, self._uri, self._text = store, uri, text

    def write(self, data) -> int:  # type: ignore[override]
        if self._text:
            if not isinstance(data, str):
                raise TypeError(f"write() argument must be str, not {type(data).__name__}")
            data = data.encode("utf-8")
        return super().write(data)

    def close(self) -> None:
        if not self.closed:
            self._store._put(self._uri, self.getvalue())
        super().close()


class FakeObjectStore(epath_backend.Backend):
    """epath backend storing ``scheme://bucket/key`` objects under ``root`` (see module doc)."""

    def __init__(self, root: str):
        self.root = os.fspath(root)
        self.writes: list[str] = []
        self.renames: list[tuple[str, str]] = []

    # ---- mapping and inspection

    def local(self, uri: str) -> str:
        """The local file (or mirror folder) of ``uri``."""
        uri = os.fspath(uri)
        scheme, rest = uri.split("://", 1)
        rest = rest.strip("/")
        return os.path.join(self.root, scheme, *rest.split("/")) if rest else os.path.join(
            self.root, scheme)

    def _uri(self, local: str) -> str:
        rel = os.path.relpath(local, self.root).replace(os.sep, "/")
        scheme, _, rest = rel.partition("/")
        return f"{scheme}://{rest}"

    def read(self, uri: str) -> bytes:
        with open(self._object(uri), "rb") as f:
            return f.read()

    def objects(self, prefix: str = "") -> list[str]:
        """Every object URI (sorted), optionally under ``prefix``."""
        out = []
        for d, _, files in os.walk(self.root):
            out += [self._uri(os.path.join(d, f)) for f in files]
        return sorted(u for u in out if u.startswith(prefix))

    # ---- helpers

    def _object(self, uri) -> str:
        local = self.local(uri)
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{uri}: no such object")
        return local

    def _put(self, uri: str, data: bytes) -> None:
        local = self.local(uri)
        if os.path.isdir(local):
            raise IsADirectoryError(f"{uri}: objects exist under this name as a prefix "
                                    "(the fake cannot hold both)")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = local + ".__fake_upload__"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
        self.writes.append(os.fspath(uri))

    def _prune(self, local: str) -> None:
        """Removes mirror folders left empty (a prefix without objects does not exist)."""
        d = os.path.dirname(local)
        while d.startswith(self.root) and d != self.root and os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
            d = os.path.dirname(d)

    # ---- the epath Backend interface

    def open(self, path, mode: str):
        path = os.fspath(path)
        if "a" in mode or "+" in mode:
            raise OSError(f"{path}: mode {mode!r}: objects cannot be appended to or updated "
                          "in place; write the whole object")
        if "w" in mode or "x" in mode:
            if "x" in mode and self.exists(path):
                raise FileExistsError(path)
            return _ObjectUpload(self, path, text="b" not in mode)
        data = self.read(path)
        return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode("utf-8"))

    def exists(self, path) -> bool:
        local = self.local(path)
        return os.path.isfile(local) or self.isdir(path)

    def isdir(self, path) -> bool:
        local = self.local(path)
        return os.path.isdir(local) and any(files for _, _, files in os.walk(local))

    def listdir(self, path) -> list[str]:
        if not self.isdir(path):
            raise FileNotFoundError(f"{path}: no objects under this prefix")
        local = self.local(path)
        return [n for n in os.listdir(local)
                if os.path.isfile(os.path.join(local, n)) or self.isdir(f"{path.rstrip('/')}/{n}")]

    def glob(self, path) -> list[str]:
        path = os.fspath(path)
        scheme = path.split("://", 1)[0]
        return [u for u in self.objects(f"{scheme}://") if fnmatch.fnmatchcase(u, path)]

    def walk(self, top, *, top_down: bool = True, on_error=None) -> Iterator:
        for d, dirs, files in os.walk(self.local(top), topdown=top_down):
            yield self._uri(d), dirs, files

    def makedirs(self, path, *, exist_ok: bool = False, mode=None) -> None:
        del path, exist_ok, mode  # no directories in an object store

    def mkdir(self, path, *, exist_ok: bool = False, mode=None) -> None:
        del path, exist_ok, mode

    def rmtree(self, path) -> None:
        local = self.local(path)
        if os.path.isfile(local):
            return self.remove(path)
        if not self.isdir(path):
            raise FileNotFoundError(f"{path}: no objects under this prefix")
        shutil.rmtree(local)
        self._prune(local)

    def remove(self, path) -> None:
        local = self._object(path)
        os.remove(local)
        self._prune(local)

    def _move(self, path, dst, overwrite: bool) -> None:
        path, dst = os.fspath(path), os.fspath(dst)
        if self.isdir(path):
            raise OSError(f"cannot rename {path} -> {dst}: an object store has no directories "
                          "(renaming a prefix is not atomic)")
        if not overwrite and self.exists(dst):
            raise FileExistsError(f"{dst} already exists")
        self.copy(path, dst, overwrite=True)
        self.remove(path)
        self.renames.append((path, dst))

    def rename(self, path, dst) -> None:
        self._move(path, dst, overwrite=False)

    def replace(self, path, dst) -> None:
        if self.isdir(dst):
            raise IsADirectoryError(f"cannot overwrite {dst}: a prefix")
        self._move(path, dst, overwrite=True)

    def copy(self, path, dst, overwrite: bool) -> None:
        path, dst = os.fspath(path), os.fspath(dst)
        if not overwrite and self.exists(dst):
            raise FileExistsError(f"{dst} already exists")
        if "://" in path:
            data = self.read(path)
        else:
            with open(path, "rb") as f:
                data = f.read()
        if "://" in dst:
            self._put(dst, data)
        else:
            with open(dst, "wb") as f:
                f.write(data)

    def stat(self, path) -> stat_utils.StatResult:
        local = self.local(path)
        if os.path.isfile(local):
            st = os.stat(local)
            return stat_utils.StatResult(is_directory=False, length=st.st_size,
                                         mtime=int(st.st_mtime), owner=None, group=None,
                                         mode=None)
        if self.isdir(path):
            return stat_utils.StatResult(is_directory=True, length=0, mtime=0, owner=None,
                                         group=None, mode=None)
        raise FileNotFoundError(f"{path}: no such object")


@contextlib.contextmanager
def patch_object_store(root: str) -> Iterator[FakeObjectStore]:
    """Routes ``gs://`` and ``s3://`` epath paths to a ``FakeObjectStore`` under ``root``."""
    store = FakeObjectStore(root)
    table = dict(gpath._PREFIX_TO_BACKEND)  # pylint: disable=protected-access
    table.update(gs=store, s3=store)
    with mock.patch.object(gpath, "_PREFIX_TO_BACKEND", table), \
            mock.patch.object(gpath, "_is_tf_installed", lambda: False):
        yield store


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch) -> Iterator[FakeObjectStore]:
    """``gs://`` / ``s3://`` go to a fake object store in ``tmp_path`` (module doc)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with patch_object_store(str(tmp_path / "objects")) as store:
        yield store
    stray = [n for n in os.listdir(cwd) if n.rstrip(":") in ("gs", "s3")]
    assert not stray, f"something wrote the local folder(s) {stray} instead of the object store"
