"""The local layout of a packed micro-batch: label alignment, padding, zigzag CP, and its inverse."""

import pytest
import torch

from luspo_megatron.data.packing import MicroBatch
from luspo_megatron.errors import DataError
from luspo_megatron.parallel.microbatch import shard_micro_batch, unshard_logprobs, zigzag_index


def micro_batch(lengths=(5, 7, 4)):
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    mask = torch.ones(total)
    mask[cu[:-1]] = 0
    return MicroBatch(tokens=torch.arange(100, 100 + total), cu_seqlens=cu, loss_mask=mask,
                      advantages=torch.tensor([0.5, -1.0, 2.0])[: len(lengths)],
                      old_logp=-torch.arange(total, dtype=torch.float32),
                      routed_experts=torch.arange(total).repeat(2, 1)[..., None].expand(2, total, 2).clone())


def test_labels_are_the_next_token_inside_each_sequence():
    local = shard_micro_batch(micro_batch(), cp_size=1, cp_rank=0, tp_size=1)
    tokens = torch.arange(100, 116)
    assert torch.equal(local.input_ids[0], tokens)
    expected_labels = torch.cat([tokens[1:5], torch.zeros(1, dtype=torch.long), tokens[6:12],
                                 torch.zeros(1, dtype=torch.long), tokens[13:16], torch.zeros(1, dtype=torch.long)])
    assert torch.equal(local.labels, expected_labels)
    # mask/old_logp of token t+1 move to position t; the last position of a sequence has no label
    assert local.loss_mask.tolist() == [1, 1, 1, 1, 0] + [1] * 6 + [0] + [1, 1, 1, 0]
    assert local.old_logp[0] == -1 and local.old_logp[4] == 0 and local.old_logp[5] == -6
    assert local.cu_seqlens.tolist() == [0, 5, 12, 16]


def test_context_parallel_zigzag_and_padding():
    mb = micro_batch((5, 7, 4))
    parts = [shard_micro_batch(mb, cp_size=2, cp_rank=r, tp_size=1) for r in range(2)]
    # padded to multiples of 2·cp = 4: 8, 8, 4 -> each rank holds half of every sequence
    assert [p.input_ids.shape[1] for p in parts] == [10, 10]
    assert parts[0].index.tolist() == [0, 1, 6, 7, 8, 9, 14, 15, 16, 19]  # chunks 0 and 3 of each sequence
    assert parts[1].index.tolist() == [2, 3, 4, 5, 10, 11, 12, 13, 17, 18]
    assert sorted(parts[0].index.tolist() + parts[1].index.tolist()) == list(range(20))
    assert parts[0].cu_seqlens.tolist() == [0, 4, 8, 10]
    assert parts[0].packed_seq_params.cu_seqlens_q_padded.tolist() == [0, 8, 16, 20]
    assert parts[0].packed_seq_params.cu_seqlens_q.tolist() == [0, 5, 12, 16]
    for part in parts:  # padding never trains
        padding = part.index.clone().apply_(lambda i: i in (5, 6, 7, 15))  # seq 0: 5->8, seq 1: 7->8
        assert part.loss_mask[padding.bool()].sum() == 0


def test_tensor_parallel_pads_with_an_extra_sequence():
    local = shard_micro_batch(micro_batch((5, 7, 4)), cp_size=1, cp_rank=0, tp_size=3)
    assert local.input_ids.shape[1] == 18 and local.cu_seqlens.tolist() == [0, 5, 12, 16]
    assert local.packed_seq_params.cu_seqlens_q_padded.tolist() == [0, 5, 12, 16, 18]
    assert local.loss_mask[16:].sum() == 0


def test_routing_follows_positions_and_the_sequence_parallel_slice():
    mb = micro_batch((5, 7, 4))
    full = shard_micro_batch(mb, cp_size=1, cp_rank=0, tp_size=2, tp_rank=0)
    assert torch.equal(full.routed_experts[0, :, 0], torch.arange(16))  # position-aligned, not shifted
    halves = [shard_micro_batch(mb, cp_size=1, cp_rank=0, tp_size=2, tp_rank=r, sequence_parallel=True)
              for r in range(2)]
    assert torch.equal(torch.cat([h.routed_experts for h in halves], dim=1), full.routed_experts)
    assert halves[1].routed_experts.shape == (2, 8, 2)


def test_unshard_returns_token_aligned_values():
    mb = micro_batch()
    local = shard_micro_batch(mb, cp_size=1, cp_rank=0, tp_size=2)
    label_aligned = local.old_logp  # old_logp went through the shift; shifting back must restore it
    restored = unshard_logprobs(label_aligned, local)
    expected = mb.old_logp.clone()
    expected[mb.cu_seqlens[:-1]] = 0  # the first token of a sequence has no log-prob
    assert torch.equal(restored, expected)


def test_zigzag_index_covers_every_position_once():
    lengths = [8, 16, 4]
    union = torch.cat([zigzag_index(lengths, 2, r) for r in range(2)])
    assert sorted(union.tolist()) == list(range(28))


@pytest.mark.parametrize("change, field", [
    ({"cu_seqlens": torch.tensor([0, 5, 5, 16])}, "strictly increasing"),
    ({"cu_seqlens": torch.tensor([0, 5, 12])}, "end at the 16 tokens"),
    ({"old_logp": torch.zeros(15)}, "old_logp"),
    ({"advantages": torch.zeros(4)}, "advantages"),
    ({"loss_mask": torch.ones(16)}, "first token"),
])
def test_inconsistent_micro_batches_are_one_line_data_errors(change, field):
    mb = micro_batch()
    for key, value in change.items():
        setattr(mb, key, value)
    with pytest.raises(DataError, match=field):
        mb.validate(3)
