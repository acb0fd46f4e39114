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


# ------------------------------------------------------------------ sharded writers, lock, group size
def test_shards_of_several_writers_are_published_only_when_all_succeed(tiny_moe, tmp_path):
    from safetensors.torch import load_file

    from luspo_megatron.rollout.weight_sync import discard_stage, publish_shards, stage_dir, write_shards

    named = hf_named_tensors(tiny_moe)
    halves = [named[::2], named[1::2]]  # two owning ranks, disjoint shares
    stage = stage_dir(tmp_path / "latest")
    maps = [write_shards(bucket_by_bytes(h, 8 * 1024), stage, f"model-rank{r:05d}") for r, h in enumerate(halves)]
    path = publish_shards(stage, tmp_path / "latest", maps, tiny_moe)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    files = {f: load_file(path / f) for f in set(index.values())}
    assert sorted(index) == [n for n, _ in named]  # every tensor once, through the index
    assert all(torch.equal(files[index[n]][n], t) for n, t in named)
    assert {f.name.split("-")[1] for f in path.glob("*.safetensors")} == {"rank00000", "rank00001"}
    # A second sync whose second writer fails: nothing is published, the first stays whole.
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    stage = stage_dir(tmp_path / "latest")
    write_shards(bucket_by_bytes(halves[0], 8 * 1024), stage, "model-rank00000")
    discard_stage(stage)  # what the coordinator does when a report carries an error
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    # A tensor written by two ranks is refused at publication, and nothing is published.
    stage = stage_dir(tmp_path / "latest")
    maps = [write_shards([halves[0][:2]], stage, f"model-rank{r:05d}") for r in range(2)]
    with pytest.raises(ValueError, match="exported twice"):
        publish_shards(stage, tmp_path / "latest", maps, tiny_moe)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before and not stage.exists()


def test_stale_staging_directories_of_a_crashed_writer_are_removed(tmp_path):
    from luspo_megatron.rollout.weight_sync import stage_dir

    crashed = stage_dir(tmp_path / "latest")
    (crashed / "model-rank00001-00001.safetensors").write_bytes(b"half")
    fresh = stage_dir(tmp_path / "latest")
    assert not crashed.exists() and fresh.exists() and not any(fresh.iterdir())


def test_ticket_lock_admits_one_holder_at_a_time_in_arrival_order():
    import threading
    import time

    import torch.distributed as dist

    from luspo_megatron.rollout.weight_sync import TicketLock

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    inside, most, order, lock = [0], [0], [], threading.Lock()

    def holder(name: str) -> None:
        store = dist.TCPStore("127.0.0.1", master.port, is_master=False)  # one client per "rank"
        for _ in range(5):
            with TicketLock(store, "sync1", timeout_s=30) as ticket:
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                    order.append(ticket.ticket)
                time.sleep(0.002)
                with lock:
                    inside[0] -= 1

    threads = [threading.Thread(target=holder, args=(f"r{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most[0] == 1  # never two holders at once
    assert order == list(range(1, 16))  # tickets served in the order they were drawn


def test_engine_ranks_count_an_engine_as_sglang_joins_it():
    from luspo_megatron.errors import RolloutError
    from luspo_megatron.rollout.sync_plan import engine_ranks

    assert engine_ranks("u", {"tp_size": 1}) == 1
    assert engine_ranks("u", {"tp_size": 4, "pp_size": 1, "dp_size": 1}) == 4
    assert engine_ranks("u", {"tp_size": 8, "dp_size": 4, "enable_dp_attention": True}) == 8  # dp inside tp
    # rank = rank_offset + tp_rank: a second pipeline stage or replica would take the same ranks.
    with pytest.raises(RolloutError, match=r"http://e:1: --weight-sync distributed: .* pp 2, dp 1 on 4 GPUs"):
        engine_ranks("http://e:1", {"tp_size": 2, "pp_size": 2, "dp_size": 1})
    with pytest.raises(RolloutError, match="tp 2, pp 1, dp 2 on 4 GPUs"):
        engine_ranks("u", {"tp_size": 2, "pp_size": 1, "dp_size": 2})


def test_update_weight_master_flags_are_checked():
    from luspo_megatron.config import RolloutConfig
    from luspo_megatron.errors import ConfigError

    config = RolloutConfig(update_weight_master_addr="10.0.0.5", update_weight_master_port=29731)
    assert (config.update_weight_master_addr, config.update_weight_master_port) == ("10.0.0.5", 29731)
    with pytest.raises(ConfigError, match=r"--update-weight-master-port: expected a port in \[1, 65535\], got 70000"):
        RolloutConfig(update_weight_master_port=70000)
    with pytest.raises(ConfigError, match="--update-weight-master-addr: expected a host name or address"):
        RolloutConfig(update_weight_master_addr=" ")
