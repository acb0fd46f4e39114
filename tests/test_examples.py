"""The LUSPO paper's recipes (examples/paper_*.yaml): each resolves with tools/train_luspo.py
--print-config to the paper's stated settings, and the three files of a model differ only in the loss."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from luspo_megatron.config.loss import DEFAULT_CLIPS

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"qwen25_7b": "Qwen2.5-7B", "qwen3_30b_a3b": "Qwen3-30B-A3B-Instruct"}
LOSSES = ("grpo", "gspo", "luspo")
PAPER = [ROOT / "examples" / f"paper_{model}_{loss}.yaml" for model in MODELS for loss in LOSSES]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_resolves_to_the_papers_settings(path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_luspo.py"), "--config", str(path),
                           "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    model, loss = path.stem.removeprefix("paper_").rsplit("_", 1)
    head = path.read_text().split("\ntrain_iters:")[0]
    assert MODELS[model] in head and "Layout:" in head and "GPU" in head  # the header names model and hardware
    opt, roll, alg = cfg["optimizer"], cfg["rollout"], cfg["algorithm"]
    assert (opt["lr"], opt["lr_warmup_iters"]) == (1e-6, 20)  # AdamW lr 1e-6, 20 warm-up steps
    assert opt["global_batch_size"] == 16 * alg["n_samples_per_prompt"]  # mini-batch: 16 prompts
    assert roll["max_response_len"] == 32768 and cfg["eval"]["eval_max_response_len"] is None  # same for eval
    assert alg["loss"] == loss and alg["eps_clip"] is None and alg["eps_clip_high"] is None  # DEFAULT_CLIPS
    assert loss in DEFAULT_CLIPS
    assert cfg["data"]["prompt_data"].endswith("dapo-math-17k.parquet")
    assert [e.split("=")[0] for e in cfg["eval"]["eval_data"]] == ["aime24", "aime25", "math500"]
    assert all(e.endswith(".parquet") for e in cfg["eval"]["eval_data"])


@pytest.mark.parametrize("model", MODELS)
def test_the_three_recipes_of_a_model_differ_only_in_the_loss(model):
    def without_loss(loss: str) -> dict:
        raw = yaml.safe_load((ROOT / "examples" / f"paper_{model}_{loss}.yaml").read_text())
        assert raw["algorithm"].pop("loss") == loss
        text = yaml.safe_dump(raw).replace(loss, "LOSS")  # the log and checkpoint paths name the loss
        return yaml.safe_load(text)

    first, *rest = (without_loss(loss) for loss in LOSSES)
    assert all(other == first for other in rest)
