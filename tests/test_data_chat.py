"""Assistant-only loss masks from a tokenizer's own chat template.

A character-level fast tokenizer with a ChatML template is built here, so every expected mask
can be written out; SmolLM2's own tokenizer is checked in the slow tier.
"""

import numpy as np
import pytest

from cpift_jax.data import chat
from cpift_jax.data.tokenizer import HFTokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A template that is not append-only: it shows only the last turn.
LAST_ONLY = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"


def char_tokenizer(template=CHATML):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = template
    return fast


def masked_runs(tokenizer, tokens, mask):
    """The supervised tokens as decoded contiguous runs."""
    runs, current = [], []
    for t, m in zip(tokens.tolist(), mask.tolist()):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


TWO_TURNS = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]


def test_single_turn_mask_is_exactly_the_reply_and_its_end_token():
    tok = char_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tokens, mask = chat.encode_chat(tok, messages, 32)
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    expected = tok(text, add_special_tokens=False)["input_ids"]
    assert len(expected) == 25
    np.testing.assert_array_equal(tokens[:25], expected)
    np.testing.assert_array_equal(tokens[25:], tok.pad_token_id)
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape == (32,)
    np.testing.assert_array_equal(np.flatnonzero(mask), [21, 22, 23])  # "y", "o", "<|im_end|>"


def test_every_assistant_turn_is_supervised_and_nothing_else():
    tok = char_tokenizer()
    tokens, mask = chat.encode_chat(tok, TWO_TURNS, 96)
    assert masked_runs(tok, tokens, mask) == ["yo<|im_end|>", "4<|im_end|>"]


def test_rows_stack_into_batching_arrays_and_long_rows_raise_or_truncate():
    tok = HFTokenizer(char_tokenizer())  # the project's adapter is accepted too
    short = TWO_TURNS[1:3]
    arrays = chat.encode_chats(tok, [TWO_TURNS, short], 96, names=["a", "b"])
    assert set(arrays) == {"tokens", "loss_mask"}
    assert arrays["tokens"].shape == arrays["loss_mask"].shape == (2, 96)
    assert arrays["tokens"].dtype == np.int32 and arrays["loss_mask"].dtype == bool
    with pytest.raises(ValueError, match=r"example 7 needs \d+ tokens but seq_len is 40"):
        chat.encode_chat(tok, TWO_TURNS, 40, name="example 7")
    tokens, mask = chat.encode_chat(tok, TWO_TURNS, 58, truncate=True)
    assert masked_runs(tok.hf, tokens, mask) == ["yo<|im_end|>"]
    with pytest.raises(ValueError, match="no assistant token within the first 20 tokens"):
        chat.encode_chat(tok, TWO_TURNS, 20, truncate=True)


def test_conversations_without_a_reply_or_with_bad_templates_raise():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="c1: no assistant turn"):
        chat.encode_chat(tok, TWO_TURNS[:2], 64, name="c1")
    with pytest.raises(ValueError, match="message 1 must be"):
        chat.encode_chat(tok, [TWO_TURNS[1], {"role": "bot", "content": "x"}], 64)
    with pytest.raises(ValueError, match="not render turn 2 as an extension"):
        chat.encode_chat(char_tokenizer(LAST_ONLY), TWO_TURNS, 64)


@pytest.mark.slow
def test_smollm2_tokenizer_masks_each_reply_with_im_end():
    from cpift_jax.models import smollm2

    if not smollm2.is_available():
        pytest.fail(f"SmolLM2 is not fetched; run `{smollm2.FETCH_COMMAND}` first", pytrace=False)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2.hf_dir())
    tokens, mask = chat.encode_chat(tok, TWO_TURNS, 128)
    assert masked_runs(tok, tokens, mask) == ["yo<|im_end|>", "4<|im_end|>"]
    rendered = tok.apply_chat_template(TWO_TURNS, tokenize=True)
    rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    np.testing.assert_array_equal(tokens[: len(rendered)], rendered)  # same ids as HF renders
