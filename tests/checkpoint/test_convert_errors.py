"""Bad input: both tools refuse with exit status 2, one line on stderr naming what is wrong, and
write nothing. These refusals happen before any process group exists, so the tools run in-process."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from luspo_megatron.models import tiny_qwen3_moe
from tests.checkpoint.helpers import copy_dir, tool_main, write_hf_dir

CONFIG = tiny_qwen3_moe(vocab_size=128, num_hidden_layers=2)



hf_to_megatron, megatron_to_hf = tool_main("convert_hf_to_megatron"), tool_main("convert_megatron_to_hf")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "model"
    write_hf_dir(CONFIG, directory, shards=2)
    return directory


def refused(main, argv, capsys) -> str:
    """Run a tool; it must exit 2 with exactly one line on stderr. Returns that line."""
    assert main([str(a) for a in argv] + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def edit_tensors(directory: Path, edit, first_shard_only: bool = False) -> None:
    """Apply ``edit(tensors)`` to the safetensors shards of a copied model, index included."""
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    files = sorted(directory.glob("*.safetensors"))
    for file in files[:1] if first_shard_only else files:
        tensors = load_file(file)
        before = set(tensors)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
        for name in before - set(tensors):
            del data["weight_map"][name]
        data["weight_map"].update({name: file.name for name in set(tensors) - before})
    index.write_text(json.dumps(data))


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_model_type_is_refused(hf_dir, tmp_path, capsys):
    bad = copy_dir(hf_dir, tmp_path / "bad")
    edit_config(bad, model_type=None)
    err = refused(hf_to_megatron, ["--hf-dir", bad, "--save", tmp_path / "out"], capsys)
    assert "model_type: expected one of ('qwen3_moe', 'qwen3', 'qwen2'), got None" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_unknown_model_type_is_refused(hf_dir, tmp_path, capsys):
    bad = copy_dir(hf_dir, tmp_path / "bad")
    edit_config(bad, model_type="llama")
    err = refused(hf_to_megatron, ["--hf-dir", bad, "--save", tmp_path / "out"], capsys)
    assert "model_type" in err and "'llama'" in err


def test_shape_mismatch_names_the_tensor_and_both_shapes(hf_dir, tmp_path, capsys):
    bad = copy_dir(hf_dir, tmp_path / "bad")
    name = "model.embed_tokens.weight"

    def shrink(tensors):
        if name in tensors:
            tensors[name] = tensors[name][:100].clone()

    edit_tensors(bad, shrink)
    err = refused(hf_to_megatron, ["--hf-dir", bad, "--save", tmp_path / "out"], capsys)
    assert f"tensor {name} has shape (100, 64), expected (128, 64)" in err


def test_missing_tensors_are_all_named(hf_dir, tmp_path, capsys):
    bad = copy_dir(hf_dir, tmp_path / "bad")
    gone = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight"]
    edit_tensors(bad, lambda tensors: [tensors.pop(n) for n in gone if n in tensors])
    err = refused(hf_to_megatron, ["--hf-dir", bad, "--save", tmp_path / "out"], capsys)
    assert "2 tensors missing" in err and all(n in err for n in gone)


def test_unexpected_extra_tensors_are_named_unless_allowed(hf_dir, tmp_path, capsys):
    bad = copy_dir(hf_dir, tmp_path / "bad")
    extra = {"model.layers.0.mlp.shared_expert.weight": torch.ones(2)}
    edit_tensors(bad, lambda tensors: tensors.update(extra), first_shard_only=True)
    err = refused(hf_to_megatron, ["--hf-dir", bad, "--save", tmp_path / "out"], capsys)
    assert "1 unexpected tensors (pass --allow-extra to ignore them): model.layers.0.mlp.shared_expert.weight" in err


def test_existing_output_directory_is_refused_without_overwrite(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = refused(hf_to_megatron, ["--hf-dir", hf_dir, "--save", out], capsys)
    assert "already exists (pass --overwrite to replace it)" in err
    err = refused(megatron_to_hf, ["--load", hf_dir, "--save", out], capsys)
    assert "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_corrupt_safetensors_header_is_refused(hf_dir, tmp_path, capsys):
    bad = copy_dir(hf_dir, tmp_path / "bad")
    file = sorted(bad.glob("*.safetensors"))[1]
    data = bytearray(file.read_bytes())
    data[8:24] = b"{not json at all"
    file.write_bytes(bytes(data))
    err = refused(hf_to_megatron, ["--hf-dir", bad, "--save", tmp_path / "out"], capsys)
    assert f"{file}: corrupt safetensors header" in err


def test_target_layout_that_does_not_divide_the_model_is_refused(hf_dir, tmp_path, capsys):
    err = refused(hf_to_megatron, ["--hf-dir", hf_dir, "--save", tmp_path / "out", "--target-ep", "3"], capsys)
    assert err == "error: --target-ep: expected a divisor of the 8 experts, got 3"


def test_export_without_a_config_or_of_an_incomplete_save_is_refused(tmp_path, capsys):
    bare = tmp_path / "ckpt"
    bare.mkdir()
    (bare / "metadata.json").write_text("{}")
    err = refused(megatron_to_hf, ["--load", bare, "--save", tmp_path / "hf"], capsys)
    assert "--hf-config-from" in err
    partial = tmp_path / "iter_0000004.tmp"
    partial.mkdir()
    (partial / "metadata.json").write_text("{}")
    err = refused(megatron_to_hf, ["--load", partial, "--save", tmp_path / "hf"], capsys)
    assert "incomplete save" in err
