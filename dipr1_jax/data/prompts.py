"""Every prompt text of the project, in one place (Think-Look-Answer, DESIGN.md section 2).

``build_messages(task, category)`` returns the chat messages (system + user
with one image) for a detection or a counting question;
``prompt_text(tokenizer, ...)`` renders them with the tokenizer's chat
template (one ``<|vision_start|><|image_pad|><|vision_end|>`` for the image);
``encode_prompt`` tokenises that text and expands the single
``<|image_pad|>`` into the image's token count.
"""

from __future__ import annotations

import functools

import numpy as np

TASKS = ("detection", "counting")
TASK_IDS = {name: i for i, name in enumerate(TASKS)}

SYSTEM_PROMPT = (
    "You are a careful visual inspector of crowded scenes. Answer in three parts, in this order "
    "and with nothing outside them: first <think> your understanding of the whole scene </think>, "
    "then <look> a JSON list of the regions that are hard to judge (occluded, tiny or "
    'overlapping instances), each as {"bbox_2d": [x1, y1, x2, y2]}; an empty list [] if there '
    "are none </look>, then <answer> the answer </answer>. Boxes are absolute pixel coordinates "
    "of the image as you see it, with x1 < x2 and y1 < y2."
)

DETECTION_QUESTION = (
    "Locate every {category} in the image, including small, distant and partly hidden ones. "
    'In <answer> give a JSON list with one {{"bbox_2d": [x1, y1, x2, y2], "label": "{category}"}} '
    "entry per {category}."
)

COUNTING_QUESTION = (
    "How many {plural} are in the image? Count small, distant and partly hidden ones too. "
    "In <answer> give the count as a single integer."
)

# "short": the same Think-Look-Answer contract in few tokens, for small models trained
# from scratch (the built-in default job); released checkpoints use the full prompts.
SHORT_SYSTEM_PROMPT = "Reply <think>..</think> <look>hard boxes</look> <answer>..</answer>."
SHORT_QUESTIONS = {"detection": "Box every {category}.", "counting": "Count the {plural}."}
PROMPT_STYLES = ("full", "short")

PLURALS = {"person": "people", "pedestrian": "pedestrians", "car": "cars", "vehicle": "vehicles"}

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def question(task: str, category: str = "person", style: str = "full") -> str:
    if style == "short" and task in SHORT_QUESTIONS:
        return SHORT_QUESTIONS[task].format(category=category,
                                            plural=PLURALS.get(category, category + "s"))
    if task == "detection":
        return DETECTION_QUESTION.format(category=category)
    if task == "counting":
        return COUNTING_QUESTION.format(plural=PLURALS.get(category, category + "s"))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def build_messages(task: str = "detection", category: str = "person",
                   style: str = "full") -> list[dict]:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")
    system = SHORT_SYSTEM_PROMPT if style == "short" else SYSTEM_PROMPT
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "image"},
                                     {"type": "text", "text": question(task, category, style)}]},
    ]


def prompt_text(tokenizer, task: str = "detection", category: str = "person",
                style: str = "full") -> str:
    """The rendered chat prompt (with the generation prompt) for one image."""
    text = tokenizer.apply_chat_template(build_messages(task, category, style),
                                         add_generation_prompt=True)
    if text.count("<|image_pad|>") != 1:
        raise ValueError(f"chat template produced {text.count('<|image_pad|>')} image "
                         "placeholders, expected 1")
    return text


@functools.lru_cache(maxsize=64)
def _template_ids(tokenizer, task: str, category: str,
                  style: str = "full") -> tuple[tuple[int, ...], tuple[int, ...]]:
    ids = tokenizer.encode(prompt_text(tokenizer, task, category, style))
    pos = [i for i, t in enumerate(ids) if t == tokenizer.image_token_id]
    if len(pos) != 1:
        raise ValueError(f"prompt encodes to {len(pos)} image tokens (id "
                         f"{tokenizer.image_token_id}), expected 1")
    return tuple(ids[: pos[0]]), tuple(ids[pos[0] + 1:])


def encode_prompt(tokenizer, num_image_tokens: int, task: str = "detection",
                  category: str = "person", style: str = "full") -> np.ndarray:
    """Prompt ids (int32) with the image placeholder expanded to ``num_image_tokens``."""
    head, tail = _template_ids(tokenizer, task, category, style)
    return np.concatenate([
        np.asarray(head, np.int32),
        np.full((num_image_tokens,), tokenizer.image_token_id, np.int32),
        np.asarray(tail, np.int32),
    ])
