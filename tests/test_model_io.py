"""load_hf / save_hf: sharded checkpoints, transformers round trips, clear errors."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jax
import jax.numpy as jnp
from flax import nnx

import model_testutil as U
from dipr1_jax.model import CheckpointError, load_hf, save_hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Untied Qwen2.5-VL saved by transformers as several shards with an index file."""
    hf = U.hf_model(U.hf_config("qwen2_5_vl", tie=False), seed=11)
    path = str(tmp_path_factory.mktemp("sharded"))
    U.save_checkpoint(hf, path, max_shard_size="100KB")
    return hf, path


@pytest.fixture(scope="module")
def batch():
    return U.build_batch([(1, 8, 12), (1, 6, 4)], [[3, 5], [2, 4]], padding="left", seed=1)


def _hf_load(path):
    return transformers.AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32).eval()


def test_sharded_checkpoint_loads_with_parity(ckpt, batch):
    hf, path = ckpt
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert len(files) > 1 and os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model = load_hf(path)
    ids, mask, pix, grid = batch
    out = U.jax_outputs(model, ids, mask, pix, grid)[0]
    ref = U.hf_forward(hf, ids, mask, pix, grid)
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-4


@pytest.mark.parametrize("kind,tie", [("qwen2_5_vl", False), ("qwen2_vl", True)])
def test_save_hf_round_trip(kind, tie, batch, tmp_path):
    hf = U.hf_model(U.hf_config(kind, tie=tie), seed=12)
    U.save_checkpoint(hf, str(tmp_path / "src"))
    model = load_hf(str(tmp_path / "src"))
    save_hf(model, str(tmp_path / "out"))
    back = _hf_load(str(tmp_path / "out"))
    ids, mask, pix, grid = batch
    ref = U.hf_forward(hf, ids, mask, pix, grid)
    out = U.hf_forward(back, ids, mask, pix, grid)
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-5
    assert back.config.tie_word_embeddings == tie
    assert ("lm_head.weight" in load_file(str(tmp_path / "out" / "model.safetensors"))) == (not tie)


def test_save_hf_writes_changed_weights_sharded(ckpt, batch, tmp_path):
    """Weights changed in JAX (as after training) come back in transformers with the JAX
    logits: every layout is inverted correctly, also through a sharded index."""
    _, path = ckpt
    model = load_hf(path)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    save_hf(model, str(tmp_path), max_shard_bytes=200_000)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    back = _hf_load(str(tmp_path))
    ids, mask, pix, grid = batch
    ours = U.jax_outputs(model, ids, mask, pix, grid)[0]
    theirs = U.hf_forward(back, ids, mask, pix, grid)
    assert np.abs(ours - theirs)[mask.astype(bool)].max() <= 1e-4
    again = load_hf(str(tmp_path))  # and our own loader reads our export
    for a, b in zip(jax.tree.leaves(nnx.state(again, nnx.Param)), leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_v5_module_names_are_accepted(batch, tmp_path):
    """Checkpoints written with the transformers-5 in-memory names load too."""
    hf = U.hf_model(U.hf_config("qwen2_5_vl", tie=True), seed=13)
    U.save_checkpoint(hf, str(tmp_path))
    f = str(tmp_path / "model.safetensors")
    tensors = load_file(f)
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else
                "model." + k): v for k, v in tensors.items()}
    save_file(renamed, f, metadata={"format": "pt"})
    model = load_hf(str(tmp_path))
    ids, mask, pix, grid = batch
    out = U.jax_outputs(model, ids, mask, pix, grid)[0]
    ref = U.hf_forward(hf, ids, mask, pix, grid)
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-4


def test_expect_preset_is_checked(ckpt):
    from dipr1_jax.config import ConfigError
    _, path = ckpt
    with pytest.raises(ConfigError, match=r"differs from preset 'tiny': .*tie_word_embeddings"):
        load_hf(path, expect_preset="tiny")


def test_bf16_params_load(ckpt):
    _, path = ckpt
    model = load_hf(path, param_dtype="bfloat16")
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert model.cfg.param_dtype == "bfloat16" and model.cfg.dtype == "bfloat16"  # follows


def test_load_hf_dtype_names_match_model_config(ckpt):
    """``dtype`` is the compute dtype and ``param_dtype`` the parameters', as in ModelConfig."""
    _, path = ckpt
    model = load_hf(path, dtype="bfloat16")
    assert (model.cfg.dtype, model.cfg.param_dtype) == ("bfloat16", "float32")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    with pytest.raises(TypeError, match="dtype_compute= was renamed"):
        load_hf(path, dtype_compute="bfloat16")
    with pytest.raises(TypeError):
        load_hf(path, "bfloat16")  # keyword-only: an old positional dtype cannot be misread


@pytest.fixture()
def single(tmp_path):
    hf = U.hf_model(U.hf_config("qwen2_5_vl", tie=True), seed=14)
    U.save_checkpoint(hf, str(tmp_path))
    f = str(tmp_path / "model.safetensors")
    return str(tmp_path), f, load_file(f)


def test_missing_tensor_is_named(single):
    path, f, tensors = single
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError,
                       match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight "
                             r"\(128, 64\)"):
        load_hf(path)


def test_extra_tensor_is_named(single):
    path, f, tensors = single
    tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((3, 4), np.float32)
    save_file(tensors, f)
    with pytest.raises(CheckpointError,
                       match=r"unexpected tensors \(1\): model\.layers\.2\.mlp\.up_proj\.weight "
                             r"\(3, 4\)"):
        load_hf(path)


def test_shape_mismatch_names_both_shapes(single):
    path, f, tensors = single
    tensors["visual.blocks.0.attn.qkv.weight"] = np.zeros((90, 32), np.float32)
    save_file(tensors, f)
    with pytest.raises(CheckpointError,
                       match=r"visual\.blocks\.0\.attn\.qkv\.weight: checkpoint shape \(90, 32\), "
                             r"config expects \(96, 32\)"):
        load_hf(path)


def test_missing_files_are_reported(single, tmp_path_factory):
    path, f, _ = single
    os.remove(f)
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load_hf(path)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}, fh)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is in model-00001-of-00002"):
        load_hf(path)
    empty = str(tmp_path_factory.mktemp("empty"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(empty)
