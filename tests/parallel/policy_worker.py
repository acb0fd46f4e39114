"""Worker (torchrun, 1 process): the trainer-facing MegatronPolicy on the default tiny preset
(real Qwen3 vocabulary): initial weights, a LUSPO step, and the weight-sync export checked
against transformers running the exported weights."""

import argparse
import tempfile

import torch
import transformers
from safetensors.torch import save_file

from luspo_megatron.config import config_from_dict
from luspo_megatron.data.packing import MicroBatch
from luspo_megatron.models import transformers_config
from luspo_megatron.models.initial import hf_config_of, initial_hf_state_dict
from luspo_megatron.parallel.policy import MegatronPolicy

TEMPERATURE = 0.8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = config_from_dict({
        "seed": 7, "rollout": {"temperature": TEMPERATURE, "max_response_len": 16},
        "optimizer": {"lr": 1e-3, "lr_warmup_iters": 2},
    })
    policy = MegatronPolicy.from_config(config, total_steps=10)
    initial = initial_hf_state_dict(hf_config_of(config), config.seed)
    before = {k: v.clone() for k, v in policy.hf_weights()}
    gen = torch.Generator().manual_seed(0)
    lengths = [9, 14, 11]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    mask = torch.zeros(cu[-1].item())
    for start, length in zip(cu[:-1].tolist(), lengths):
        mask[start + 4: start + length] = 1
    batch = [MicroBatch(tokens=torch.randint(0, 151936, (int(cu[-1]),), generator=gen), cu_seqlens=cu,
                        loss_mask=mask, advantages=torch.tensor([1.0, -1.0, 0.5]))]
    batch[0].old_logp = policy.compute_logprobs(batch)[0]
    metrics = [policy.train_step(batch) for _ in range(3)]  # lr warms up 0 -> 5e-4 -> 1e-3
    after = {k: v.clone() for k, v in policy.hf_weights()}
    logp = policy.compute_logprobs(batch)[0]
    poisoned = MicroBatch(tokens=batch[0].tokens, cu_seqlens=cu, loss_mask=mask, old_logp=batch[0].old_logp,
                          advantages=torch.tensor([float("nan"), 1.0, 0.5]))
    nan_step = policy.train_step([poisoned])  # a NaN gradient: the update is skipped
    unchanged = {k: v.clone() for k, v in policy.hf_weights()}
    skipped_kept_weights = all(torch.equal(unchanged[k], after[k]) for k in after)
    # The weight-sync path: the exported tensors as a HF directory, read back by transformers.
    with tempfile.TemporaryDirectory() as directory:
        save_file(after, f"{directory}/model.safetensors", metadata={"format": "pt"})
        transformers_config(hf_config_of(config)).save_pretrained(directory)
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    theirs = []
    for start, length in zip(cu[:-1].tolist(), lengths):
        tokens = batch[0].tokens[start: start + length]
        with torch.no_grad():
            logits = hf(input_ids=tokens[None]).logits[0, :-1] / TEMPERATURE
        theirs.append(torch.cat([torch.zeros(1), torch.log_softmax(logits, -1).gather(1, tokens[1:, None])[:, 0]]))
    torch.save({
        "initial_equal": before.keys() == initial.keys() and all(torch.equal(before[k], initial[k]) for k in initial),
        "changed": max(float((after[k] - before[k]).abs().max()) for k in before),
        "metrics": metrics, "logp_vs_transformers": float((logp - torch.cat(theirs)).abs().max()),
        "vocab": policy.arch.vocab_size, "nan_step": nan_step, "skipped_kept_weights": skipped_kept_weights,
    }, args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
