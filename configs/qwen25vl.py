"""Paper-style DIP-R1 runs: SFT and GRPO of Qwen2.5-VL-3B / -7B on CrowdHuman, evaluated
in-domain (CrowdHuman val) and out of domain (CityPersons val, WiderPedestrian val, UAVDT
test), each laid out for a Cloud TPU v4-32 slice or for 8 H100-80GB GPUs.

    python -m dipr1_jax.launch --config=configs/qwen25vl.py:<size>-<mode>-<target> [--config.x=v]

    size    3b | 7b          Qwen2.5-VL-3B-Instruct | Qwen2.5-VL-7B-Instruct
    mode    sft | grpo       SFT on ground-truth Think-Look-Answer targets | GRPO (DIP-R1)
    target  v4-32 | 8xh100   (TARGETS below)

e.g. ``--config=configs/qwen25vl.py:7b-grpo-v4-32``. ``VARIANTS`` lists all eight; the
memory plan of each on its target (``tools/print_config_plans.py``) is in BUILD_NOTES
("Configs for Qwen2.5-VL-3B / 7B").

Paths (placeholders, relative to the checkout): ``staged/data/<dataset>`` and
``staged/checkpoints/qwen2.5-vl-<size>``, where ``launch/run.sh --pull
gs://BUCKET/data/crowdhuman=staged/data/crowdhuman ...`` puts what ``launch/stage.sh``
copied to the bucket (launch/README.md). Elsewhere, put the data there or override
``--config.data.root``, ``--config.eval.ood`` and ``--config.model.checkpoint``:

    data.root           CrowdHuman in its official layout (annotation_{train,val}.odgt,
                        Images/); the readers need a local directory, not gs://
    eval.ood            CityPersons (gtBboxCityPersons/, leftImg8bit/), WiderPedestrian
                        (val_bbx_gt.txt, val/), UAVDT (UAV-benchmark-M/,
                        UAV-benchmark-MOTD_v1.0/GT/, M_attr/test/); UAVDT is vehicles, so
                        its prompts name "vehicle" (``uavdt@vehicle:...``)
    model.checkpoint    the Hugging Face directory of Qwen2.5-VL-<size>-Instruct
                        (config.json, *.safetensors, tokenizer.json, chat template)

``model.preset`` names the same architecture: the start-up memory plan reads the
checkpoint's config.json, ``tools/print_config_plans.py`` plans the preset.

Hyperparameters. DESIGN.md fixes the GRPO objective (beta 0.04, eps 0.2/0.2, token-mean
over the group, group-std advantages) and the rewards (weights 1, 1, 1, 0 for format,
look, accuracy, count); those are used as they are. The paper's learning rates, group
size, batch sizes, image size and completion budget are not recorded in DESIGN.md; the
values below are ours, chosen as stated next to each.
"""

from __future__ import annotations

from typing import NamedTuple

from dipr1_jax.config import (
    CheckpointSection, Config, ConfigError, DataSection, EvalSection, GRPOConfig, LogSection,
    MeshSection, ModelSection, OptimSection, RewardConfig, RolloutSection, SFTSection,
    TrainSection,
)

GiB = 1 << 30
DATA = "staged/data"
CHECKPOINTS = "staged/checkpoints"


class Target(NamedTuple):
    """The machine a variant is laid out for: its JAX device count and the memory of one
    device as the start-up plan sees it (``memory.device_memory``: the allocator's
    ``bytes_limit``)."""

    devices: int
    device_bytes: int
    what: str


TARGETS = {
    # v4-32: 16 chips on 4 hosts; each chip's 2 TensorCores run as one JAX device
    # (megacore), so JAX sees 16 devices with 32 GiB of HBM each.
    "v4-32": Target(16, 32 * GiB, "Cloud TPU v4-32: 16 devices (chips, megacore) x 32 GiB HBM"),
    # 8 x H100 80GB (79.1 GiB each as CUDA reports it). JAX preallocates 75% of a GPU
    # (XLA_PYTHON_CLIENT_MEM_FRACTION=.75, the default), which is the allocator's limit the
    # plan checks against; H200s (141 GB) run the same layouts with room to spare.
    "8xh100": Target(8, int(0.75 * 79.1 * GiB), "8 x NVIDIA H100 80GB, JAX's default 75% pool"),
}

# (size, mode, target) -> the layout: mesh (data, fsdp, tensor); GRPO's micro_batch_size
# (prompts per gradient micro-batch, global, whole groups of G=8). Chosen from the
# memory plan (BUILD_NOTES "Configs for Qwen2.5-VL-3B / 7B"), all at <= ~80% of a device:
# FSDP over the devices for the float32 parameters, AdamW state and gradients, and one
# prompt's group (8 completions) or 1-4 SFT examples per FSDP shard. Tensor parallelism
# (heads, MLP and vocab split) where one shard's activations and the scanned layers'
# residual weights would not fit otherwise: x2 for 3B GRPO and x4 for 7B on the TPU,
# x4 for 7B on the GPUs (inside one NVLink node).
LAYOUTS = {
    ("3b", "grpo", "v4-32"): dict(mesh=(1, 8, 2), micro=8),
    ("3b", "sft", "v4-32"): dict(mesh=(1, 16, 1)),
    ("7b", "grpo", "v4-32"): dict(mesh=(1, 4, 4), micro=4),
    ("7b", "sft", "v4-32"): dict(mesh=(1, 4, 4)),
    ("3b", "grpo", "8xh100"): dict(mesh=(1, 8, 1), micro=8),
    ("3b", "sft", "8xh100"): dict(mesh=(1, 8, 1)),
    ("7b", "grpo", "8xh100"): dict(mesh=(1, 2, 4), micro=2),
    ("7b", "sft", "8xh100"): dict(mesh=(1, 2, 4)),
}
VARIANTS = tuple(f"{s}-{m}-{t}" for (s, m, t) in LAYOUTS)

# One global batch and schedule per mode on both targets, so that a run on either
# machine optimises the same thing. GRPO: 32 prompts x G=8 completions per step, 500
# steps (16,000 prompts: about one pass over CrowdHuman train's 15,000 images). SFT: 16
# examples per step (SFT has no micro-batches: 16 keeps one to four 3.5k-token examples
# per FSDP shard), 1000 steps (about one pass).
GRPO_BATCH, GRPO_STEPS = 32, 500
SFT_BATCH, SFT_STEPS = 16, 1000

# Image size: at most 1280 visual tokens (28 x 28 pixels each, the Qwen2.5-VL processor's
# unit), i.e. 5120 vision patches: a CrowdHuman image keeps ~1.2 Mpx, and the prompt is
# ~1.5k tokens. vision_max_patches = that bound: one attention row per image.
MAX_PIXELS = 1280 * 28 * 28
VISION_PATCHES = MAX_PIXELS // (14 * 14)


def ood() -> str:
    """The three out-of-domain sets (``eval.ood``)."""
    return ",".join((f"citypersons:{DATA}/citypersons:val",
                     f"widerped:{DATA}/widerped:val",
                     f"uavdt@vehicle:{DATA}/uavdt:test"))


def get_config(arg: str | None = None) -> Config:
    parts = (arg or "").split("-", 2)
    key = tuple(parts) if len(parts) == 3 else None
    if key not in LAYOUTS:
        raise ConfigError(f"configs/qwen25vl.py needs a variant: --config=configs/qwen25vl.py:"
                          f"VARIANT with VARIANT one of {', '.join(VARIANTS)} (got {arg!r})")
    size, mode, target = key
    lay = LAYOUTS[key]
    data, fsdp, tensor = lay["mesh"]
    grpo = mode == "grpo"
    model = ModelSection(
        preset=f"qwen2.5-vl-{size}", checkpoint=f"{CHECKPOINTS}/qwen2.5-vl-{size}",
        # bfloat16 compute, float32 parameters and AdamW state: updates of lr 1e-6 x ~1
        # would vanish in bfloat16 weights (8 significant bits).
        dtype="bfloat16", param_dtype="float32",
        # Every decoder layer (inside nnx.scan) and vision block rematerialised: the
        # backward keeps a layer's input per layer plus one layer's residuals.
        remat="full", scan_layers=True, vision_max_patches=VISION_PATCHES,
        # Log-prob chunks of 128 positions: the float32 [rows, chunk, 152k] logits of one
        # chunk are ~0.6 GB per 8 rows.
        logprob_chunk=128)
    # GRPO completions of up to 1024 tokens: ~30 answer boxes in the JSON format the
    # prompt asks for (~30 tokens each) after <think> and <look> (CrowdHuman averages
    # ~23 people; denser images are cut). SFT targets are capped at 2048 tokens (the
    # same JSON boxes, ~65 people; sft.max_target_tokens skips longer ones). Evaluation
    # decodes up to 2048 tokens in both modes, so SFT and GRPO policies are measured alike.
    new_tokens = 1024 if grpo else 2048
    return Config(
        mode=mode,
        seed=0,
        model=model,
        data=DataSection(
            name="crowdhuman", root=f"{DATA}/crowdhuman", train_split="train",
            eval_split="val", task="detection", category="person", prompt_style="full",
            min_pixels=56 * 56, max_pixels=MAX_PIXELS),
        # Sampling at temperature 1 (the policy's own distribution: the GRPO ratio and
        # KL are taken at it), no truncation.
        rollout=RolloutSection(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0),
        # GRPO: lr 1e-6 (TRL's GRPO default, common for full fine-tuning of Qwen2.5-VL
        # with GRPO), 10 warmup steps, cosine to 10%, AdamW (0.9, 0.999), no weight
        # decay, global-norm clip 1.
        train=TrainSection(
            steps=GRPO_STEPS, batch_size=GRPO_BATCH, micro_batch_size=lay.get("micro", 0),
            # The vision tower is trained too (as planned in BUILD_NOTES). Freezing it
            # (--config.train.freeze_vision=true; works with model.remat since session 8)
            # saves the optimizer state, gradients and reference copy of its 0.67B
            # parameters.
            freeze_vision=False,
            optim=OptimSection(learning_rate=1e-6, warmup_steps=10, end_lr_ratio=0.1,
                               weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0)),
        # SFT: lr 1e-5 (a common full fine-tuning rate for Qwen2.5-VL), 20 warmup steps,
        # cosine to 10%; JSON targets (the format the full prompt asks for, the one GRPO
        # is rewarded on), the 2 hardest people in <look>.
        sft=SFTSection(
            steps=SFT_STEPS, batch_size=SFT_BATCH, target_style="json", max_look=2,
            # The planned target length: a CrowdHuman image with more people (~65+; up to
            # 3-9k tokens) does not train in SFT (logged; `long_targets` counts them).
            max_target_tokens=2048,
            freeze_vision=False,
            optim=OptimSection(learning_rate=1e-5, warmup_steps=20, end_lr_ratio=0.1,
                               weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0)),
        # DESIGN.md sections 3-4 as written (GRPOConfig's and RewardConfig's defaults):
        # G = 8 (ours; DESIGN.md's default), beta 0.04, eps 0.2/0.2, token-mean,
        # mu = 1; reward weights 1/1/1/0 (format, look, accuracy, count).
        grpo=GRPOConfig(group_size=8, beta=0.04, eps_low=0.2, eps_high=0.2,
                        scale_rewards="group", aggregation="token-mean", mu=1),
        rewards=RewardConfig(),
        # The whole held-out split and every OOD set, before and after training
        # (eval.every=0), greedy, 2048 tokens, 32 prompts per batch: 2 to 16 per FSDP
        # shard, whose prefill holds [images, heads, 5120, 5120] vision attention scores
        # and probabilities (<= ~13 GB per device, 7B on 8 GPUs; the plan does not count
        # them: BUILD_NOTES) next to a KV cache of <= 0.8 GiB, while the training
        # state is alive.
        eval=EvalSection(every=0, batch_size=32,
                         num_images=0, max_new_tokens=2048, num_draw=8, ood=ood()),
        log=LogSection(every=1, samples_every=10, num_samples=4, tensorboard=True,
                       memory_plan=True),
        # A GRPO step is minutes (256 completions of up to 1k tokens): checkpoint every
        # 20; an SFT step is seconds: every 50.
        checkpoint=CheckpointSection(every=20 if grpo else 50, keep=3),
        mesh=MeshSection(data=data, fsdp=fsdp, tensor=tensor,
                         devices=TARGETS[target].devices),
    )
