"""Tiny Qwen3-MoE directories built in the test (nothing downloaded) and an independent log-prob
oracle: a plain transformers forward pass in float64 with the eager experts implementation."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

# No tokenizer is needed by the server tests, so a reduced vocabulary keeps the model tiny.
VOCAB = 512
EOS, PAD = 1, 0


def build_tiny_moe(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, eos_token_id=EOS, pad_token_id=PAD, max_position_embeddings=2048,
    )
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # a sharper distribution than the 0.02-std init: greedy paths differ per model
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> Path:
    return build_tiny_moe(tmp_path_factory.mktemp("tiny_moe_a"), seed=0)


@pytest.fixture(scope="session")
def tiny_moe_b(tmp_path_factory) -> Path:
    return build_tiny_moe(tmp_path_factory.mktemp("tiny_moe_b"), seed=1)


@lru_cache(maxsize=4)
def load_model(path: str, dtype: torch.dtype = torch.float64):
    # eager experts: grouped_mm has no float64 kernel, and a different code path from the server's.
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()


@torch.no_grad()
def forward_logp(path: Path, prompt: list[int], response: list[int], temperature: float = 1.0) -> list[float]:
    """log_softmax(logits / T)[token] of each response token, from one forward pass over the whole
    sequence (no cache, no padding, float64)."""
    model = load_model(str(path))
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(response)[:, None])[:, 0].tolist()


@torch.no_grad()
def greedy(path: Path, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation by repeated full forward passes (an oracle independent of generate())."""
    model = load_model(str(path))
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def hf_named_tensors(path: Path) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors under their on-disk (per-expert) names."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return sorted(tensors.items())


def pytest_configure(config) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# The shared server's body limit: small, so that the fuzz test's oversized body stays cheap to send.
SERVER_MAX_BODY_BYTES = 1 << 20


@pytest.fixture(scope="session")
def server(tiny_moe, tmp_path_factory):
    """Our SGLang-API server in a real subprocess, shared by the modules that leave its weights
    alone (start-up is the slow part). Started with --enable-fault-injection (tests only); tests
    that change its fault settings restore them."""
    from luspo_megatron.rollout.local.process import LocalServer

    log = tmp_path_factory.mktemp("server_log") / "server.log"
    with LocalServer(tiny_moe, log_path=log, max_running_requests=64, enable_fault_injection=True,
                     extra_args=("--max-body-bytes", str(SERVER_MAX_BODY_BYTES))) as running:
        yield running


def http(method: str, url: str, body=None, timeout: float = 30.0, *, raw: bytes | None = None,
         api_key: str | None = None, headers: dict[str, str] | None = None):
    """(status, parsed JSON or text) with the standard library: independent of the client under test.
    ``raw`` sends those bytes as the body instead of ``body`` as JSON."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **(headers or {})}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, raw, ctype = resp.status, resp.read().decode(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, raw, ctype = err.code, err.read().decode(), err.headers.get("Content-Type", "")
    return status, (json.loads(raw) if "json" in ctype and raw else raw)


@pytest.fixture
def sglang_router(tmp_path):
    """A factory for the real sglang-router (``tests/rollout/real_router.py``): ``sglang_router(urls)``
    starts one on free loopback ports listing ``urls``; every router started is stopped after the test."""
    from tests.rollout.real_router import SGLangRouter

    started = []

    def start(worker_urls=(), launch: bool = True, **kwargs):
        router = SGLangRouter(list(worker_urls), log_path=tmp_path / f"router_{len(started)}.log", **kwargs)
        started.append(router)
        return router.start() if launch else router  # not launched: its URL is known, nothing listens yet

    yield start
    for router in started:
        router.stop()
