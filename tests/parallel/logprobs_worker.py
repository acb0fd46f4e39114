"""Worker (torchrun, 2 processes): vocab-parallel log-probs over a real TP group of 2 (gloo).

Each rank holds half the vocabulary of the same random logits. Rank 0 saves the largest
differences against float64 log_softmax of the full logits: values, entropies, and the gradient
shards of both ranks (all-gathered), for float64 and float32 logits."""

import argparse

import torch
import torch.distributed as dist

from luspo_megatron.parallel.logprobs import vocab_parallel_logprobs

T, V, TEMPERATURE = 45, 96, 0.8


def reference(logits: torch.Tensor, labels, grad_logp, grad_entropy):
    full = logits.detach().double().requires_grad_()
    logsm = torch.log_softmax(full / TEMPERATURE, dim=-1)
    logp = logsm.gather(1, labels[:, None]).squeeze(1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    ((logp * grad_logp).sum() + (entropy * grad_entropy).sum()).backward()
    return logp.detach(), entropy.detach(), full.grad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(T, V, generator=gen, dtype=torch.float64) * 4
    labels = torch.randint(0, V, (T,), generator=gen)
    grad_logp, grad_entropy = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    ref_logp, ref_entropy, ref_grad = reference(logits, labels, grad_logp.double(), grad_entropy.double())
    results = {}
    for dtype in (torch.float64, torch.float32):
        for chunk in (7, T):
            shard = logits.chunk(world, dim=1)[rank].to(dtype).clone().requires_grad_()
            out = vocab_parallel_logprobs(shard, labels, tp_group=dist.group.WORLD, temperature=TEMPERATURE,
                                          with_entropy=True, chunk_size=chunk)
            ((out.logp * grad_logp.to(out.logp.dtype)).sum()
             + (out.entropy * grad_entropy.to(out.logp.dtype)).sum()).backward()
            pieces = [torch.empty_like(shard.grad) for _ in range(world)]
            dist.all_gather(pieces, shard.grad.contiguous())
            grad = torch.cat(pieces, dim=1)
            results[(str(dtype), chunk)] = {
                "logp": float((out.logp.double() - ref_logp).abs().max()),
                "entropy": float((out.entropy.double() - ref_entropy).abs().max()),
                "grad": float((grad.double() - ref_grad).abs().max()),
                "values": out.logp.detach().double(),
            }
    if rank == 0:
        torch.save(results, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
