"""The exported policy is a Hugging Face directory that transformers loads and generates from.

Acceptance: ``export_policy`` writes config.json + safetensors + the tokenizer files;
``transformers.AutoTokenizer`` and ``Qwen2_5_VLForConditionalGeneration`` load it, and
greedy decoding with transformers gives the same tokens (up to and including the stop
token) as our sampler, on a tiny model and a real prompt of the data pipeline.

The tiny model's random init (normal(0.02), unit norms, zero biases) is degenerate under
greedy decoding: the residual stream is dominated by the input embedding and, with tied
embeddings, every step re-emits its input token. Its weights are therefore overwritten
with a fixed numpy draw (larger matrices, non-trivial norms and biases; independent of
``create_model``'s RNG) that gives varied text and stops on ``<|im_end|>`` mid-budget.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dipr1_jax import sampler
from dipr1_jax.data import prompts
from dipr1_jax.data.pipeline import PipelineConfig, make_dataset
from dipr1_jax.data.records import decode_image
from dipr1_jax.data.synthetic import SceneConfig, SyntheticCrowds
from dipr1_jax.model import create_model, preset
from dipr1_jax.tokenizer import load_tokenizer
from dipr1_jax.train.policy import export_policy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

N_NEW = 24
SCENES = SceneConfig(width=112, height=84, difficulty="easy")
PIPE = PipelineConfig(batch_size=2, shuffle=False, num_epochs=1, prompt_style="short")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def _set_weights(model, tok, seed=0, matrix_std=0.4, eos_row_scale=3.0):
    """Overwrites every parameter with a fixed numpy draw (see the module docstring)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        init = var.get_metadata().get("init", "normal")
        if path == ("decoder", "embed_tokens"):  # tied: input embedding and LM head
            v = 0.02 * rng.standard_normal(shape)
            v[tok.im_end_token_id] *= eos_row_scale  # so that rows stop within the budget
        elif init == "normal":
            v = matrix_std * rng.standard_normal(shape)
        elif init == "ones":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # biases
            v = 0.1 * rng.standard_normal(shape)
        var.set_value(jnp.asarray(v, dtype))


def _torch_inputs(batch, tok):
    ids = batch["input_ids"].astype(np.int64)
    grid = batch["image_grid_thw"].astype(np.int64)
    n = int(grid.prod(-1).sum())  # rows past this are the pipeline's patch padding
    mask = batch["attention_mask"].astype(np.int64)
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                pixel_values=torch.tensor(batch["pixel_values"][:n]),
                image_grid_thw=torch.tensor(grid),
                mm_token_type_ids=torch.tensor((ids == tok.image_token_id).astype(np.int64)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tok = load_tokenizer(None)
    model = create_model(preset("tiny"), seed=1)
    _set_weights(model, tok)
    export = export_policy(model, tok, str(tmp_path_factory.mktemp("workdir") / "export"))
    records = SyntheticCrowds(2, SCENES)
    batch = next(iter(make_dataset(records, PIPE, tok)))
    assert batch["valid"].all()
    ours = sampler.generate(
        model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
        batch["image_grid_thw"], group_size=1, max_new_tokens=N_NEW, temperature=0.0,
        eos_token_ids=[tok.im_end_token_id], pad_token_id=tok.pad_token_id, tokenizer=tok,
        rng=jax.random.key(0))
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        export, dtype=torch.float32).eval()
    # Our sampler never emits the image / vision ids (default suppress list): same rule here.
    c = model.cfg
    suppress = [c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id]
    with torch.no_grad():
        gen = hf.generate(**_torch_inputs(batch, tok), do_sample=False, max_new_tokens=N_NEW,
                          eos_token_id=tok.im_end_token_id, pad_token_id=tok.pad_token_id,
                          suppress_tokens=suppress, output_logits=True,
                          return_dict_in_generate=True)
    T = batch["input_ids"].shape[1]
    theirs = gen.sequences[:, T:].numpy()
    logits = torch.stack(gen.logits, 1).float().numpy()  # raw logits [B, steps, V]
    return dict(tok=tok, model=model, export=export, records=records, batch=batch, ours=ours,
                hf_tok=hf_tok, hf=hf, theirs=theirs, logits=logits, suppress=suppress)


def test_export_directory_files_and_config_ids(run):
    tok, export = run["tok"], run["export"]
    files = set(os.listdir(export))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    with open(os.path.join(export, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg["model_type"] == "qwen2_5_vl"
    assert cfg["image_token_id"] == tok.image_token_id
    assert cfg["video_token_id"] == tok.video_token_id
    assert cfg["vision_start_token_id"] == tok.vision_start_token_id
    assert cfg["vision_end_token_id"] == tok.vision_end_token_id
    text = cfg["text_config"]
    assert text["eos_token_id"] == tok.eos_token_id == tok.im_end_token_id
    assert text["pad_token_id"] == tok.pad_token_id
    assert text["vocab_size"] >= tok.vocab_size
    # The tokenizer files are the shipped ones, byte for byte.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tok.source, name), "rb") as a, \
                open(os.path.join(export, name), "rb") as b:
            assert a.read() == b.read(), name
    # And our own loader reads the export back to the same ids.
    back = load_tokenizer(export)
    assert (back.eos_token_id, back.pad_token_id, back.image_token_id, back.vocab_size) == (
        tok.eos_token_id, tok.pad_token_id, tok.image_token_id, tok.vocab_size)


def test_autotokenizer_loads_export(run):
    tok, hf_tok, hf = run["tok"], run["hf_tok"], run["hf"]
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_token_id == tok.eos_token_id
    assert hf_tok.pad_token == "<|endoftext|>" and hf_tok.pad_token_id == tok.pad_token_id
    assert len(hf_tok) == tok.vocab_size
    for s in SPECIALS:  # same ids, and special (dropped by skip_special_tokens)
        i = tok.token_to_id(s)
        assert hf_tok.convert_tokens_to_ids(s) == i, s
        assert hf_tok.decode([i]) == s and hf_tok.decode([i], skip_special_tokens=True) == "", s
    # The loaded model's config and generation defaults agree with the tokenizer: a plain
    # hf.generate() stops on <|im_end|> and pads with <|endoftext|>.
    assert hf.config.image_token_id == hf_tok.convert_tokens_to_ids("<|image_pad|>")
    assert hf.config.vision_start_token_id == hf_tok.convert_tokens_to_ids("<|vision_start|>")
    assert hf.config.vision_end_token_id == hf_tok.convert_tokens_to_ids("<|vision_end|>")
    eos = hf.generation_config.eos_token_id
    assert (eos if isinstance(eos, list) else [eos]) == [tok.im_end_token_id]
    assert hf.generation_config.pad_token_id == tok.pad_token_id
    # The chat template renders the pipeline's prompt, and encodes to the batch's rows.
    msgs = prompts.build_messages(PIPE.task, PIPE.category, PIPE.prompt_style)
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == prompts.prompt_text(tok, PIPE.task, PIPE.category, PIPE.prompt_style)
    batch = run["batch"]
    rows = zip(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    for row, mask, grid in rows:
        n_img = int(np.prod(grid)) // 4
        expanded = text.replace("<|image_pad|>", "<|image_pad|>" * n_img)
        assert hf_tok.encode(expanded, add_special_tokens=False) == row[mask.astype(bool)].tolist()


def test_transformers_greedy_equals_our_sampler(run):
    tok, ours, theirs, logits = run["tok"], run["ours"], run["theirs"], run["logits"]
    eos = tok.im_end_token_id
    B = theirs.shape[0]
    assert ours.tokens.shape == (B, 1, N_NEW) and not ours.nonfinite.any()
    lengths = ours.lengths[:, 0]
    # Not degenerate: varied tokens, and the stop token is reached within the budget.
    for b in range(B):
        row = ours.tokens[b, 0, :lengths[b]].tolist()
        assert len(set(row)) >= min(4, lengths[b]), row
    assert len({tuple(r) for r in ours.tokens[:, 0].tolist()}) == B, "rows should differ"
    assert (lengths < N_NEW).any(), f"no row reached <|im_end|>: {ours.tokens[:, 0]}"
    # How close the greedy choices were (for the message if the tokens differ).
    masked = logits.copy()
    masked[..., run["suppress"]] = -np.inf
    top2 = np.sort(masked, -1)[..., -2:]
    margin = float(min((top2[b, :lengths[b], 1] - top2[b, :lengths[b], 0]).min()
                       for b in range(B)))
    for b in range(B):
        n = int(lengths[b])
        want = ours.tokens[b, 0, :n].tolist()
        got = theirs[b, :n].tolist()
        assert got == want, (f"row {b}: transformers {got} vs ours {want} "
                             f"(min top-2 logit margin {margin:.2e})")
        if n < N_NEW:  # stopped: the stop token last, padding after (transformers pads the same)
            assert want[-1] == eos and eos not in want[:-1]
            assert np.all(ours.tokens[b, 0, n:] == tok.pad_token_id)
            assert np.all(theirs[b, n:] == tok.pad_token_id)
        else:
            assert eos not in want
        # The sampler's log-probs at temperature 0 are log_softmax of the raw logits.
        hf_logp = torch.log_softmax(torch.tensor(logits[b, :n]), -1).numpy()
        np.testing.assert_allclose(ours.logprobs[b, 0, :n], hf_logp[np.arange(n), want],
                                   atol=2e-3, rtol=0)
    # All rows stopped: transformers ends early at the longest row.
    if (lengths < N_NEW).all():
        assert theirs.shape[1] == lengths.max()


def test_autotokenizer_decodes_like_ours(run):
    tok, hf_tok, ours, theirs = run["tok"], run["hf_tok"], run["ours"], run["theirs"]
    for b in range(theirs.shape[0]):
        n = int(ours.lengths[b, 0])
        for skip in (False, True):
            assert hf_tok.decode(theirs[b, :n].tolist(), skip_special_tokens=skip) == tok.decode(
                ours.tokens[b, 0, :n], skip_special_tokens=skip)
        # The sampler's texts: the completion without its stop token.
        body = theirs[b, :n - 1] if theirs[b, n - 1] == tok.im_end_token_id else theirs[b, :n]
        assert hf_tok.decode(body.tolist()) == ours.texts[b][0]
    assert hf_tok.batch_decode(theirs.tolist(), skip_special_tokens=True) == tok.batch_decode(
        ours.tokens[:, 0, :theirs.shape[1]], skip_special_tokens=True)


def test_export_has_image_processor_matching_pipeline(run):
    """transformers' AutoImageProcessor loads the export (preprocessor_config.json) and
    preprocesses the pipeline's images to the same patches and grids (AutoProcessor then
    works too where torchvision is installed, for its video processor)."""
    export, batch = run["export"], run["batch"]
    assert os.path.isfile(os.path.join(export, "preprocessor_config.json"))
    proc = transformers.AutoImageProcessor.from_pretrained(export)
    from PIL import Image
    images = [Image.fromarray(decode_image(run["records"][i])) for i in range(len(run["records"]))]
    out = proc(images=images, return_tensors="np")
    np.testing.assert_array_equal(out["image_grid_thw"], batch["image_grid_thw"])
    n = int(batch["image_grid_thw"].prod(-1).sum())
    np.testing.assert_allclose(out["pixel_values"], batch["pixel_values"][:n], atol=1e-5)
