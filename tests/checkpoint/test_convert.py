"""HF -> Megatron -> HF with the two tools under torchrun (2 ranks): bit-identical round trips,
official config.json, transformers loading, streaming, and logits parity with transformers."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from tests.checkpoint.convert_worker import EXPORT_SHARD_SIZE, FAMILIES, LAYOUTS, SHARDS
from tests.checkpoint.helpers import read_tensors
from tests.distributed import torchrun

WORKER = Path(__file__).with_name("convert_worker.py")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    work = tmp_path_factory.mktemp("convert")
    proc = torchrun(WORKER, 2, ["--out", str(work / "out.pt"), "--work", str(work)])
    return torch.load(work / "out.pt", weights_only=False), work, proc.stdout + proc.stderr


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_megatron_hf_round_trip_is_bit_identical(converted, family):
    results, work, _ = converted
    assert results[family]["export_rc"] == 0
    source, back = read_tensors(work / f"{family}_hf"), read_tensors(work / f"{family}_back")
    assert sorted(back) == sorted(source)
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exported_config_uses_official_keys_and_is_equivalent(converted, family):
    _, work, _ = converted
    exported = json.loads((work / f"{family}_back" / "config.json").read_text())
    assert "rope_theta" in exported and "rope_parameters" not in exported and "dtype" not in exported
    assert exported["torch_dtype"] == "float32"
    if family == "qwen3_moe":
        assert exported["num_experts"] == 8 and "num_local_experts" not in exported
    ignore = {"transformers_version", "dtype", "_name_or_path"}
    theirs = transformers.AutoConfig.from_pretrained(work / f"{family}_hf").to_dict()
    ours = transformers.AutoConfig.from_pretrained(work / f"{family}_back").to_dict()
    assert {k: v for k, v in ours.items() if k not in ignore} == {k: v for k, v in theirs.items() if k not in ignore}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exported_model_loads_in_transformers_with_identical_logits(converted, family):
    _, work, _ = converted
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    logits = []
    for name in (f"{family}_hf", f"{family}_back"):
        model = transformers.AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(input_ids=tokens).logits)
    assert logits[0].abs().max() > 0.1
    assert torch.equal(logits[0], logits[1])


def test_export_uses_the_on_disk_per_expert_names_sglang_loads(converted):
    _, work, _ = converted
    index = json.loads((work / "qwen3_moe_back" / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert names == set(read_tensors(work / "qwen3_moe_hf"))  # save_pretrained's own (on-disk) names
    for e in range(8):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.0.mlp.experts.{e}.{proj}.weight" in names
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") for n in names)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_is_sharded_at_max_shard_size_with_an_index(converted, family):
    _, work, _ = converted
    back = work / f"{family}_back"
    index = json.loads((back / "model.safetensors.index.json").read_text())
    files = sorted(back.glob("*.safetensors"))
    limit = int(EXPORT_SHARD_SIZE.removesuffix("KB")) * 1000
    assert len(files) > 1 and set(index["weight_map"].values()) == {f.name for f in files}
    sizes = []
    for file in files:
        with safe_open(str(file), "pt") as handle:
            tensors = [handle.get_tensor(n) for n in handle.keys()]
        size = sum(t.numel() * t.element_size() for t in tensors)
        assert size <= limit or len(tensors) == 1, file.name  # a bigger tensor gets a file of its own
        sizes.append(size)
    assert index["metadata"]["total_size"] == sum(sizes)


def test_manifest_holds_source_config_count_and_every_source_checksum(converted):
    _, work, _ = converted
    manifest = json.loads((work / "qwen3_moe_megatron" / "luspo_manifest.json").read_text())
    source = read_tensors(work / "qwen3_moe_hf")
    assert manifest["source_config"] == json.loads((work / "qwen3_moe_hf" / "config.json").read_text())
    assert manifest["tensor_count"] == len(source)
    sums = manifest["checksums"]["tensors"]
    for name, tensor in source.items():  # recomputed here from the raw bytes
        assert sums[name] == hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy()).hexdigest(), name


def test_conversion_streams_twenty_shards_holding_at_most_two_at_once(converted):
    results, work, _ = converted
    files = sorted((work / "qwen3_moe_hf").glob("*.safetensors"))
    assert len(files) == SHARDS["qwen3_moe"] == 20
    shard_bytes = sorted(sum(t.numel() * t.element_size() for t in read_tensors_of(f).values()) for f in files)
    total = sum(shard_bytes)
    reports = results["qwen3_moe"]["reports"]
    assert sum(r["rank_bytes_read"] for r in reports) == total  # every tensor read once, by one rank
    for report in reports:
        assert report["rank_bytes_read"] > 0  # both ranks converted a share
        assert report["peak_live_files"] <= 2  # tensors of at most two source files alive at any time
        assert report["peak_live_bytes"] <= shard_bytes[-1] + shard_bytes[-2]  # ... and two shards' bytes
    assert {p.name for p in (work / "qwen3_moe_megatron").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}


def read_tensors_of(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as handle:
        return {n: handle.get_tensor(n) for n in handle.keys()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_megatron_logits_from_converted_checkpoint_match_transformers(converted, family, layout):
    result = converted[0][family]["logits"][layout]
    assert result["logit_scale"] > 0.1
    assert result["max_abs_diff"] <= 1e-5, result


def test_allow_extra_converts_and_records_the_ignored_tensor(converted):
    results, work, _ = converted
    assert results["qwen25"]["extra_rc"] == 0
    manifest = json.loads((work / "extra_megatron" / "luspo_manifest.json").read_text())
    assert manifest["ignored_extra_tensors"] == ["model.unused.weight"]


def test_dtype_export_casts_every_tensor(converted):
    results, work, _ = converted
    assert results["qwen3"]["bf16_export_rc"] == 0
    source, back = read_tensors(work / "qwen3_hf"), read_tensors(work / "qwen3_back_bf16")
    assert sorted(back) == sorted(source)
    for name, tensor in source.items():
        assert torch.equal(back[name], tensor.to(torch.bfloat16)), name
    assert json.loads((work / "qwen3_back_bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_tools_report_progress_and_verification(converted):
    _, _, output = converted
    assert "HF -> Megatron (rank 0 of 2)" in output  # the progress bar (qwen3 ran with it)
    assert "24 tensors match the source checksums" in output


@pytest.mark.slow
def test_tools_convert_in_one_process_without_torchrun(tmp_path):
    from luspo_megatron.models import tiny_qwen3
    from tests.checkpoint.helpers import TOOLS, write_hf_dir

    source = write_hf_dir(tiny_qwen3(vocab_size=256), tmp_path / "hf", shards=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for argv in (["convert_hf_to_megatron.py", "--hf-dir", tmp_path / "hf", "--save", tmp_path / "megatron"],
                 ["convert_megatron_to_hf.py", "--load", tmp_path / "megatron", "--save", tmp_path / "back"]):
        proc = subprocess.run([sys.executable, str(TOOLS / argv[0]), *map(str, argv[1:]), "--no-progress"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "on 1 rank(s)" in proc.stdout
    back = read_tensors(tmp_path / "back")
    assert sorted(back) == sorted(source) and all(torch.equal(back[n], t) for n, t in source.items())


@pytest.mark.slow
def test_conversion_killed_mid_write_leaves_no_output_that_looks_complete(tmp_path):
    from luspo_megatron.models import tiny_qwen3
    from tests.checkpoint.helpers import TOOLS, write_hf_dir

    write_hf_dir(tiny_qwen3(vocab_size=256), tmp_path / "hf", shards=2)
    argv = ["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "megatron"), "--no-progress"]
    crash = (  # SIGKILL itself once the second tensor is being written
        "import os, signal, sys, runpy\n"
        "from luspo_megatron.checkpoint import dist_save\n"
        "original, count = dist_save._write_item, [0]\n"
        "def write_item(*a, **k):\n"
        "    count[0] += 1\n"
        "    if count[0] == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return original(*a, **k)\n"
        "dist_save._write_item = write_item\n"
        f"sys.argv = {[str(TOOLS / 'convert_hf_to_megatron.py'), *argv]!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", crash], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (tmp_path / "megatron").exists() and (tmp_path / "megatron.tmp").is_dir()
    proc = subprocess.run([sys.executable, str(TOOLS / "convert_hf_to_megatron.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "megatron" / "metadata.json").is_file() and not (tmp_path / "megatron.tmp").exists()
