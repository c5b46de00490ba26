"""Prompt rendering and tokenizer loading."""

from uecjax.tokenizer import (THINK_BOXED_INSTRUCTION, char_tokenizer, load_tokenizer,
                              render_prompt, stop_token_ids)
from tiny_hf import write_tiny_qwen2


def test_think_boxed_template_renders_in_the_chat_template():
    tok = char_tokenizer()
    ids = render_prompt(tok, "  What is 2 + 3? ", template="think_boxed")
    text = tok.decode(ids)
    assert text == ("<|im_start|>user\nWhat is 2 + 3?" + THINK_BOXED_INSTRUCTION +
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert "\\boxed{}" in text
    plain = tok.decode(render_prompt(tok, "2 + 3 = ?", template="plain", use_chat_template=False))
    assert plain == "2 + 3 = ?"


def test_char_tokenizer_round_trips_beside_a_qwen2_checkpoint(tmp_path):
    """Saved next to a Qwen2 config.json, the char tokenizer must come back as itself."""
    tok = char_tokenizer()
    write_tiny_qwen2(tmp_path, vocab_size=len(tok))
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    text = "<think>3 + 4 = 7\nok</think> \\boxed{7}<|im_end|>"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.decode(tok.encode(text, add_special_tokens=False)) == text
    assert stop_token_ids(loaded) == stop_token_ids(tok) == (3, 1)
    assert render_prompt(loaded, "1 + 1 = ?", template="plain") == render_prompt(tok, "1 + 1 = ?", template="plain")
