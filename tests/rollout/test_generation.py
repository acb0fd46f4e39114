"""The server's batched sampler, in process: log-probs, sampling law, stops, routing, weight loading."""

from __future__ import annotations

import math

import pytest
import torch

from luspo_megatron.rollout.local.generation import GenRow, TransformersGenerator
from tests.rollout.conftest import VOCAB, forward_logp, hf_named_tensors, load_model


@pytest.fixture(scope="module")
def generator(tiny_moe):
    return TransformersGenerator(tiny_moe)


def test_rollout_logp_matches_a_transformers_forward_pass_within_1e5(generator, tiny_moe):
    # Mixed prompt lengths (left padding), temperatures and truncations in one batch.
    rows = [
        GenRow([5, 6, 7, 8, 9, 10, 11], 24, seed=1, temperature=1.0),
        GenRow([12, 13], 24, seed=2, temperature=0.7, top_p=0.9),
        GenRow([14, 15, 16], 24, seed=3, temperature=1.3, top_k=20),
        GenRow([17], 24, seed=4, temperature=0.5, top_p=0.8, top_k=50),
    ]
    results = generator.generate(rows)
    worst = 0.0
    for row, result in zip(rows, results):
        assert len(result.tokens) == 24 and result.finish == "length"
        reference = forward_logp(tiny_moe, row.prompt_ids, result.tokens, row.temperature)
        worst = max(worst, max(abs(a - b) for a, b in zip(result.logp, reference)))
    assert worst < 1e-5


def test_a_seeded_row_samples_the_same_tokens_alone_or_in_any_batch(generator):
    row = dict(prompt_ids=[30, 31, 32], max_new_tokens=16, seed=77, temperature=0.9, top_p=0.95)
    alone = generator.generate([GenRow(**row)])[0].tokens
    crowd = [GenRow([40 + i] * (i + 1), 16, seed=i) for i in range(5)]
    batched = generator.generate(crowd[:2] + [GenRow(**row)] + crowd[2:])[2].tokens
    again = generator.generate([GenRow(**row)])[0].tokens
    other_seed = generator.generate([GenRow(**{**row, "seed": 78})])[0].tokens
    assert alone == batched == again
    assert alone != other_seed


@torch.no_grad()
@pytest.mark.parametrize("top_k", [5, -1])
def test_sampling_frequencies_follow_the_truncated_softmax(generator, tiny_moe, top_k):
    # One token from one prompt, 3000 independent seeds: the empirical law must match
    # softmax(logits/T), restricted to the top-k set and renormalised (the reference, in float64).
    prompt, temperature, n = [3, 4, 5], 0.8, 3000
    results = generator.generate([GenRow(prompt, 1, seed=s, temperature=temperature, top_k=top_k) for s in range(n)])
    logits = load_model(str(tiny_moe))(torch.tensor([prompt])).logits[0, -1].double() / temperature
    support = torch.topk(logits, top_k).indices if top_k > 0 else torch.arange(VOCAB)
    probs = torch.softmax(logits[support], -1)
    counts = torch.zeros(VOCAB)
    for r in results:
        counts[r.tokens[0]] += 1
    assert counts.sum() == counts[support].sum(), "a token outside the top-k set was sampled"
    for token, p in zip(support.tolist(), probs.tolist()):
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[token].item() / n - p) < 5 * sigma + 1e-3


@torch.no_grad()
def test_top_p_keeps_only_the_nucleus(generator, tiny_moe):
    prompt, top_p = [8, 9], 0.3
    results = generator.generate([GenRow(prompt, 1, seed=s, top_p=top_p) for s in range(300)])
    probs = torch.softmax(load_model(str(tiny_moe))(torch.tensor([prompt])).logits[0, -1].double(), -1)
    sorted_p, order = probs.sort(descending=True)
    nucleus = set(order[(sorted_p.cumsum(0) - sorted_p) < top_p].tolist())
    assert {r.tokens[0] for r in results} <= nucleus


def test_each_row_stops_on_its_own_stop_ids_and_length(generator, tiny_moe):
    probe = generator.generate([GenRow([20, 21, 22], 12, seed=5, temperature=0)])[0].tokens
    # Stop on a token whose first occurrence is as late as possible within the first 7.
    stop_at = max(i for i, t in enumerate(probe) if t not in probe[:i] and i <= 6)
    rows = [
        GenRow([20, 21, 22], 12, seed=5, temperature=0, stop_ids=frozenset([probe[stop_at]])),
        GenRow([20, 21, 22], 5, seed=5, temperature=0),
        GenRow([20, 21, 22], 12, seed=5, temperature=0),
    ]
    stopped, short, full = generator.generate(rows)
    assert stopped.finish == "stop" and stopped.matched == probe[stop_at]
    assert stopped.tokens == probe[: stop_at + 1]
    assert short.finish == "length" and short.tokens == probe[:5]
    assert full.tokens == probe


@torch.no_grad()
def test_routed_experts_are_the_router_top_k_of_a_forward_pass(generator, tiny_moe):
    rows = [GenRow([50, 51, 52, 53], 6, seed=9, want_routing=True), GenRow([60], 9, seed=10, want_routing=True)]
    for row, result in zip(rows, generator.generate(rows)):
        ids = torch.tensor([row.prompt_ids + result.tokens])
        out = load_model(str(tiny_moe))(ids, output_router_logits=True)
        reference = torch.stack([r.topk(2, -1).indices.sort(-1).values for r in out.router_logits], dim=1)[:-1]
        got = torch.from_numpy(result.routed_experts).sort(-1).values
        assert got.shape == (len(row.prompt_ids) + len(result.tokens) - 1, 2, 2)
        assert torch.equal(got.long(), reference)


def test_loading_per_expert_checkpoint_names_reproduces_the_other_model(tiny_moe, tiny_moe_b):
    generator = TransformersGenerator(tiny_moe)
    assert generator.load_named_tensors(hf_named_tensors(tiny_moe_b)) == len(hf_named_tensors(tiny_moe_b))
    reference = TransformersGenerator(tiny_moe_b)
    row = dict(prompt_ids=[7, 8, 9], max_new_tokens=12, seed=3)
    assert generator.generate([GenRow(**row)])[0].tokens == reference.generate([GenRow(**row)])[0].tokens
    state, expected = generator.model.state_dict(), reference.model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_loading_a_tensor_of_the_wrong_shape_is_refused(generator):
    with pytest.raises(ValueError, match="shape"):
        generator.load_named_tensors([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="unknown tensor model.nothing.weight"):
        generator.load_named_tensors([("model.nothing.weight", torch.zeros(3))])


def test_block_inverse_cdf_equals_a_full_float64_search():
    from luspo_megatron.rollout.local.generation import inverse_cdf

    g = torch.Generator().manual_seed(0)
    # Integer masses (exact in float32 and float64), with zero runs, over 1000 entries (4 blocks).
    probs = torch.randint(0, 5, (6, 1000), generator=g).float()
    probs[:, 300:700] = 0
    for _ in range(200):
        uniform = torch.rand(6, generator=g, dtype=torch.float64)
        cdf = probs.double().cumsum(-1)
        reference = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
        got = inverse_cdf(probs, uniform)
        assert torch.equal(got, reference)
        assert bool((probs.gather(1, got[:, None]) > 0).all())


def test_a_nucleus_wider_than_the_candidates_falls_back_to_a_full_sort():
    from luspo_megatron.rollout.local.generation import NUCLEUS_CANDIDATES, _RowSampler

    vocab = 3 * NUCLEUS_CANDIDATES
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(vocab, generator=g) * 0.1, -1)  # nearly flat: the nucleus is wide
    sorted_p, order = probs.double().sort(descending=True)
    nucleus = set(order[(sorted_p.cumsum(0) - sorted_p) < 0.9].tolist())
    assert len(nucleus) > NUCLEUS_CANDIDATES
    n = 1000
    picks = _RowSampler._truncated(probs.expand(n, vocab).contiguous(), torch.rand(n, generator=g, dtype=torch.float64),
                                   torch.zeros(n, dtype=torch.long), torch.full((n,), 0.9))
    assert set(picks.tolist()) <= nucleus
    outside_candidates = set(order[NUCLEUS_CANDIDATES:].tolist())
    assert len(set(picks.tolist()) & outside_candidates) > 0  # reached past the top-k candidates


def test_reload_of_the_same_architecture_copies_in_place_and_equals_a_fresh_load(tiny_moe, tiny_moe_b, tmp_path):
    """The weight-sync path: same config.json, every parameter covered -> tensors copied into the
    live model (no rebuild), bit-equal to loading the directory from scratch. A directory that
    misses one tensor is refused, naming it, and the live model stays as it was."""
    import shutil

    from safetensors.torch import load_file, save_file

    from luspo_megatron.rollout.local.weight_files import WeightUpdateRefused

    generator = TransformersGenerator(tiny_moe)
    live = generator.model
    generator.reload(tiny_moe_b)
    assert generator.model is live and generator.model_path == str(tiny_moe_b)
    expected = TransformersGenerator(tiny_moe_b).model.state_dict()
    state = generator.model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copyfile(tiny_moe / "config.json", partial / "config.json")
    tensors = {k: v for f in sorted(tiny_moe.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    dropped = next(k for k in tensors if ".experts.1.up_proj" in k)
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(partial / "model.safetensors"))
    before = {k: v.clone() for k, v in live.state_dict().items()}
    with pytest.raises(WeightUpdateRefused, match=f"missing tensor {dropped}"):
        generator.reload(partial)
    assert generator.model is live and generator.model_path == str(tiny_moe_b)
    assert all(torch.equal(live.state_dict()[k], before[k]) for k in before)  # not half-applied


def test_tensors_the_model_has_no_parameter_for_are_skipped_at_start_and_in_updates(tiny_moe, tiny_moe_b, tmp_path):
    # A start directory may hold tensors the model does not load (a saved rotary buffer, extra heads):
    # transformers skips them, and so does every update, with or without them; any other unknown name,
    # or a missing parameter, is still refused.
    import shutil

    from safetensors.torch import load_file, save_file

    from luspo_megatron.rollout.local.weight_files import WeightUpdateRefused

    def copy(source, target, extra):
        target.mkdir()
        shutil.copyfile(source / "config.json", target / "config.json")
        tensors = {k: v for f in sorted(source.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        save_file({**tensors, **extra}, str(target / "model.safetensors"))
        return target

    inv_freq = {"model.rotary_emb.inv_freq": torch.arange(4.0)}
    generator = TransformersGenerator(copy(tiny_moe, tmp_path / "start", inv_freq))
    assert "model.rotary_emb.inv_freq" in generator.layout.ignored
    generator.reload(tiny_moe_b)  # without it
    generator.reload(copy(tiny_moe, tmp_path / "with", inv_freq))  # with it
    expected = TransformersGenerator(tiny_moe).model.state_dict()
    assert all(torch.equal(generator.model.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(WeightUpdateRefused, match="unknown tensor model.other.weight"):
        generator.reload(copy(tiny_moe_b, tmp_path / "other", {"model.other.weight": torch.zeros(2)}))
