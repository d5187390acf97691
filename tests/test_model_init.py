"""Random init schemes of ``create_model``: transformers' normal(0.02) and fan-in scaling."""

import jax
import numpy as np
import pytest

from dipr1_jax.model import preset


def test_fan_in_init_scales_dense_kernels_by_their_inputs():
    from flax import nnx

    from dipr1_jax.model import create_model

    cfg = preset("small")
    stds = {}
    for scheme in ("hf", "fan_in"):
        model = create_model(cfg, seed=0, init=scheme)
        state = nnx.state(model, nnx.Param)
        stds[scheme] = {jax.tree_util.keystr(p): float(np.std(np.asarray(v)))
                        for p, v in jax.tree_util.tree_leaves_with_path(state)}
    t, v = cfg.text, cfg.vision
    fan = {"['visual']['patch_embed']['kernel']": v.patch_dim,
           "['decoder']['layers'][0]['self_attn']['o_proj']['kernel']": t.num_heads * t.head_dim,
           "['decoder']['layers'][0]['mlp']['down_proj']['kernel']": t.intermediate_size}
    for name, n in fan.items():
        key = next(k for k in stds["fan_in"] if k.startswith(name))
        assert abs(stds["fan_in"][key] - n ** -0.5) < 0.1 * n ** -0.5, key
        assert abs(stds["hf"][key] - 0.02) < 0.002, key
    emb = next(k for k in stds["fan_in"] if "embed_tokens" in k)
    assert abs(stds["fan_in"][emb] - 0.02) < 0.002  # embeddings are not Dense kernels
    with pytest.raises(ValueError, match="init"):
        create_model(cfg, init="xavier")
