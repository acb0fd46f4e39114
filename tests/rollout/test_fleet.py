"""The fleet behind the real sglang-router: workers that join or leave between syncs, and the faults
of a sync (a server killed during it, an unreachable URL, a server that answers 400).

Every fault test ends the same way: a RolloutError that names the failing server, and every
reachable server resumed, which a direct ``/generate`` (standard library, outside the client under
test) proves: a paused server would hold it. What a server holds is read back with
``/get_weights_by_name`` and compared, bit for bit, with the checkpoint that was pushed.
"""

from __future__ import annotations

import pytest
import torch

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.engine import SamplingParams
from luspo_megatron.rollout.local.process import LocalServer
from luspo_megatron.rollout.router import register_worker, unregister_worker
from luspo_megatron.rollout.sglang import SGLangEngine
from luspo_megatron.rollout.weight_sync import bucket_by_bytes, write_hf_checkpoint
from luspo_megatron.runtime.distributed import free_port
from tests.rollout.conftest import hf_named_tensors, http

PROMPTS = [[5 + i, 6 + i, 7 + i] for i in range(4)]
SAMPLING = SamplingParams(max_new_tokens=4, seed=11)  # seeded: one request per sample, spread round-robin
PROBE = "model.layers.1.mlp.experts.3.down_proj.weight"  # one parameter read back from the servers


@pytest.fixture(scope="module")
def fleet(tiny_moe, tmp_path_factory):
    """Four servers of this module's own (it changes weights and kills two, C and D): A reads weights
    under the whole root, the others only under root/shared, so a directory in root/a_only is one B
    refuses."""
    root = tmp_path_factory.mktemp("fleet")
    (root / "shared").mkdir()
    (root / "a_only").mkdir()
    logs = tmp_path_factory.mktemp("fleet_logs")
    servers = {name: LocalServer(tiny_moe, enable_fault_injection=True, log_path=logs / f"{name}.log",
                                 allowed_weight_dirs=[root if name == "A" else root / "shared"])
               for name in "ABCD"}
    try:
        for server in servers.values():  # launch all, then wait: their start-ups overlap
            server.launch()
        for server in servers.values():
            server.wait_ready()
        yield root, servers
    finally:
        for server in servers.values():
            server.stop()


def answers_generate(url: str) -> bool:
    """A direct /generate: it returns only when the server is not paused."""
    status, out = http("POST", f"{url}/generate", {"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 2}},
                       timeout=30)
    return status == 200 and len(out["output_ids"]) == 2


def generate_calls(url: str) -> int:
    return http("GET", f"{url}/luspo/faults")[1]["generate_calls"]


def version(url: str) -> str:
    return http("GET", f"{url}/model_info")[1]["weight_version"]


def holds(url: str, hf_dir) -> bool:
    """The server's PROBE parameter equals the checkpoint's, bit for bit (float32 both)."""
    expected = dict(hf_named_tensors(hf_dir))[PROBE]
    status, rows = http("POST", f"{url}/get_weights_by_name", {"name": PROBE, "truncate_size": expected.shape[0]})
    assert status == 200, rows
    return torch.equal(torch.tensor(rows, dtype=torch.float32), expected.float())


def versions_of(groups) -> set[str]:
    return {s.weight_version for group in groups for s in group}


def test_a_worker_that_joins_is_updated_before_it_serves_and_one_that_leaves_is_not_addressed(
        fleet, tiny_moe, tiny_moe_b, sglang_router):
    root, s = fleet
    A, B = s["A"].url, s["B"].url
    router = sglang_router([A])
    with SGLangEngine.from_router(router.url, weight_sync="disk", weights_dir=root / "shared" / "join",
                                  config_dir=tiny_moe) as engine:
        # Added before a sync (the bug: 8 of 24 samples on "default" after an update): paused and updated too.
        register_worker(router.url, B)
        engine.sync_weights(iter(hf_named_tensors(tiny_moe_b)), "11")
        assert version(A) == version(B) == "11" and holds(B, tiny_moe_b)
        # Removed: the next sync no longer addresses it.
        unregister_worker(router.url, B)
        engine.sync_weights(iter(hf_named_tensors(tiny_moe)), "12")
        assert version(A) == "12" and version(B) == "11"
        # Back on old weights between syncs: it loads the published "12" before any request reaches it.
        before = generate_calls(B)
        register_worker(router.url, B)
        groups = engine.generate(PROMPTS, SAMPLING, n=2)
        assert generate_calls(B) > before  # it served part of the step (round robin)...
        assert versions_of(groups) == {"12"} and version(B) == "12" and holds(B, tiny_moe)  # ...on the new weights


def test_a_joining_worker_that_cannot_load_at_once_is_held_out_of_the_router_until_the_next_sync(
        fleet, tiny_moe, tiny_moe_b, sglang_router):
    root, s = fleet
    A, B = s["A"].url, s["B"].url
    router = sglang_router([A])
    with SGLangEngine.from_router(router.url, weight_sync="tensor") as engine:
        engine.sync_weights(iter(hf_named_tensors(tiny_moe_b)), "21")  # tensor sync: nothing published on disk
        assert version(B) != "21"
        register_worker(router.url, B)
        before = generate_calls(B)
        groups = engine.generate(PROMPTS, SAMPLING, n=2)
        assert versions_of(groups) == {"21"} and generate_calls(B) == before  # B served nothing...
        assert router.workers() == [A]  # ...because it was taken out of the router
        engine.sync_weights(iter(hf_named_tensors(tiny_moe)), "22")  # the held-back worker is part of the sync
        assert version(B) == "22" and holds(B, tiny_moe) and sorted(router.workers()) == sorted([A, B])
        groups = engine.generate(PROMPTS, SAMPLING, n=2)
        assert versions_of(groups) == {"22"} and generate_calls(B) > before


@pytest.mark.parametrize(("mode", "victim"), [("disk", "C"), ("tensor", "D")])
def test_a_server_killed_during_a_sync_is_named_and_the_others_are_resumed(fleet, tiny_moe, sglang_router, mode,
                                                                          victim):
    # disk: the export is written before the pause (it dies before it is paused); tensor: the buckets
    # are posted while the fleet is paused (it dies in the middle of the update).
    root, s = fleet
    A, dying = s["A"], s[victim]
    router = sglang_router([A.url, dying.url])

    def stream():  # the trainer's export, during which the server dies
        for i, item in enumerate(hf_named_tensors(tiny_moe)):
            if i == 0:
                dying.proc.kill()
                dying.proc.wait()
            yield item

    with SGLangEngine.from_router(router.url, weight_sync=mode, weights_dir=root / "shared" / "kill",
                                  config_dir=tiny_moe, bucket_bytes=16 * 1024) as engine:
        with pytest.raises(RolloutError) as err:
            engine.sync_weights(stream(), "31")
    assert dying.url in str(err.value)
    assert answers_generate(A.url)


def test_an_unreachable_url_is_a_rollout_error_naming_it_and_the_others_are_resumed(fleet, tiny_moe):
    root, s = fleet
    A = s["A"].url
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    path = write_hf_checkpoint(bucket_by_bytes(hf_named_tensors(tiny_moe), 1 << 20), root / "shared" / "dead",
                               tiny_moe)
    with SGLangEngine([A, dead + "/"], startup_timeout_s=None, weight_sync="disk") as engine:
        for control in (lambda: engine.update_weights_from_disk(path, "41"), engine.pause, engine.flush_cache,
                        engine.abort_all):
            with pytest.raises(RolloutError, match=f"{dead}/[a-z_]+: ClientConnectorError"):
                control()
            assert answers_generate(A)  # not left paused


def test_a_server_that_answers_the_update_with_400_is_named_and_every_server_is_resumed(fleet, tiny_moe):
    root, s = fleet
    A, B = s["A"].url, s["B"].url
    path = write_hf_checkpoint(bucket_by_bytes(hf_named_tensors(tiny_moe), 1 << 20), root / "a_only" / "w", tiny_moe)
    with SGLangEngine([A, B], weight_sync="disk") as engine:
        with pytest.raises(RolloutError, match=f"{B}/update_weights_from_disk: HTTP 400") as err:
            engine.update_weights_from_disk(path, "51")
    assert A not in str(err.value)
    assert answers_generate(A) and answers_generate(B)
    assert version(B) != "51"  # B refused it whole


def test_routing_replay_through_the_router_stops_naming_the_router_and_the_server_flag(fleet, sglang_router):
    root, s = fleet
    A = s["A"].url
    with SGLangEngine([A], routed_layout=(2, 2)) as direct:  # the worker itself returns them
        assert direct.generate([[5, 6]], SAMPLING, n=1)[0][0].routed_experts.shape == (5, 2, 2)
    router = sglang_router([A])
    with SGLangEngine.from_router(router.url, routed_layout=(2, 2)) as engine:
        with pytest.raises(RolloutError) as err:
            engine.generate([[5, 6]], SAMPLING, n=1)
    message = str(err.value)
    assert f"router {router.url}" in message and "drops return_routed_experts" in message
    assert "--enable-return-routed-experts" in message and "--sglang-url" in message
