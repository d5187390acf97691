"""The model sharded on an 8-device CPU mesh (data=2, fsdp=2, tensor=2): parameters are
created in their shards, logits keep transformers parity, and gradients (with layer scan
and remat) equal the unsharded ones. Also the logical-axis rules and bf16 compute."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import model_testutil as U
from dipr1_jax import sharding as S
from dipr1_jax.model import create_model, load_hf, preset
from dipr1_jax.model.hf_io import hf_tensors


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py must provide 8 CPU devices"
    return S.make_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = U.hf_model(U.hf_config("qwen2_5_vl", tie=False, window=56, fullatt=(1,)), seed=21)
    return hf, U.save_checkpoint(hf, str(tmp_path_factory.mktemp("shard")))


@pytest.fixture(scope="module")
def batch():
    return U.build_batch([(1, 8, 12), (1, 6, 4)], [[3, 5], [2, 4]], padding="left", seed=1)


def test_sharded_forward_matches_transformers(mesh, ckpt, batch):
    hf, path = ckpt
    model = load_hf(path, mesh=mesh)
    q = model.decoder.layers[0].self_attn.q_proj.kernel[...]  # [64, 4 heads, 16]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert {s.data.shape for s in q.addressable_shards} == {(32, 2, 16)}
    emb = model.decoder.embed_tokens[...]
    assert emb.sharding.spec == P("tensor", "fsdp")
    ids, mask, pix, grid = batch
    ids_s = S.shard_host_array(ids, mesh, ("batch", "seq"))
    assert ids_s.sharding.spec == P("data", None)  # 2 rows: fsdp does not divide, dropped
    with jax.set_mesh(mesh):
        out = U.jax_outputs(model, ids_s, S.shard_host_array(mask, mesh, ("batch", "seq")),
                            pix, grid)[0]
    ref = U.hf_forward(hf, ids, mask, pix, grid)
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= 1e-4
    plain = U.jax_outputs(load_hf(path), ids, mask, pix, grid)[0]
    assert np.abs(out - plain)[valid].max() <= 1e-4
    last = valid.shape[1] - 1  # left padding: the last slot is real in every row
    assert (out[:, last].argmax(-1) == ref[:, last].argmax(-1)).all()


def _loss(model, ids, mask, pix, grid):
    logits = model(ids, mask, pix, grid)
    w = jnp.sin(jnp.arange(logits.size, dtype=jnp.float32).reshape(logits.shape))
    return jnp.sum(logits * w * mask[..., None])


def _value_and_grad(model, *args):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f = lambda p, r, *a: _loss(nnx.merge(graphdef, p, r), *a)
    return U._jit(jax.value_and_grad(f))(params, rest, *[jnp.asarray(a) for a in args])


def test_sharded_scan_remat_gradients_match_unsharded(mesh, ckpt, batch):
    _, path = ckpt
    base = load_hf(path)
    l0, g0 = _value_and_grad(base, *batch)
    model = load_hf(path, mesh=mesh, scan_layers=True, remat="full")
    stacked = model.decoder.layers.mlp.gate_proj.kernel[...]
    assert stacked.shape == (2, 64, 128) and stacked.sharding.spec == P(None, "fsdp", "tensor")
    with jax.set_mesh(mesh):
        l1, g1 = _value_and_grad(model, *batch)
    assert abs(float(l1) - float(l0)) <= 1e-5 * abs(float(l0))
    a, b = dict(hf_tensors(base.cfg, g0)), dict(hf_tensors(model.cfg, g1))
    assert a.keys() == b.keys()
    scale = max(np.abs(x).max() for x in a.values())
    assert scale > 0
    worst = max(np.abs(a[k] - b[k]).max() for k in a)
    assert worst <= 1e-5 * scale, worst


def test_create_model_is_sharded_at_init(mesh):
    cfg = preset("tiny")
    model = create_model(cfg, seed=0, mesh=mesh)
    state = nnx.state(model, nnx.Param)
    specs = S.state_specs(state, mesh)
    got = jax.tree.map(lambda v: v.sharding.spec, state)
    assert jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, P)) == \
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    gate = model.decoder.layers[1].mlp.gate_proj.kernel[...]
    assert gate.sharding.spec == P("fsdp", "tensor")
    assert not gate.is_fully_replicated


def test_logical_rules_drop_axes_that_do_not_divide():
    mesh = S.make_mesh(data=1, fsdp=2, tensor=4)
    # 2 KV heads cannot be split 4 ways: replicated; 16 query heads can.
    assert S.logical_to_spec(("embed", "kv_heads", "head_dim"), (2048, 2, 128), mesh) == \
        P("fsdp", None, None)
    assert S.logical_to_spec(("embed", "heads", "head_dim"), (2048, 16, 128), mesh) == \
        P("fsdp", "tensor", None)
    # the batch uses data*fsdp when both divide, else the dividing prefix
    assert S.logical_to_spec(("batch", "seq"), (8, 100), mesh) == P(("data", "fsdp"), None)
    assert S.logical_to_spec(("batch", "seq"), (3, 100), mesh) == P("data", None)
    # a mesh axis is used once per array
    assert S.logical_to_spec(("mlp", "vocab"), (64, 64), mesh) == P("tensor", None)


def test_make_mesh_validates_sizes():
    assert S.make_mesh(2, -1, 2).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="devices are available"):
        S.make_mesh(2, 2, 4)
    with pytest.raises(ValueError, match="at most one axis size may be -1"):
        S.make_mesh(-1, -1, 2)


def test_bf16_compute_with_float32_params(ckpt, batch):
    hf, path = ckpt
    model = load_hf(path, param_dtype="float32", dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    ids, mask, pix, grid = batch
    out = U.jax_outputs(model, ids, mask, pix, grid)[0]
    ref = U.hf_forward(hf, ids, mask, pix, grid)
    valid = mask.astype(bool)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    err = np.abs(out - ref)[valid].max()
    assert 1e-4 < err <= 0.05 * np.abs(ref).max()  # bf16 really used, and still close
