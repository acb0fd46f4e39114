"""Weight sync into a running server: disk (atomic), tensor, and distributed over a real gloo group."""

from __future__ import annotations

import json

import pytest
import torch

from luspo_megatron.config import RolloutConfig
from luspo_megatron.rollout.engine import SamplingParams
from luspo_megatron.rollout.fleet import start_fleet
from luspo_megatron.rollout.weight_sync import (
    bucket_by_bytes,
    deserialize_named_tensors,
    serialize_named_tensors,
    write_hf_checkpoint,
)
from luspo_megatron.runtime.distributed import free_port
from tests.rollout.conftest import greedy, hf_named_tensors, http

PROMPT = [11, 12, 13]
GREEDY = SamplingParams(temperature=0, max_new_tokens=10)


@pytest.fixture(scope="module")
def rollout(tiny_moe, tmp_path_factory):
    """This module changes weights, so it gets its own server, started the trainer's way."""
    fleet = start_fleet(RolloutConfig(num_engines=1, max_concurrency=16), hf_dir=tiny_moe, seed=0,
                        log_dir=tmp_path_factory.mktemp("rollout"))
    engine = fleet.__enter__()
    processes = [s.proc for s in engine.supervisor.servers]
    yield engine
    fleet.__exit__(None, None, None)
    assert all(p.poll() is not None for p in processes), "closing the rollout must stop its servers"


@pytest.fixture(scope="module")
def engine(rollout):
    return rollout


@pytest.fixture(scope="module")
def server(rollout):
    return rollout.supervisor.servers[0]


def outputs(engine) -> list[int]:
    return engine.generate([PROMPT], GREEDY, n=1)[0][0].response_ids


def reported_version(engine, server) -> tuple[str, str]:
    sample = engine.generate([PROMPT], GREEDY, n=1)[0][0]
    status, info = http("GET", f"{server.url}/model_info", api_key=engine.supervisor.api_key)
    return info["weight_version"], sample.weight_version


def test_update_from_disk_changes_outputs_and_weight_version(engine, server, tiny_moe, tiny_moe_b, tmp_path):
    assert outputs(engine) == greedy(tiny_moe, PROMPT, 10)
    assert greedy(tiny_moe, PROMPT, 10) != greedy(tiny_moe_b, PROMPT, 10)
    # The trainer's path: a stream of HF tensors -> byte buckets -> an atomically written directory.
    buckets = bucket_by_bytes(hf_named_tensors(tiny_moe_b), max_bytes=64 * 1024)
    # Inside the directory the fleet's servers may read (--allowed-weight-dirs): where syncs publish.
    path = write_hf_checkpoint(buckets, engine.updater.weights_dir / "step_7", config_dir=tiny_moe_b)
    assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) == len(
        hf_named_tensors(tiny_moe_b))
    engine.update_weights_from_disk(path, weight_version="7")
    assert outputs(engine) == greedy(tiny_moe_b, PROMPT, 10)
    assert reported_version(engine, server) == ("7", "7")
    assert engine.weight_version() == "7"


def test_update_from_tensor_buckets_changes_outputs_and_weight_version(engine, server, tiny_moe):
    engine.update_weights_from_tensor(bucket_by_bytes(hf_named_tensors(tiny_moe), max_bytes=32 * 1024), "8")
    assert outputs(engine) == greedy(tiny_moe, PROMPT, 10)
    assert reported_version(engine, server) == ("8", "8")


def test_update_from_distributed_broadcasts_over_a_gloo_group(engine, server, tiny_moe_b):
    # This test process is rank 0 of a real torch.distributed group; the server joins as rank 1.
    engine.init_weights_update_group("127.0.0.1", free_port(), group_name="test-weights", backend="gloo",
                                     timeout_s=60)
    try:
        engine.update_weights_from_distributed(bucket_by_bytes(hf_named_tensors(tiny_moe_b), 48 * 1024), "9")
    finally:
        engine.destroy_weights_update_group()
    assert outputs(engine) == greedy(tiny_moe_b, PROMPT, 10)
    assert reported_version(engine, server) == ("9", "9")


def test_a_bad_disk_update_is_reported_and_generation_resumes(engine, server, tmp_path):
    from luspo_megatron.errors import RolloutError

    with pytest.raises(RolloutError, match=r"update_weights_from_disk: HTTP 400: Failed to get weights iterator"):
        engine.update_weights_from_disk(engine.updater.weights_dir / "missing", weight_version="10")
    assert engine.weight_version() == "9"
    assert len(outputs(engine)) == 10  # not left paused


def test_sync_weights_publishes_the_stream_and_a_restarted_server_would_load_it(engine, server, tiny_moe):
    # The trainer's one call: a (name, tensor) stream in, the disk path of the fleet's configuration.
    engine.sync_weights(iter(hf_named_tensors(tiny_moe)), "11")
    assert outputs(engine) == greedy(tiny_moe, PROMPT, 10)
    assert reported_version(engine, server) == ("11", "11")
    published = engine.updater.weights_dir
    assert engine.supervisor._weights == (str(published), "11")
    assert (published / "model.safetensors.index.json").is_file()


def test_a_crash_mid_write_leaves_the_previous_directory_whole(tiny_moe, tmp_path):
    good = write_hf_checkpoint(bucket_by_bytes(hf_named_tensors(tiny_moe), 64 * 1024), tmp_path / "latest", tiny_moe)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def crashing():
        yield hf_named_tensors(tiny_moe)[:3]
        raise RuntimeError("trainer died")

    with pytest.raises(RuntimeError, match="trainer died"):
        write_hf_checkpoint(crashing(), tmp_path / "latest", tiny_moe)
    with pytest.raises(RuntimeError, match="trainer died"):
        write_hf_checkpoint(crashing(), tmp_path / "fresh", tiny_moe)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no half-written or temporary dirs


def test_tensor_payload_round_trips_and_refuses_other_pickles():
    import base64
    import pickle

    named = [("a", torch.randn(3, 4)), ("b", torch.arange(5, dtype=torch.int64)),
             ("c", torch.randn(4, 6).to(torch.bfloat16)[:, 1])]
    back = deserialize_named_tensors(serialize_named_tensors(named))
    assert [n for n, _ in back] == ["a", "b", "c"]
    assert all(torch.equal(x, y) and x.dtype == y.dtype for (_, x), (_, y) in zip(named, back))
    evil = base64.b64encode(pickle.dumps([("a", print)])).decode()
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        deserialize_named_tensors(evil)


def test_buckets_keep_order_and_stay_under_the_byte_bound():
    sizes = [10, 30, 5, 100, 1, 1, 60, 40]  # float32 elements
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate(sizes)]
    buckets = list(bucket_by_bytes(named, max_bytes=160))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    for bucket in buckets:
        nbytes = sum(t.numel() * 4 for _, t in bucket)
        assert nbytes <= 160 or len(bucket) == 1  # a tensor larger than the bound travels alone
    # Greedy: a bucket is closed only when the next tensor would not fit.
    for a, b in zip(buckets, buckets[1:]):
        assert sum(t.numel() * 4 for _, t in a) + b[0][1].numel() * 4 > 160
