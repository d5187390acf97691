"""dipr1_jax.fsio: local atomic writes, gs:// through a fake object store, and the code
moved onto it (HF export, report, drawings, TensorBoard events) writing the same bytes
to a bucket as to a local folder."""

from __future__ import annotations

import importlib
import io
import os
import sys
import time

import numpy as np
import pytest
from etils import epath
from fake_gcs import fake_gcs  # noqa: F401  (fixture)

from dipr1_jax import fsio, report, viz

BUCKET = "gs://bucket/run"


def _tree(root: str) -> dict[str, bytes]:
    """{relative path: bytes} of every file under the local folder ``root``."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            full = os.path.join(d, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root).replace(os.sep, "/")] = fh.read()
    return out


def _objects(store, prefix: str) -> dict[str, bytes]:
    return {u[len(prefix) + 1:]: store.read(u) for u in store.objects(prefix + "/")}


# ------------------------------------------------------------------ paths


@pytest.mark.parametrize("path,remote", [
    ("gs://b/x", True), ("s3://b/x", True), ("GS://b/x", True), ("/tmp/x", False),
    ("runs/x", False), ("file:///tmp/x", False), ("C:/x", False), ("", False)])
def test_is_remote(path, remote):
    assert fsio.is_remote(path) is remote


def test_join():
    assert fsio.join("gs://b", "run", "x.json") == "gs://b/run/x.json"
    assert fsio.join("gs://b/run/", "/x.json") == "gs://b/run/x.json"
    assert fsio.join("runs", "a", "b") == os.path.join("runs", "a", "b")
    assert fsio.join("/tmp", "gs://b/x") == os.path.join("/tmp", "gs://b/x")  # local stays os.path


def test_unsupported_scheme_is_refused():
    with pytest.raises(ValueError, match="unsupported URI scheme http://"):
        fsio.exists("http://example.com/x")


# ------------------------------------------------------------------ local


def test_local_write_is_atomic_and_replaces(tmp_path):
    f = str(tmp_path / "a.json")
    fsio.write_text(f, "old content, longer than the new one")
    fsio.write_text(f, "new")
    assert open(f).read() == "new"
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary file left
    # the mode an ordinary open() gives (umask applied), not mkstemp's 0600
    with open(tmp_path / "ref", "w"):
        pass
    assert os.stat(f).st_mode == os.stat(tmp_path / "ref").st_mode
    fsio.write_bytes("file://" + f, b"\x00\x01")
    assert fsio.read_bytes(f) == b"\x00\x01"


def test_local_failed_write_keeps_old_content(tmp_path):
    f = str(tmp_path / "model.safetensors")
    fsio.write_bytes(f, b"good")
    with pytest.raises(RuntimeError, match="disk full"):
        with fsio.staged(f) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half")
            raise RuntimeError("disk full")
    assert fsio.read_bytes(f) == b"good"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_local_helpers(tmp_path):
    d = str(tmp_path / "a" / "b")
    fsio.makedirs(d)
    fsio.makedirs(d)  # exist_ok
    fsio.write_text(fsio.join(d, "y"), "1")
    fsio.copy(fsio.join(d, "y"), fsio.join(d, "x"))
    assert fsio.listdir(d) == ["x", "y"] and fsio.isfile(fsio.join(d, "x"))
    assert fsio.isdir(d) and not fsio.isdir(fsio.join(d, "x"))
    fsio.remove(fsio.join(d, "y"))
    assert not fsio.exists(fsio.join(d, "y"))
    assert fsio.local_dir(d) == d
    fsio.check_writable(str(tmp_path / "new"))
    assert os.listdir(tmp_path / "new") == []  # the probe is gone


def test_check_writable_names_the_directory(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=f"{tmp_path / 'file' / 'run'}: .*not writable"):
        fsio.check_writable(str(tmp_path / "file" / "run"))  # a file is in the way (also as root)


# ------------------------------------------------------------------ the fake bucket


def test_remote_writes_are_whole_objects(fake_gcs):
    uri = f"{BUCKET}/metrics.jsonl"
    fsio.makedirs(BUCKET)  # no directories: nothing is created
    assert fake_gcs.objects() == [] and not fsio.exists(BUCKET)
    fsio.write_text(uri, "a\n")
    fsio.write_text(uri, "a\nb\n")
    assert fake_gcs.read(uri) == b"a\nb\n" and fake_gcs.writes == [uri, uri]
    assert fsio.read_text("GS://bucket/run/metrics.jsonl") == "a\nb\n"  # scheme case
    assert fsio.read_text(uri) == "a\nb\n"
    assert fsio.isdir(BUCKET) and fsio.isfile(uri) and not fsio.isdir(uri)
    assert fsio.listdir("gs://bucket") == ["run"] and fsio.listdir(BUCKET) == ["metrics.jsonl"]
    with pytest.raises(OSError, match="cannot be appended"):
        epath.Path(uri).open("a")
    with pytest.raises(OSError, match="cannot be appended"):
        fake_gcs.open(uri, "r+b")  # (epath itself refuses "+" before the backend)
    with pytest.raises(OSError, match="no directories"):
        epath.Path(BUCKET).rename("gs://bucket/other")
    fsio.copy(uri, f"{BUCKET}/copy.jsonl")
    assert fake_gcs.read(f"{BUCKET}/copy.jsonl") == b"a\nb\n"
    fsio.remove(uri)
    fsio.remove(f"{BUCKET}/copy.jsonl")
    assert not fsio.exists(BUCKET)  # a prefix without objects does not exist


def test_remote_check_writable_and_copy_both_ways(fake_gcs, tmp_path):
    fsio.check_writable(BUCKET)
    assert fake_gcs.objects() == [] and len(fake_gcs.writes) == 1  # probe written, then deleted
    src = tmp_path / "big.bin"
    data = os.urandom(3 * 2 ** 20 + 17)
    src.write_bytes(data)
    fsio.copy(str(src), f"{BUCKET}/big.bin")
    fsio.copy(f"{BUCKET}/big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    with fsio.staged(f"{BUCKET}/staged.bin") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"xyz")
    assert fake_gcs.read(f"{BUCKET}/staged.bin") == b"xyz"
    with pytest.raises(RuntimeError):
        with fsio.staged(f"{BUCKET}/failed.bin") as tmp:
            raise RuntimeError
    assert not fsio.exists(f"{BUCKET}/failed.bin")


def test_missing_backend_message(monkeypatch):
    """gs:// with neither TensorFlow nor gcsfs: ImportError telling what to install."""
    from etils.epath import backend as epath_backend
    from etils.epath import gpath

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs -> ImportError
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    registry = importlib.import_module("fsspec.registry")  # (fsspec.registry is a mapping)
    for name in ("gs", "gcs"):
        monkeypatch.delitem(registry._registry, name, raising=False)
    epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    for call in (lambda: fsio.write_text("gs://bucket/x.json", "{}"),
                 lambda: fsio.exists("gs://bucket/x.json"),
                 lambda: fsio.check_writable("gs://bucket/run")):
        with pytest.raises(ImportError, match=r"pip install gcsfs.*'\.\[gcs\]'") as e:
            call()
        assert isinstance(e.value, fsio.MissingBackendError)
    epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()


# ------------------------------------------------------------------ TensorBoard


def _scalars(logdir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def _flushed(w, logdir: str, tag: str, n: int) -> list[tuple[int, float]]:
    """The scalars read back once ``n`` are there (tensorboardX queues events to a thread:
    ``flush`` writes what that thread has taken so far)."""
    deadline = time.monotonic() + 30
    while True:
        w.flush()
        got = _scalars(logdir, tag)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_tensorboardx_events_on_bucket(fake_gcs, monkeypatch):
    from tensorboardX import SummaryWriter, record_writer

    monkeypatch.setattr(record_writer, "REGISTERED_FACTORIES",
                        dict(record_writer.REGISTERED_FACTORIES))
    fsio.register_tensorboardx()
    fsio.register_tensorboardx()  # idempotent
    logdir = f"{BUCKET}/tb/grpo"
    w = SummaryWriter(logdir=logdir, flush_secs=3600)
    try:
        for step, v in enumerate((0.5, 0.25, 0.125)):
            w.add_scalar("grpo/reward", v, step)
        got = _flushed(w, fake_gcs.local(logdir), "grpo/reward", 3)
        assert got == [(0, 0.5), (1, 0.25), (2, 0.125)]
        (event_file,) = fake_gcs.objects(logdir + "/")
        assert os.path.basename(event_file).startswith("events.out.tfevents.")
        w.add_scalar("grpo/reward", 2.0, 3)
    finally:
        w.close()  # drains the queue
    assert fake_gcs.objects(logdir + "/") == [event_file]  # one object, rewritten whole
    assert fake_gcs.writes.count(event_file) >= 2
    assert _scalars(fake_gcs.local(logdir), "grpo/reward") == [
        (0, 0.5), (1, 0.25), (2, 0.125), (3, 2.0)]


# ------------------------------------------------------------------ export, report, drawings


@pytest.fixture(scope="module")
def tiny():
    from dipr1_jax.model import create_model, preset
    from dipr1_jax.tokenizer import load_tokenizer

    return create_model(preset("tiny"), seed=3), load_tokenizer(None)


def test_save_hf_sharded_same_bytes_on_bucket(tiny, fake_gcs, tmp_path):
    from dipr1_jax.model import read_hf_config, save_hf

    model, _ = tiny
    save_hf(model, str(tmp_path / "local"), max_shard_bytes=200_000)
    save_hf(model, f"{BUCKET}/hf", max_shard_bytes=200_000)
    local = _tree(str(tmp_path / "local"))
    assert "model.safetensors.index.json" in local and len(local) > 3
    assert _objects(fake_gcs, f"{BUCKET}/hf") == local
    assert read_hf_config(f"{BUCKET}/hf") == read_hf_config(str(tmp_path / "local"))


def test_export_to_bucket_same_files_and_loads_back(tiny, fake_gcs, tmp_path, monkeypatch):
    import jax
    from flax import nnx

    from dipr1_jax.model import load_hf
    from dipr1_jax.train.policy import export_policy, training_info

    model, tok = tiny
    export_policy(model, tok, str(tmp_path / "export"), prompt_style="short")
    export_policy(model, tok, f"{BUCKET}/export", prompt_style="short")
    local = _tree(str(tmp_path / "export"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "dipr1_jax_training.json"} <= set(local)
    assert _objects(fake_gcs, f"{BUCKET}/export") == local
    assert training_info(f"{BUCKET}/export") == {"prompt_style": "short"}

    # read side: a gs:// directory is copied to the local cache, once
    monkeypatch.setenv("DIPR1_JAX_CACHE", str(tmp_path / "cache"))
    back = load_hf(f"{BUCKET}/export")
    a = jax.tree.leaves(nnx.state(model, nnx.Param))
    b = jax.tree.leaves(nnx.state(back, nnx.Param))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    cached = fsio.local_dir(f"{BUCKET}/export")
    assert cached.startswith(str(tmp_path / "cache"))
    assert {k: v for k, v in _tree(cached).items() if not k.startswith(".")} == local
    inode = os.stat(os.path.join(cached, "model.safetensors")).st_ino
    assert fsio.local_dir(f"{BUCKET}/export") == cached
    assert os.stat(os.path.join(cached, "model.safetensors")).st_ino == inode  # not fetched again
    fsio.write_text(f"{BUCKET}/export/dipr1_jax_training.json", '{"prompt_style": "full"}')
    fsio.remove(f"{BUCKET}/export/preprocessor_config.json")
    os.utime(fake_gcs.local(f"{BUCKET}/export/dipr1_jax_training.json"), (1, 1))  # new mtime
    fsio.local_dir(f"{BUCKET}/export")
    with open(os.path.join(cached, "dipr1_jax_training.json")) as f:
        assert f.read() == '{"prompt_style": "full"}'
    assert not os.path.exists(os.path.join(cached, "preprocessor_config.json"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        fsio.local_dir(f"{BUCKET}/absent")


def _image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)


def test_viz_png_on_bucket(fake_gcs, tmp_path):
    from PIL import Image

    kw = dict(gt_boxes=np.array([[2.0, 3.0, 20.0, 30.0]]), pred_boxes=np.array([[4, 4, 30, 35.5]]))
    assert viz.save_png(f"{BUCKET}/report/a/x.png", _image(), **kw) == f"{BUCKET}/report/a/x.png"
    viz.save_png(str(tmp_path / "x.png"), _image(), **kw)
    data = fake_gcs.read(f"{BUCKET}/report/a/x.png")
    assert data == (tmp_path / "x.png").read_bytes()
    assert Image.open(io.BytesIO(data)).size == (56, 40 + viz.LEGEND_HEIGHT)
    assert fake_gcs.writes == [f"{BUCKET}/report/a/x.png"]


def test_report_on_bucket(fake_gcs, tmp_path):
    results = {"base": {"f1": 0.25, "precision": 0.5}, "grpo": {"f1": 0.5, "precision": 0.75}}
    ex = [report.ReportExample(name="img 1", image=_image(), model="grpo",
                               gt_boxes=np.array([[1.0, 1, 9, 9]]),
                               pred_boxes=np.array([[2.0, 2, 8, 8]]))]
    out = report.write_report(f"{BUCKET}/report", results, baseline="base", examples=ex)
    report.write_report(str(tmp_path / "report"), results, baseline="base", examples=ex)
    assert out["json"] == f"{BUCKET}/report/report.json"
    objs = _objects(fake_gcs, f"{BUCKET}/report")
    assert set(objs) == {"report.json", "report.md", "examples/img_1__grpo.png"}
    assert objs == _tree(str(tmp_path / "report"))
    assert report.read_report(f"{BUCKET}/report") == report.read_report(str(tmp_path / "report"))
