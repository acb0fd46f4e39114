"""The streaming safetensors writer (read back with the safetensors library), shard planning and
the live-tensor accounting the streaming test relies on."""

import gc

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from luspo_megatron.checkpoint.safetensors_io import (
    LiveTensors,
    SafetensorsStreamWriter,
    TensorSpec,
    parse_size,
    plan_shards,
)
from luspo_megatron.errors import CheckpointError


def test_stream_writer_output_reads_back_with_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 5, generator=gen).bfloat16(),
        "b": torch.randn(7, generator=gen),
        "c.idx": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.half": torch.randn(1, 2, 3, generator=gen).half(),
    }
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_stream_writer_refuses_out_of_order_or_missing_tensors(tmp_path):
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)]
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(RuntimeError, match="expected"):
        writer.write("b", torch.zeros(2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()


def test_shards_are_cut_in_order_below_the_limit():
    specs = [TensorSpec(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5, 5])]
    shards = plan_shards(specs, max_bytes=80)  # 40, 40, 120 (alone), 20, 20, 20 bytes
    assert [[s.name for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]


def test_sizes_parse_like_transformers_max_shard_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1234") == 1234
    with pytest.raises(CheckpointError, match="--max-shard-size"):
        parse_size("lots")


def test_live_tensors_count_until_the_last_view_is_gone():
    live = LiveTensors()
    a = live.track(torch.zeros(100), "f1")
    view = a[10:20]
    b = live.track(torch.zeros(50), "f2")
    assert (live.bytes, live.peak_tags) == (600, 2)
    del a
    gc.collect()
    assert live.bytes == 600  # the view keeps a's storage alive
    del view, b
    gc.collect()
    assert live.bytes == 0 and live.peak_bytes == 600 and live.peak_tensors == 2
