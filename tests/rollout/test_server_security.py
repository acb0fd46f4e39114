"""Our server as a guarded service, over real HTTP: the API key as sglang checks it, no fault routes
unless asked for, /get_weights_by_name read against the safetensors files, and weight updates that
are all or nothing (disk, tensor, distributed), from allowed directories only.

One server for the module, started as a shared cluster would run it: ``--api-key``,
``--allowed-weight-dirs``, no ``--enable-fault-injection``, and ``--host 127.0.0.2`` (a loopback
address other than the machine's hostname address, so that the weight-update group's sockets are
seen to bind the server's host and not gloo's default)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.engine import SamplingParams
from luspo_megatron.rollout.local.process import LocalServer
from luspo_megatron.rollout.sglang import SGLangEngine
from luspo_megatron.rollout.weight_sync import bucket_by_bytes
from luspo_megatron.runtime.distributed import free_port
from tests.rollout.conftest import VOCAB, hf_named_tensors, http

KEY = "test-key-0123456789"
HOST = "127.0.0.2"


@pytest.fixture(scope="module")
def allowed(tmp_path_factory, tiny_moe, tiny_moe_b) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    shutil.copytree(tiny_moe, root / "a")
    shutil.copytree(tiny_moe_b, root / "b")
    return root


@pytest.fixture(scope="module")
def secured(tiny_moe, allowed, tmp_path_factory):
    log = tmp_path_factory.mktemp("secured_log") / "server.log"
    with LocalServer(tiny_moe, host=HOST, api_key=KEY, allowed_weight_dirs=[allowed], log_path=log,
                     enable_fault_injection=False) as running:
        yield running


def call(server, method: str, path: str, body=None, **kwargs):
    return http(method, f"{server.url}{path}", body, **kwargs)


def served(server, names: list[str]) -> dict[str, torch.Tensor]:
    """What the server holds now, read back with /get_weights_by_name (every row)."""
    out = {}
    for name in names:
        status, values = call(server, "POST", "/get_weights_by_name", {"name": name, "truncate_size": 1 << 20},
                              api_key=KEY)
        assert status == 200, values
        out[name] = torch.tensor(values, dtype=torch.float32)
    return out


def files(path: Path) -> dict[str, torch.Tensor]:
    return dict(hf_named_tensors(path))


def version(server) -> str:
    return call(server, "GET", "/model_info", api_key=KEY)[1]["weight_version"]


def assert_holds(server, expected: dict[str, torch.Tensor]) -> None:
    got = served(server, sorted(expected))
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape and torch.equal(got[name], tensor.float()), name


# ------------------------------------------------------------------------------------------- the key
GENERATE = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}}
READ_ONLY = [("POST", "/generate", GENERATE), ("GET", "/model_info", None), ("GET", "/get_model_info", None),
             ("GET", "/server_info", None), ("GET", "/v1/loads", None), ("POST", "/flush_cache", None),
             ("POST", "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 2})]
MUTATING = [("POST", "/pause_generation", {}), ("POST", "/abort_request", {"abort_all": True}),
            ("POST", "/update_weights_from_disk", {"model_path": "/tmp", "weight_version": "x"}),
            ("POST", "/init_weights_update_group", {}), ("POST", "/update_weights_from_tensor", {}),
            ("POST", "/nowhere", {})]


@pytest.mark.parametrize(("method", "path", "body"), READ_ONLY + MUTATING,
                         ids=[f"{m} {p}" for m, p, _ in READ_ONLY + MUTATING])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": KEY}, {"x-api-key": "wrong"}],
                         ids=["no_key", "wrong_key", "basic_scheme", "no_scheme", "wrong_x_api_key"])
def test_without_the_key_every_route_but_health_answers_401(secured, method, path, body, headers):
    status, out = call(secured, method, path, body, headers=headers)
    assert status == 401 and out == {"error": "Unauthorized"}


@pytest.mark.parametrize(("method", "path", "body"), READ_ONLY, ids=[f"{m} {p}" for m, p, _ in READ_ONLY])
@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"},
                                     {"x-api-key": KEY}], ids=["bearer", "lowercase_scheme", "x_api_key"])
def test_with_the_key_the_routes_answer(secured, method, path, body, headers):
    assert call(secured, method, path, body, headers=headers)[0] == 200


def test_the_refused_calls_changed_nothing(secured):
    # The 401s above included pause, abort and weight updates: the server must still generate.
    assert call(secured, "POST", "/generate", GENERATE, api_key=KEY)[0] == 200
    assert version(secured) == "default"


@pytest.mark.parametrize("path", ["/health", "/health_generate"])
def test_health_routes_stay_open_as_in_sglang(secured, path):
    assert call(secured, "GET", path)[0] == 200


def test_the_client_sends_the_key_and_says_what_a_401_means(secured):
    with SGLangEngine([secured.url], api_key=KEY) as engine:
        [[sample]] = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, seed=1), n=1)
        assert len(sample.response_ids) <= 3 and engine.weight_version() == "default"
        engine.flush_cache()
    with pytest.raises(RolloutError, match=r"/model_info: HTTP 401 \(the server requires an API key"):
        SGLangEngine([secured.url])


# ------------------------------------------------------------------------------------------ faults
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_the_fault_route_does_not_exist_without_enable_fault_injection(secured, method):
    status, _ = call(secured, method, "/luspo/faults", {"exit_after": 1} if method == "POST" else None, api_key=KEY)
    assert status == 404
    assert call(secured, "POST", "/generate", GENERATE, api_key=KEY)[0] == 200  # and nothing was armed


@pytest.mark.parametrize("flags", [["--fault-500-every", "3"], ["--fault-slow-s", "0"], ["--fault-stall-s", "1"]])
def test_fault_flags_are_refused_without_enable_fault_injection(tiny_moe, capsys, flags):
    from luspo_megatron.rollout.local.server import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--hf-dir", str(tiny_moe), "--port", "1", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert flags[0] in err and "--enable-fault-injection" in err


@pytest.mark.parametrize(("flags", "named"), [(["--api-key", " "], "--api-key"), (["--max-n", "0"], "--max-n"),
                                              (["--health-timeout-s", "nan"], "--health-timeout-s"),
                                              (["--context-length", "1"], "--context-length")])
def test_bad_service_flags_are_one_line_errors(tiny_moe, capsys, flags, named):
    from luspo_megatron.rollout.local.server import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--hf-dir", str(tiny_moe), "--port", "1", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and named in err


# -------------------------------------------------------------------------------- get_weights_by_name
def test_get_weights_by_name_equals_the_safetensors_values_exactly(secured, tiny_moe):
    # Every checkpoint tensor, under its HF name (experts one by one, though the model fuses them).
    expected = files(tiny_moe)
    assert len(expected) > 20
    assert_holds(secured, expected)


def test_get_weights_by_name_truncates_along_the_first_dimension_like_sglang(secured, tiny_moe):
    # sglang's model runners answer parameter.float().tolist()[:truncate_size].
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    tensor = files(tiny_moe)[name]
    for size in (0, 3, tensor.shape[0] + 5):
        status, values = call(secured, "POST", "/get_weights_by_name", {"name": name, "truncate_size": size},
                              api_key=KEY)
        assert status == 200 and values == tensor.float().tolist()[:size]
    status, values = call(secured, "GET", "/get_weights_by_name", {"name": "model.norm.weight"}, api_key=KEY)
    assert status == 200 and values == files(tiny_moe)["model.norm.weight"].tolist()[:100]  # sglang's default 100


@pytest.mark.parametrize(("body", "named"), [
    ({"name": "model.nothing.weight"}, "model.nothing.weight"),
    ({"name": "model.layers.0.mlp.experts.9.up_proj.weight"}, "experts.9"),  # past the 4 experts
    ({"name": 5}, "name"), ({"name": "model.norm.weight", "truncate_size": -1}, "truncate_size"),
    ({"name": "model.norm.weight", "truncate_size": True}, "truncate_size"),
])
def test_get_weights_by_name_refuses_what_it_cannot_answer(secured, body, named):
    status, out = call(secured, "POST", "/get_weights_by_name", body, api_key=KEY)
    assert status == 400 and named in out["error"]["message"]


# ------------------------------------------------------------------------------ updates from disk
def copy_with(source: Path, target: Path, edit) -> Path:
    """A copy of ``source`` with its tensors passed through ``edit(dict) -> dict`` (one shard)."""
    target.mkdir(parents=True)
    shutil.copyfile(source / "config.json", target / "config.json")
    save_file(edit(dict(load_file(str(next(source.glob("*.safetensors")))))), str(target / "model.safetensors"))
    return target


def other_vocab(source: Path, target: Path) -> Path:
    """The same architecture with a vocabulary of 2·VOCAB (fresh weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    config.vocab_size = 2 * VOCAB
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    return target


DROPPED = "model.layers.1.mlp.experts.3.down_proj.weight"


def _partial(allowed, tiny_b):
    return copy_with(tiny_b, allowed / "partial", lambda t: {k: v for k, v in t.items() if k != DROPPED})


def _extra(allowed, tiny_b):
    return copy_with(tiny_b, allowed / "extra", lambda t: {**t, "model.layers.9.extra.weight": torch.zeros(2)})


def _misshapen(allowed, tiny_b):
    return copy_with(tiny_b, allowed / "misshapen", lambda t: {**t, "model.norm.weight": torch.zeros(5)})


def _integer(allowed, tiny_b):
    return copy_with(tiny_b, allowed / "integer", lambda t: {**t, "model.norm.weight": t["model.norm.weight"].long()})


def _truncated(allowed, tiny_b):
    target = copy_with(tiny_b, allowed / "truncated", lambda t: t)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    return target


def _index_lies(allowed, tiny_b):
    target = copy_with(tiny_b, allowed / "index_lies", lambda t: t)
    names = dict.fromkeys(files(tiny_b), "model.safetensors")
    names.pop(DROPPED)
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    return target


def _vocab(allowed, tiny_b):
    return other_vocab(tiny_b, allowed / "vocab")


def _outside(allowed, tiny_b):
    return tiny_b  # a complete, valid directory, but not under --allowed-weight-dirs


def _dotdot(allowed, tiny_b):
    return allowed / ".." / tiny_b.name  # resolves outside


def _symlinked_dir(allowed, tiny_b):
    (allowed / "link").symlink_to(tiny_b, target_is_directory=True)
    return allowed / "link"


def _symlinked_file(allowed, tiny_b):
    target = allowed / "file_link"
    target.mkdir()
    shutil.copyfile(tiny_b / "config.json", target / "config.json")
    (target / "model.safetensors").symlink_to(next(tiny_b.glob("*.safetensors")))
    return target


def _missing(allowed, tiny_b):
    return allowed / "nothing_here"


REFUSED = [
    (_partial, f"missing tensor {DROPPED}"), (_extra, "unknown tensor model.layers.9.extra.weight"),
    (_misshapen, "model.norm.weight: shape [5]"), (_integer, "model.norm.weight: dtype I64"),
    (_truncated, "model.safetensors"), (_index_lies, DROPPED), (_vocab, "vocab_size"),
    (_outside, "--allowed-weight-dirs"), (_dotdot, "--allowed-weight-dirs"), (_symlinked_dir, "--allowed-weight-dirs"),
    (_symlinked_file, "--allowed-weight-dirs"), (_missing, "is not a directory"),
]


@pytest.mark.parametrize(("build", "named"), REFUSED, ids=[b.__name__.strip("_") for b, _ in REFUSED])
def test_a_disk_update_that_is_not_complete_and_allowed_is_refused_and_changes_nothing(
        secured, allowed, tiny_moe, tiny_moe_b, build, named):
    # Every test of this module leaves the server holding tiny_moe.
    before_version = version(secured)
    path = build(allowed, tiny_moe_b)
    status, out = call(secured, "POST", "/update_weights_from_disk",
                       {"model_path": str(path), "weight_version": "refused"}, api_key=KEY)
    assert status == 400 and out["success"] is False and named in out["message"], out
    assert version(secured) == before_version
    assert_holds(secured, files(tiny_moe))
    # The old code's failure mode: a directory missing one tensor "succeeded" and left it random.
    assert call(secured, "POST", "/generate", GENERATE, api_key=KEY)[0] == 200


def test_a_complete_allowed_directory_is_loaded_exactly(secured, allowed, tiny_moe, tiny_moe_b):
    status, out = call(secured, "POST", "/update_weights_from_disk",
                       {"model_path": str(allowed / "b"), "weight_version": "b1"}, api_key=KEY)
    assert status == 200 and out["success"] is True, out
    assert version(secured) == "b1"
    assert_holds(secured, files(tiny_moe_b))
    # Back, through a path with a harmless ".." that stays inside the allowed root.
    status, out = call(secured, "POST", "/update_weights_from_disk",
                       {"model_path": str(allowed / "b" / ".." / "a"), "weight_version": "a1"}, api_key=KEY)
    assert status == 200, out
    assert version(secured) == "a1"
    assert_holds(secured, files(tiny_moe))


# ----------------------------------------------------------------------- updates from tensor buckets
def test_a_bad_tensor_bucket_is_refused_before_any_of_it_is_copied(secured, tiny_moe, tiny_moe_b):
    before_version = version(secured)
    named = hf_named_tensors(tiny_moe_b)
    good = named[:5]  # valid tensors, sent with one bad one in the same bucket
    for bad in ([("model.nothing.weight", torch.zeros(3))], [("model.norm.weight", torch.zeros(5))],
                [(named[6][0], named[6][1].long())], [good[0]]):
        with SGLangEngine([secured.url], api_key=KEY) as engine:
            with pytest.raises(RolloutError, match=r"update_weights_from_tensor: HTTP 400"):
                engine.update_weights_from_tensor([good + bad], "t1")
        assert version(secured) == before_version
        assert_holds(secured, files(tiny_moe))


# ---------------------------------------------------------------------- updates from distributed
def test_the_update_group_binds_the_server_host_and_a_bad_bucket_keeps_it_in_step(secured, allowed, tiny_moe,
                                                                                  tiny_moe_b):
    with SGLangEngine([secured.url], api_key=KEY) as engine:
        engine.init_weights_update_group("127.0.0.1", free_port(), group_name="secured", backend="gloo",
                                         timeout_s=60)
        try:
            listening = {c.laddr.ip for c in psutil.Process(secured.proc.pid).net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN}
            assert listening == {HOST}  # HTTP and gloo alike: nothing on another interface
            before = version(secured)
            bad = [("model.nothing.weight", torch.zeros(4)), ("model.norm.weight", torch.zeros(32))]
            with pytest.raises(RolloutError, match="unknown tensor model.nothing.weight"):
                engine.update_weights_from_distributed([bad], "d0")
            assert version(secured) == before
            assert_holds(secured, files(tiny_moe))
            # The refused bucket was still received: the next broadcast lines up and applies.
            engine.update_weights_from_distributed(bucket_by_bytes(hf_named_tensors(tiny_moe_b), 48 * 1024), "d1")
            assert version(secured) == "d1"
            assert_holds(secured, files(tiny_moe_b))
        finally:
            engine.destroy_weights_update_group()
    status, _ = call(secured, "POST", "/update_weights_from_disk", {"model_path": str(allowed / "a")}, api_key=KEY)
    assert status == 200
    assert_holds(secured, files(tiny_moe))
