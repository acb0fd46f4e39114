"""The restricted Qwen3 tokenizer segments task text exactly as the full Qwen3 tokenizer does."""

import pytest
from transformers import AutoTokenizer

from luspo_megatron.data.tokenizer import qwen3_tokenizer_dir
from luspo_megatron.data.vocab_subset import restrict_tokenizer

CORPUS = [
    "Compute 12 + 7 * 3. Step 1: 7 * 3 = 21. Step 2: 12 + 21 = 33. The answer is \\boxed{33}.",
    "What is (4 - 9) * 2?\nStep 1: 4 - 9 = -5.\nStep 2: -5 * 2 = -10.\n\\boxed{-10}",
]
CHATS = [[{"role": "user", "content": "Compute 1 + 2."}]]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    out = restrict_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "task", chats=CHATS)
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir()), AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("text", CORPUS + [
    "Compute 98 - 3 * 41. \\boxed{-25}",           # unseen numbers: digits are single tokens
    "An unseen word: zebra! é 🙂",                  # out of domain: still encodes, via byte symbols
])
def test_restricted_tokenizer_round_trips_and_matches_qwen3_segmentation_in_domain(tokenizers, text):
    full, small = tokenizers
    ids = small(text, add_special_tokens=False)["input_ids"]
    assert small.decode(ids) == text
    assert max(ids) < len(small)
    if "zebra" not in text:
        full_tokens = full.convert_ids_to_tokens(full(text, add_special_tokens=False)["input_ids"])
        assert small.convert_ids_to_tokens(ids) == full_tokens


def test_restricted_tokenizer_keeps_chat_template_and_special_tokens(tokenizers):
    full, small = tokenizers
    rendered = small.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    assert rendered == full.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert small.convert_ids_to_tokens(small.convert_tokens_to_ids(special)) == special
    assert small.eos_token == full.eos_token
    assert len(small) < 1000 < len(full)
