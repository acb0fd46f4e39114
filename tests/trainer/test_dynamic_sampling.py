"""DAPO dynamic sampling, overlong shaping and overlong filtering in the trainer (issue 14).

Two parts. The rank-0 rollout step (trainer/rollout_step.py) with the real PromptIterator, a scripted
engine (each prompt's G samples are fixed by the prompt and the sample index) and a scripted reward
(flat on chosen prompts): which groups are kept, dropped and carried, the prompt stream, resume, and
the overlong-shaped reward against DAPO's formula. Then tools/train_luspo.py end to end with the
in-process engine: a reward that is always 0 (every step skips training, in one line, and the run
goes on), and a reward flat on half the prompts (every batch is full).
"""

from __future__ import annotations

import copy
import logging
import statistics
from types import SimpleNamespace

import pytest

from luspo_megatron.config import config_from_dict
from luspo_megatron.data.dataset import PromptIterator, PromptRecord
from luspo_megatron.rewards.compose import RewardResult
from luspo_megatron.rewards.pool import ScoreStats
from luspo_megatron.rollout.engine import Sample
from luspo_megatron.trainer.batch import RolloutBatch, mini_batches
from luspo_megatron.trainer.policy_step import PolicyStepResult, merge_step_metrics, micro_batches, trained_tokens
from luspo_megatron.trainer.rollout_step import RolloutStep
from luspo_megatron.trainer.timer import Timer
from tests.trainer.test_train_luspo import rows, train

G, L_MAX = 4, 8


class ScriptedEngine:
    """Sample j of prompt [row] has 2j + 1 + row % 3 tokens (capped at L_MAX: finish "length"). Its
    weights are those the trainer pushed last (``version``: "default" until a push; the caller
    advances it as the trainer would after each step's sync)."""

    version = "default"

    def generate(self, prompt_ids, sampling, n):
        groups = []
        for ids in prompt_ids:
            group = []
            for j in range(n):
                length = min(2 * j + 1 + ids[0] % 3, sampling.max_new_tokens)
                group.append(Sample(list(ids), [100 + j] * length, [-0.5] * length,
                                    "length" if length == sampling.max_new_tokens else "stop", self.version))
            groups.append(group)
        return groups


class ScriptedTokenizer:
    def batch_decode(self, ids, skip_special_tokens=True):
        return [f"sample {seq[0] - 100} of {len(seq)} tokens" for seq in ids]


def scripted_reward(texts, labels, metadata):
    """Flat (0 for every sample) on label "flat"; sample j scores j / G otherwise."""
    scores = [0.0 if label == "flat" else int(text.split()[1]) / G for text, label in zip(texts, labels)]
    return RewardResult(scores, {}, ScoreStats())


def records(flat: set[int], n: int = 40) -> list[PromptRecord]:
    return [PromptRecord(row=i, prompt_ids=[i], label="flat" if i in flat else "live", prompt=f"p{i}")
            for i in range(n)]


def config(P: int = 4, **algorithm):
    return config_from_dict({"rollout": {"rollout_batch_size": P, "max_response_len": L_MAX},
                             "algorithm": {"n_samples_per_prompt": G, **algorithm}})


class SpyIterator(PromptIterator):
    """A PromptIterator that records every draw and every carry."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.draws: list[int] = []
        self.fresh: list[int] = []  # draws from the data order (not carried prompts coming back)
        self.carries: list[int] = []

    def next_indices(self, n=None):
        coming_back = min(len(self.carried), self.batch_size if n is None else n)
        out = super().next_indices(n)
        self.draws += out
        self.fresh += out[coming_back:]
        return out

    def carry(self, indices):
        self.carries += list(indices)
        super().carry(indices)


def collect(cfg, data, steps: int, iterator=None) -> tuple[list[RolloutBatch], PromptIterator]:
    it = iterator or SpyIterator(data, cfg.rollout.rollout_batch_size, seed=3)
    engine = ScriptedEngine()
    step = RolloutStep(cfg, engine, ScriptedTokenizer(), scripted_reward, it, ())
    batches = []
    for s in range(1, steps + 1):
        batches.append(step(s, Timer()))
        engine.version = str(s)  # the sync after step s
    return batches, it


FLAT = {1, 2, 5, 8, 9, 13, 14, 17, 21, 22, 26, 30, 31, 33, 38}


# ---------------------------------------------------------------------------- the rollout step
def test_dynamic_sampling_fills_every_batch_with_groups_that_have_a_signal():
    cfg = config(dynamic_sampling=True, over_sampling_batch_size=3)
    batches, it = collect(cfg, records(FLAT), steps=6)
    for batch in batches:
        assert batch.metrics["num_groups"] == 4 and len(batch.samples) == 4 * G
        assert not FLAT & set(batch.prompt_indices)  # flat groups dropped
        assert all(statistics.pstdev(batch.scores[g * G:(g + 1) * G]) > 0 for g in range(4))
        m = batch.metrics
        assert m["dynamic_sampling_generated_groups"] == 3 * m["dynamic_sampling_rounds"]
        assert m["dynamic_sampling_generated_groups"] == (m["dynamic_sampling_kept_groups"]
                                                          + m["dynamic_sampling_dropped_groups"]
                                                          + m["dynamic_sampling_carried_prompts"])
    assert sum(b.metrics["dynamic_sampling_carried_prompts"] for b in batches) > 0  # the test reaches carrying


def test_the_prompt_stream_with_dynamic_sampling_is_the_stream_without_it():
    cfg = config(dynamic_sampling=True, over_sampling_batch_size=5)
    batches, it = collect(cfg, records(FLAT), steps=7)  # more than one epoch of 40 prompts
    assert len(it.fresh) > 40 and it.carries
    plain = PromptIterator(records(FLAT), 4, seed=3)
    assert it.fresh == plain.next_indices(len(it.fresh))  # new prompts come in the data order
    consumed = list(it.draws)
    for i in it.carries:
        consumed.remove(i)  # a carried prompt is consumed when it comes back, not when it is carried
    # Every prompt of the data order is consumed exactly once or still carried: none lost, none twice.
    assert sorted(consumed + it.carried) == sorted(it.fresh)
    trained = [i for b in batches for i in b.prompt_indices]
    dropped = [i for i in consumed if i in FLAT]
    assert sorted(trained + dropped) == sorted(consumed)  # every consumed prompt was trained on or dropped


def test_carried_prompts_are_part_of_the_checkpointed_data_state():
    cfg = config(dynamic_sampling=True, over_sampling_batch_size=6)
    batches, _ = collect(cfg, records(FLAT), steps=4)
    first, it = collect(cfg, records(FLAT), steps=2)
    assert it.carried  # the state to save holds carried prompts
    state = copy.deepcopy(it.state_dict())
    resumed = PromptIterator(records(FLAT), 4, seed=3)
    resumed.load_state_dict(state)
    engine = ScriptedEngine()
    engine.version = "2"  # a resumed run first pushes the step it resumed at
    step = RolloutStep(cfg, engine, ScriptedTokenizer(), scripted_reward, resumed, ())
    after = []
    for s in (3, 4):
        after.append(step(s, Timer()))
        engine.version = str(s)
    assert [b.prompt_indices for b in first + after] == [b.prompt_indices for b in batches]


def test_every_group_flat_gives_an_empty_batch_and_the_prompts_stay_consumed():
    cfg = config(dynamic_sampling=True, max_dynamic_sampling_rounds=2)
    (batch,), it = collect(cfg, records(set(range(40))), steps=1)
    assert batch.samples == [] and batch.metrics["num_groups"] == 0
    assert batch.metrics["dynamic_sampling_dropped_groups"] == 12 and batch.metrics["dynamic_sampling_rounds"] == 3
    assert it.carried == [] and it.draws == PromptIterator(records(set()), 4, seed=3).next_indices(12)


def test_a_batch_that_stays_short_is_trained_as_it_is_and_says_so(caplog):
    cfg = config(dynamic_sampling=True, max_dynamic_sampling_rounds=1)
    plain = PromptIterator(records(set()), 4, seed=3).next_indices(8)  # the 8 prompts of 2 rounds
    flat = set(range(40)) - {plain[1], plain[6]}  # two live prompts among them
    with caplog.at_level(logging.WARNING, logger="luspo_megatron.trainer"):
        (batch,), _ = collect(cfg, records(flat), steps=1)
    live = [i for i in plain if i not in flat]
    assert batch.prompt_indices == live and batch.metrics["num_groups"] == len(live) == 2
    assert len([r for r in caplog.records if "dynamic sampling kept" in r.getMessage()]) == 1


def test_without_dynamic_sampling_flat_groups_stay_and_nothing_is_carried():
    cfg = config()
    (batch,), it = collect(cfg, records(FLAT), steps=1)
    assert batch.prompt_indices == PromptIterator(records(FLAT), 4, seed=3).next_indices(4)
    assert it.carries == [] and "dynamic_sampling_kept_groups" not in batch.metrics


# ---------------------------------------------------------------------------------- overlong
def dapo_penalty(length: int, max_len: int, buffer: int, factor: float) -> float:
    """DAPO Eq. 13 (×f): 0 up to L_max − L_cache tokens, then ((L_max − L_cache) − |y|) / L_cache · f."""
    expected = max_len - buffer
    if length <= expected:
        return 0.0
    return (expected - length) / buffer * factor if length <= max_len else -factor


def test_overlong_shaped_rewards_and_advantages_equal_dapos_formula():
    cfg = config(overlong_buffer_len=3, overlong_penalty_factor=0.5)
    it = PromptIterator(records(set()), 4, seed=3)
    step = RolloutStep(cfg, ScriptedEngine(), ScriptedTokenizer(), scripted_reward, it, ())
    batch = step.generate_and_score([0, 4, 5, 7], 1, 0, Timer())  # lengths 1 … 8 across the groups
    lengths = [len(s.response_ids) for s in batch.samples]
    assert set(lengths) == set(range(1, 9))  # below, inside and at the end of the buffer
    for score, reward, n in zip(batch.scores, batch.rewards, lengths):
        assert reward == pytest.approx(score + dapo_penalty(n, L_MAX, 3, 0.5), abs=1e-15)
    for g in range(4):  # advantages from the shaped rewards: (R − mean) / (std + 1e-6), unbiased std
        r = batch.rewards[g * G:(g + 1) * G]
        want = [(x - statistics.mean(r)) / (statistics.stdev(r) + 1e-6) for x in r]
        assert batch.advantages[g * G:(g + 1) * G] == pytest.approx(want, abs=1e-12)
    batch.metrics = {}
    step._batch_metrics(batch)
    penalties = [dapo_penalty(n, L_MAX, 3, 0.5) for n in lengths]
    assert batch.metrics["overlong_shaped"] == sum(p < 0 for p in penalties)
    assert batch.metrics["overlong_penalty_mean"] == pytest.approx(statistics.mean(penalties), abs=1e-15)
    assert batch.metrics["reward_mean"] == pytest.approx(statistics.mean(batch.scores))  # the raw score


def test_overlong_filter_zeroes_the_loss_mask_of_truncated_responses_and_keeps_them_in_b():
    cfg = config(P=2, overlong_filter=True)
    it = PromptIterator(records(set()), 2, seed=3)
    batch = RolloutStep(cfg, ScriptedEngine(), ScriptedTokenizer(), scripted_reward, it, ()).generate_and_score(
        [6, 7], 1, 0, Timer())
    for i, s in enumerate(batch.samples):  # truncated: samples 3 and 6 (and nothing else)
        s.finish = "length" if i in (3, 6) else "stop"
    policy = SimpleNamespace(layout=SimpleNamespace(dp=1, dp_rank=0, pp=1))
    (mb,) = micro_batches(policy, batch, range(8), cfg, pad_token_id=0)
    assert mb.num_sequences == 8  # B unchanged
    cu = mb.cu_seqlens.tolist()
    for j, i in enumerate(mb.sample_index.tolist()):
        response = len(batch.samples[i].response_ids)
        kept = mb.loss_mask[cu[j]:cu[j + 1]].sum().item()
        assert kept == (0 if i in (3, 6) else response)
    assert trained_tokens(batch, range(8), cfg) == mb.loss_mask.sum().item()
    unfiltered = config(P=2)
    assert trained_tokens(batch, range(8), unfiltered) == sum(len(s.response_ids) for s in batch.samples)


# -------------------------------------------------------------------------- mini-batches, merge
def test_mini_batches_split_a_full_batch_evenly_and_a_short_one_into_the_same_number_of_steps():
    assert mini_batches(16, 4) == [range(0, 4), range(4, 8), range(8, 12), range(12, 16)]
    assert [len(r) for r in mini_batches(10, 4)] == [2, 3, 2, 3]
    assert mini_batches(3, 4) == [range(0, 1), range(1, 2), range(2, 3)] and mini_batches(0, 4) == []


def test_merging_optimizer_steps_takes_maxima_by_max_and_counts_by_sum():
    steps = [{"loss": 1.0, "tis_ratio_max": 3.0, "num_seqs": 4.0, "clip_frac": 0.0},
             {"loss": 3.0, "tis_ratio_max": 1.5, "num_seqs": 4.0, "clip_frac": 0.5}]
    merged = merge_step_metrics(PolicyStepResult(steps, {"mismatch_k3_kl": 0.1}), has_reference=True)
    assert merged == {"loss": 2.0, "tis_ratio_max": 3.0, "num_seqs": 8.0, "clip_frac": 0.25, "clip_frac_last": 0.5,
                      "skipped_steps": 0.0, "optimizer_steps": 2.0, "mismatch_k3_kl": 0.1}
    assert merge_step_metrics(PolicyStepResult(), has_reference=False) == {"skipped_steps": 0.0,
                                                                           "optimizer_steps": 0.0}


# ------------------------------------------------------------------------------ trainer runs
RUN = ["--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--rollout-max-response-len", "8",
       "--rollout-engine", "inprocess", "--weight-sync", "tensor", "--dynamic-sampling", "--train-iters", "3",
       "--num-steps-per-rollout", "2"]


def test_a_reward_that_is_always_zero_skips_training_in_one_line_per_step_and_runs_on(tmp_path):
    proc = train(tmp_path, *RUN, "--max-dynamic-sampling-rounds", "1",
                 "--custom-reward-path", "tests.trainer.dynamic_rewards:always_zero")
    skips = [line for line in proc.stderr.splitlines() if "no training" in line]
    assert len(skips) == 3 and all("dynamic sampling kept no group in 2 rounds" in line for line in skips), skips
    logged = rows(tmp_path)
    assert [r["step"] for r in logged] == [1, 2, 3]
    for row in logged:
        # No optimizer step ran; the unchanged weights are still pushed under the step's version, so that the
        # next step's samples carry the version the trainer pushed last (rollout/versions.py).
        assert row["optimizer_steps"] == 0 and row["num_groups"] == 0 and "time_sync_s" in row
        assert row["dynamic_sampling_dropped_groups"] == 8 and row["dynamic_sampling_score_mean"] == 0


def test_a_reward_flat_on_half_the_prompts_fills_every_batch_and_shapes_overlong_rewards(tmp_path):
    train(tmp_path, *RUN, "--custom-reward-path", "tests.trainer.dynamic_rewards:flat_on_even_answers",
          "--overlong-buffer-len", "4", "--overlong-penalty-factor", "0.5")
    logged = rows(tmp_path)
    assert [r["num_groups"] for r in logged] == [4, 4, 4] and all(r["optimizer_steps"] == 2 for r in logged)
    assert sum(r["dynamic_sampling_dropped_groups"] for r in logged) > 0
    samples = rows(tmp_path, "samples.jsonl")
    assert len(samples) == 3 * 16
    for s in samples:  # the logged reward is the score plus DAPO's penalty of the logged length
        assert int(str(s["label"]).strip()) % 2 == 1  # no flat group was trained on
        assert s["reward"] == pytest.approx(s["score"] + dapo_penalty(s["response_len"], 8, 4, 0.5), abs=1e-12)
    assert any(s["reward"] < s["score"] for s in samples)
