"""The in-process engine: the samples our server returns for the same seeded call, log-probs equal to a
float64 transformers forward pass, in-memory weight updates that match a model loaded from disk, and a
partial update refused before anything is copied."""

from __future__ import annotations

import pytest
import torch

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.engine import FINISH_LENGTH, FINISH_STOP, RolloutEngine, SamplingParams
from luspo_megatron.rollout.local.inprocess import InProcessEngine
from luspo_megatron.rollout.local.process import LocalServer
from luspo_megatron.rollout.sglang import SGLangEngine
from tests.rollout.conftest import EOS, forward_logp, hf_named_tensors

PROMPTS = [[5, 9, 17, 3], [44, 2], [100, 101, 102, 103, 104, 105]]


def test_inprocess_engine_samples_what_our_server_returns_for_the_same_seeded_call(tiny_moe):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, stop_token_ids=(7,), seed=123)
    engine = InProcessEngine(tiny_moe)
    assert isinstance(engine, RolloutEngine)
    ours = engine.generate(PROMPTS, sampling, n=3)
    with LocalServer(tiny_moe) as server, SGLangEngine([server.url]) as client:
        client.wait_healthy(60)
        served = client.generate(PROMPTS, sampling, n=3)
    finishes = set()
    for group_ours, group_served in zip(ours, served):
        assert len(group_ours) == 3
        for a, b in zip(group_ours, group_served):
            assert a.response_ids == b.response_ids and a.finish == b.finish and a.prompt_ids == b.prompt_ids
            # Same model, same seeds; the batches differ (the server batches rows as they arrive), which
            # moves the logits by float32 round-off only.
            assert a.rollout_logp == pytest.approx(b.rollout_logp, abs=1e-5)
            finishes.add(a.finish)
    assert len({tuple(s.response_ids) for s in ours[0]}) == 3  # the G samples of a prompt differ
    assert finishes <= {FINISH_STOP, FINISH_LENGTH}


def test_inprocess_rollout_logp_equals_a_float64_transformers_forward(tiny_moe):
    engine = InProcessEngine(tiny_moe)
    sampling = SamplingParams(temperature=0.7, max_new_tokens=12, seed=5)
    for prompt, group in zip(PROMPTS, engine.generate(PROMPTS, sampling, n=2)):
        for sample in group:
            expected = forward_logp(tiny_moe, prompt, sample.response_ids, temperature=0.7)
            assert sample.rollout_logp == pytest.approx(expected, abs=1e-5)
            if sample.finish == FINISH_STOP:
                assert sample.response_ids[-1] == EOS  # the stop token is kept, with its log-prob


def test_tensor_update_matches_the_model_loaded_from_disk_and_sets_the_version(tiny_moe, tiny_moe_b):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=77)
    updated = InProcessEngine(tiny_moe)
    before = updated.generate(PROMPTS, sampling, n=2)
    named = hf_named_tensors(tiny_moe_b)  # per-expert names, as the trainer's export sends them
    updated.update_weights_from_tensor([named[: len(named) // 2], named[len(named) // 2:]], "v7")
    assert updated.weight_version() == "v7"
    after = updated.generate(PROMPTS, sampling, n=2)
    reference = InProcessEngine(tiny_moe_b).generate(PROMPTS, sampling, n=2)
    assert [[s.response_ids for s in g] for g in after] == [[s.response_ids for s in g] for g in reference]
    assert [[s.response_ids for s in g] for g in after] != [[s.response_ids for s in g] for g in before]
    assert all(s.weight_version == "v7" for g in after for s in g)
    for g_after, g_ref in zip(after, reference):
        for a, b in zip(g_after, g_ref):
            assert a.rollout_logp == pytest.approx(b.rollout_logp, abs=1e-6)


def test_a_partial_or_misshapen_tensor_update_is_refused_and_changes_nothing(tiny_moe, tiny_moe_b):
    engine = InProcessEngine(tiny_moe)
    state = {k: v.clone() for k, v in engine.generator.model.state_dict().items()}
    named = hf_named_tensors(tiny_moe_b)
    with pytest.raises(RolloutError, match="not covered exactly"):
        engine.update_weights_from_tensor([named[:-1]], "v1")
    bad = [(n, t if i else torch.zeros(3, 3)) for i, (n, t) in enumerate(named)]
    with pytest.raises(RolloutError, match="shape"):
        engine.update_weights_from_tensor([bad], "v1")
    with pytest.raises(RolloutError, match="appears twice"):
        engine.update_weights_from_tensor([named, named[:1]], "v1")
    assert engine.weight_version() == "default"
    for key, value in engine.generator.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_disk_update_reloads_in_place(tiny_moe, tiny_moe_b):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    engine = InProcessEngine(tiny_moe)
    engine.update_weights_from_disk(tiny_moe_b, "3")
    expected = InProcessEngine(tiny_moe_b).generate(PROMPTS, sampling, n=1)
    got = engine.generate(PROMPTS, sampling, n=1)
    assert [g[0].response_ids for g in got] == [g[0].response_ids for g in expected]
    assert engine.weight_version() == "3"
    with pytest.raises(RolloutError, match="config.json"):
        engine.update_weights_from_disk(tiny_moe_b / "nowhere", "4")
