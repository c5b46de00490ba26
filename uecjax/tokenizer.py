"""Tokenizers and prompts: the checkpoint's own tokenizer and chat template, or, for the
embedded tasks (demo, countdown), a character-level tokenizer the run builds itself (a real
transformers `PreTrainedTokenizerFast`, so both paths share one API).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

# The common Geometry3K / math RL recipe (EasyR1's math prompt): think, then box the answer.
THINK_BOXED_INSTRUCTION = (
    " You FIRST think about the reasoning process as an internal monologue and then provide "
    "the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}.")

PROMPT_TEMPLATES = {
    "think_boxed": "{problem}" + THINK_BOXED_INSTRUCTION,
    "plain": "{problem}",
}

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAR_SPECIALS = ("<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used; the message says what is missing."""


def load_tokenizer(path: str):
    """The tokenizer saved beside a Hugging Face checkpoint (tokenizer.json / tokenizer_config)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: tokenizer directory not found")
    if not any(os.path.exists(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise TokenizerError(
            f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json); download the "
            "whole checkpoint repository, not only the weights")
    # A tokenizer saved from a bare PreTrainedTokenizerFast (the demo's char tokenizer) must be
    # read back as one: beside a Qwen2 config.json, AutoTokenizer would rebuild it as Qwen2's
    # byte-level BPE, which silently drops spaces and newlines.
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            tokenizer_class = json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        tokenizer_class = None
    if tokenizer_class in ("TokenizersBackend", "PreTrainedTokenizerFast") and \
            os.path.exists(os.path.join(path, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def char_tokenizer():
    """A character-level tokenizer over printable ASCII with ChatML specials (for the demo)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(CHAR_SPECIALS + tuple(chars))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                  eos_token="<|endoftext|>",
                                  additional_special_tokens=list(CHAR_SPECIALS[2:]))
    tok.chat_template = CHATML_TEMPLATE
    return tok


def render_prompt(tokenizer, problem: str, *, template: str = "think_boxed",
                  use_chat_template: bool = True) -> list[int]:
    """Token ids of the prompt for one problem: the template's text in the chat template."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template {template!r}: choose from {sorted(PROMPT_TEMPLATES)}")
    # str.replace, not str.format: the templates hold literal braces (\\boxed{}).
    text = PROMPT_TEMPLATES[template].replace("{problem}", problem.strip())
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(rendered, add_special_tokens=False)
    return tokenizer.encode(text, add_special_tokens=False)


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """End-of-turn and end-of-text ids: generation stops on any of them."""
    ids = []
    for token in ("<|im_end|>", "<|endoftext|>", tokenizer.eos_token):
        if token is None:
            continue
        i = tokenizer.convert_tokens_to_ids(token)
        if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id and i not in ids:
            ids.append(i)
    return tuple(ids)


def decode_responses(tokenizer, response_tokens: np.ndarray, response_mask: np.ndarray,
                     stop_ids: Sequence[int]) -> list[str]:
    """Text of each response: its generated tokens (response_mask) without the final stop
    token (decoding ends at the first stop, so only the last token can be one).

    Special tokens are kept (the demo's `<think>` / `</think>` are special tokens of its char
    tokenizer and the format reward needs them).
    """
    stop = set(int(i) for i in stop_ids)
    texts = []
    for tokens, mask in zip(np.asarray(response_tokens), np.asarray(response_mask)):
        ids = [int(t) for t, m in zip(tokens, mask) if m]
        if ids and ids[-1] in stop:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts
