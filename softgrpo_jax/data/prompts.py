"""Prompt construction: the model's chat template plus the seed's instruction suffix.

Styles (``build_prompt(..., style=...)``):

* ``"chat"``: exactly the seed (docs/algorithm.md, "Evaluation"): one user turn ``"{question} Let's think step by step and output
  the final answer within \\boxed{}."`` rendered with ``apply_chat_template(add_generation_prompt=True)``.  For
  DeepSeek-R1-Distill the template's generation prompt already ends with ``<think>\\n``, so the response starts
  inside the thinking block, as in the original.
* ``"think_tags"``: for models without think tokens in their template (SmolLM2, ChatML, Llama-3.2-Instruct): a system
  instruction asks for reasoning inside ``<think>...</think>`` before the boxed answer, the user turn is as above, and
  the assistant turn is pre-opened with ``<think>\\n`` so the response also starts inside the thinking block.
  (For templates without a system role the instruction is put in front of the user turn.)
* ``"raw"``: no chat template (base models): the instruction, the question with the suffix, then ``<think>\\n``.
* ``"auto"`` (default): ``chat`` when the template's generation prompt already opens ``<think>`` or the vocabulary has
  ``<think>``/``</think>`` tokens (a native thinking model); ``raw`` when there is no chat template; else
  ``think_tags``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_SYSTEM = ("You are a helpful assistant. First think about the problem step by step inside <think> and </think> "
                "tags, then give the final answer within \\boxed{}.")
STYLES = ("auto", "chat", "think_tags", "raw")


def user_message(question: str) -> str:
    return question.strip() + SUFFIX


def generation_prompt(tokenizer) -> str:
    """The text ``add_generation_prompt=True`` appends after the last user turn ("" without a chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    msgs = [{"role": "user", "content": "x"}]
    with_gen = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    return with_gen[len(without):] if with_gen.startswith(without) else with_gen[with_gen.rfind("x") + 1:]


def template_opens_think(tokenizer) -> bool:
    """True when the chat template's generation prompt already opens a ``<think>`` block (DeepSeek-R1-Distill)."""
    gp = generation_prompt(tokenizer)
    return THINK_OPEN in gp and THINK_CLOSE not in gp[gp.rfind(THINK_OPEN):]


def has_think_tokens(tokenizer) -> bool:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return THINK_OPEN in vocab and THINK_CLOSE in vocab


def resolve_style(tokenizer, style: str = "auto") -> str:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {STYLES}")
    if style != "auto":
        return style
    if not getattr(tokenizer, "chat_template", None):
        return "raw"
    if template_opens_think(tokenizer) or has_think_tokens(tokenizer):
        return "chat"
    return "think_tags"


def build_prompt(tokenizer, question: str, *, style: str = "auto") -> str:
    """The prompt text for one question (special tokens included by the template: tokenize it with
    ``add_special_tokens=False``).  See the module docstring for the styles."""
    style = resolve_style(tokenizer, style)
    user = user_message(question)
    if style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("style='chat' needs a tokenizer with a chat template; use style='raw'")
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    if style == "raw":
        bos = getattr(tokenizer, "bos_token", None) or ""
        return f"{bos}{THINK_SYSTEM}\n\n{user}\n{THINK_OPEN}\n"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": THINK_SYSTEM}, {"role": "user", "content": user}],
            tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates that reject a system role
        text = tokenizer.apply_chat_template([{"role": "user", "content": THINK_SYSTEM + "\n\n" + user}],
                                             tokenize=False, add_generation_prompt=True)
    if not text.rstrip().endswith(THINK_OPEN):
        text += THINK_OPEN + "\n"
    return text


def prompt_opens_think(prompt: str) -> bool:
    """Whether a prompt ends inside an open ``<think>`` block (the response then starts with thinking)."""
    i = prompt.rfind(THINK_OPEN)
    return i >= 0 and THINK_CLOSE not in prompt[i:]


def tokenize_and_filter(tokenizer, prompts: Sequence[str], *, max_length: int,
                        add_special_tokens: bool = False) -> tuple[list[list[int]], list[int], int]:
    """Tokenize ``prompts``; drop those longer than ``max_length`` tokens (verl ``filter_overlong_prompts``).

    Returns (token ids of the kept prompts, their indices in ``prompts``, number filtered)."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive (got {max_length})")
    kept, idx = [], []
    for i, p in enumerate(prompts):
        ids = tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
        if len(ids) <= max_length:
            kept.append(list(ids))
            idx.append(i)
    return kept, idx, len(prompts) - len(kept)


@dataclass
class PromptSet:
    examples: list  # kept examples, each the input dict plus "prompt" (text) and "prompt_ids" (list[int])
    num_filtered: int
    style: str
    filtered_ids: list = field(default_factory=list)  # ids of the examples dropped as too long


def prepare_prompts(tokenizer, examples: Sequence[dict], *, style: str = "auto",
                    max_prompt_length: int = 1024) -> PromptSet:
    """Prompt text + token ids for each example (``{"question", ...}``), filtering prompts over the limit."""
    resolved = resolve_style(tokenizer, style)
    texts = [build_prompt(tokenizer, ex["question"], style=resolved) for ex in examples]
    ids, idx, n_filtered = tokenize_and_filter(tokenizer, texts, max_length=max_prompt_length)
    kept = [dict(examples[i], prompt=texts[i], prompt_ids=t) for i, t in zip(idx, ids)]
    keep = set(idx)
    dropped = [examples[i].get("id", i) for i in range(len(examples)) if i not in keep]
    return PromptSet(kept, n_filtered, resolved, dropped)
