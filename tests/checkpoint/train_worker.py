"""Worker (torchrun): a small real Megatron training loop, for checkpoint resume tests.

megatron DDP + distributed optimizer (Adam) + an LR scheduler + ``get_forward_backward_func()``, on
a tiny Qwen3-MoE whose initial weights come from a fixed HF model (so every layout starts equal).
The loss is the mean next-token log-loss of packed sequences from vocab-parallel cross-entropy,
plus Megatron's MoE aux loss. Batches come from the "data iterator" position (``extra_state``);
RNG restoration is checked with fingerprints (draws from every generator a checkpoint restores).

Modes (losses of every step, RNG fingerprints and resume reports are saved to ``--out``):
  suite   (the saving layout) A: 6 uninterrupted steps, RNG fingerprint after step 3.
          B: 1 step, save, 2 steps, save with keep_last=1 (prunes step 1), 3 more steps.
          C: a model with other weights loads step 3, fingerprint, 3 steps.
          Then the results are written and a save of step 6 SIGKILLs rank 0 in mid-write.
  resume  (another layout) R: load the latest complete checkpoint, 3 steps.
          F: the same without the optimizer state (a control that must differ).
          X: export the training checkpoint with tools/convert_megatron_to_hf.py (config from the
             checkpoint itself); logits of transformers on it vs our model loaded from the checkpoint.
"""

import argparse
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch

from luspo_megatron.runtime import cpu_compat

SEQ_LEN, SEQS_PER_MICROBATCH, GLOBAL_SEQS = 16, 2, 4


def rng_fingerprint():
    """Draws from every RNG a checkpoint restores, without disturbing them; one per rank."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(), tracker.get_states())
    with tracker.fork():
        tracked = torch.rand(2)
    out = (random.random(), float(np.random.rand()), torch.rand(2).tolist(), tracked.tolist())
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])
    tracker.set_states(saved[3])
    every_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every_rank, out)
    return every_rank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", required=True, choices=("suite", "resume"))
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--no-distributed-optimizer", action="store_true", help="megatron's regular optimizer")
    args = parser.parse_args()

    cpu_compat.apply()
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from luspo_megatron.checkpoint.training import load_checkpoint, load_model_weights, save_checkpoint
    from luspo_megatron.config import ParallelConfig
    from luspo_megatron.errors import CheckpointError
    from luspo_megatron.models import arch_from_hf, tiny_qwen3_moe
    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.hf_map import hf_live_to_disk
    from luspo_megatron.models.megatron_config import transformer_config
    from luspo_megatron.models.weights import load_hf_weights
    from tests.checkpoint.helpers import tool_main
    from tests.checkpoint.logits import megatron_logits, sequences, transformers_logits
    from tests.hf_models import build_hf_model

    # expert TP = TP (megatron's default). Note: tp > 1 with ep = etp = 1 would leave the experts
    # replicated over TP ranks in the dense optimizer, whose gradients are never reduced across them.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp, expert_model_parallel_size=args.ep)
    seed = 1234
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    hf_config = tiny_qwen3_moe(vocab_size=128, num_hidden_layers=2, mlp_only_layers=[1])
    arch = arch_from_hf(hf_config)
    distributed = not args.no_distributed_optimizer
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, expert_model_parallel_size=args.ep,
                              use_distributed_optimizer=distributed)
    tconfig = transformer_config(arch, parallel)

    def build(load_hf: bool):
        chunks = build_model(arch, tconfig, use_transformer_engine=False)
        if load_hf:
            load_hf_weights(chunks, arch, hf_live_to_disk(build_hf_model(hf_config, seed=7).state_dict()))
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed, grad_reduce_in_fp32=True)
        model = [DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=c) for c in chunks]
        tconfig.finalize_model_grads_func = finalize_model_grads
        opt_config = OptimizerConfig(optimizer="adam", lr=3e-3, min_lr=3e-4, weight_decay=0.01, clip_grad=1.0,
                                     use_distributed_optimizer=distributed, params_dtype=torch.float32)
        optimizer = get_megatron_optimizer(opt_config, model)
        scheduler = OptimizerParamScheduler(optimizer, init_lr=3e-4, max_lr=3e-3, min_lr=3e-4,
                                            lr_warmup_steps=2, lr_decay_steps=8, lr_decay_style="cosine",
                                            start_wd=0.01, end_wd=0.01, wd_incr_steps=8, wd_incr_style="constant")
        return model, optimizer, scheduler

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()

    def batch(index: int) -> list:
        """This DP rank's micro-batches of global batch ``index``: (tokens, labels) of packed sequences."""
        gen = torch.Generator().manual_seed(1000 + index)
        tokens = torch.randint(0, arch.vocab_size, (GLOBAL_SEQS, SEQ_LEN + 1), generator=gen)
        mine = tokens[dp_rank::dp_size]
        return [mine[i:i + SEQS_PER_MICROBATCH] for i in range(0, len(mine), SEQS_PER_MICROBATCH)]

    cu = torch.arange(0, SEQS_PER_MICROBATCH + 1, dtype=torch.int32) * SEQ_LEN
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=SEQ_LEN, max_seqlen_kv=SEQ_LEN)

    def forward_step(data_iterator, model):
        seqs = next(data_iterator)
        tokens, labels = seqs[:, :-1].reshape(1, -1), seqs[:, 1:].reshape(1, -1)
        per_token = model(tokens, None, None, labels=labels, packed_seq_params=packed)  # -log p, [1, T]

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach().clone()}  # megatron divides `loss` in place

        return per_token, loss_func

    def train(model, optimizer, scheduler, data: dict, steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            micro = batch(data["index"])
            data["index"] += 1
            for m in model:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(micro), model=model,
                num_microbatches=len(micro), seq_length=SEQ_LEN * SEQS_PER_MICROBATCH, micro_batch_size=1,
                forward_only=False)
            ok, _, _ = optimizer.step()
            assert ok
            scheduler.step(increment=1)
            loss = torch.stack([o["loss"] for o in out]).mean()
            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            losses.append((loss / dp_size).item())
        return losses

    def save(model, optimizer, scheduler, data, step, **kwargs):
        save_checkpoint(args.ckpt, step, model, optimizer, scheduler, extra_state=data, hf_config=hf_config,
                        **kwargs)

    def resume(load_optimizer: bool):
        model, optimizer, scheduler = build(load_hf=False)  # other weights: the load must replace them
        resumed = load_checkpoint(args.ckpt, model, optimizer, scheduler, load_optimizer=load_optimizer)
        report = {"step": resumed.step, "extra_state": resumed.extra_state, "path": resumed.path.name,
                  "optimizer_restored": resumed.optimizer_restored, "rng_restored": resumed.rng_restored,
                  "skipped": [p.name for p in resumed.skipped], "rng": rng_fingerprint(),
                  "verified": resumed.verified}
        report["losses"] = train(model, optimizer, scheduler, dict(resumed.extra_state), 3)
        return report

    rank = torch.distributed.get_rank()
    result = {"layout": (args.tp, args.ep)}
    if args.mode == "suite":
        model, optimizer, scheduler = build(load_hf=True)
        data = {"index": 0}
        result["A"] = train(model, optimizer, scheduler, data, 3)
        result["rng_after_3"] = rng_fingerprint()
        result["A"] += train(model, optimizer, scheduler, data, 3)

        model, optimizer, scheduler = build(load_hf=True)
        data = {"index": 0}
        result["B"] = train(model, optimizer, scheduler, data, 1)
        save(model, optimizer, scheduler, data, 1)
        result["B"] += train(model, optimizer, scheduler, data, 2)
        save(model, optimizer, scheduler, data, 3, keep_last=1)
        result["dir_after_save"] = sorted(os.listdir(args.ckpt))
        result["B"] += train(model, optimizer, scheduler, data, 3)

        result["C"] = resume(load_optimizer=True)
        result["crash_armed"] = True
        if rank == 0:
            torch.save(result, args.out)
        torch.distributed.barrier()
        if rank == 0:
            arm_crash()
        save(model, optimizer, scheduler, data, 6)
        raise AssertionError("the crash hook did not fire")
    result["R"] = resume(load_optimizer=True)
    result["F"] = resume(load_optimizer=False)
    result["V"] = verify_on_every_rank(Path(args.ckpt) / "iter_0000003", Path(args.out).with_name("damaged"))

    # L: the same checkpoint as the version before checksums wrote it (format 1, no checksums.json)
    legacy = Path(args.out).with_name("legacy")
    if rank == 0:
        make_legacy(Path(args.ckpt), legacy)
    torch.distributed.barrier()
    model, optimizer, scheduler = build(load_hf=False)
    resumed = load_checkpoint(legacy, model, optimizer, scheduler)
    result["L"] = {"step": resumed.step, "verified": resumed.verified, "losses": train(
        model, optimizer, scheduler, dict(resumed.extra_state), 3)}
    # M: a model with another vocabulary loading this checkpoint
    other_arch = arch_from_hf(tiny_qwen3_moe(vocab_size=256, num_hidden_layers=2, mlp_only_layers=[1]))
    other = build_model(other_arch, transformer_config(other_arch, parallel), use_transformer_engine=False)
    try:
        load_checkpoint(args.ckpt, other)
        result["M"] = None
    except CheckpointError as err:
        result["M"] = str(err)

    chunks = build_model(arch, tconfig, use_transformer_engine=False)
    load_model_weights(args.ckpt, chunks)  # the model part of the latest training checkpoint
    seqs = sequences(arch.vocab_size)
    ours = megatron_logits(chunks[0], seqs)
    parallel_state.destroy_model_parallel()  # the tool needs the one-process layout's groups
    exported = Path(args.out).with_name("exported_hf")
    result["X"] = {"rc": tool_main("convert_megatron_to_hf")(["--load", args.ckpt, "--save", str(exported),
                                                              "--no-progress"])}
    if rank == 0:
        from transformers import AutoModelForCausalLM

        theirs = transformers_logits(AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32), seqs)
        result["X"].update(max_abs_diff=(ours - theirs).abs().max().item(), logit_scale=theirs.abs().max().item())
    if rank == 0:
        torch.save(result, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def verify_on_every_rank(checkpoint: Path, copy: Path) -> dict:
    """Every rank verifies the checkpoint, then a copy with 4 KiB of ``__1_0.distcp`` flipped (same
    size: only hashing finds it, on the one rank whose slice holds the file). Returns every rank's
    verdicts and the files each rank hashed."""
    import shutil

    from luspo_megatron.checkpoint import integrity

    if torch.distributed.get_rank() == 0:
        shutil.copytree(checkpoint, copy)
        data = bytearray((copy / "__1_0.distcp").read_bytes())
        data[1000:5096] = bytes(b ^ 0xFF for b in data[1000:5096])
        (copy / "__1_0.distcp").write_bytes(bytes(data))
    torch.distributed.barrier()
    hashed: list[str] = []
    original = integrity.file_record
    integrity.file_record = lambda path: hashed.append(Path(path).name) or original(path)
    verdicts = [(v.status, v.problem) for v in (integrity.verify(checkpoint), integrity.verify(copy))]
    integrity.file_record = original
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, (verdicts, sorted(set(hashed))))
    return {"verdicts": [v for v, _ in every], "hashed": [h for _, h in every]}


def make_legacy(source: Path, dest: Path) -> None:
    """A copy of a save directory as the version before checksums wrote it."""
    import shutil

    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.tmp", "verified"))
    for directory in dest.glob("iter_*"):
        (directory / "checksums.json").unlink()
        common = torch.load(directory / "common.pt", weights_only=False)
        common["luspo"]["format_version"] = 1
        torch.save(common, directory / "common.pt")


def arm_crash() -> None:
    """SIGKILL this process in the middle of the next save, after its first item is written."""
    from luspo_megatron.checkpoint import dist_save

    original = dist_save._write_item
    count = [0]

    def write_item(*args, **kwargs):
        count[0] += 1
        if count[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    dist_save._write_item = write_item


if __name__ == "__main__":
    main()
