"""Worker (torchrun, 1 process): the CPU compatibility layer's switches on a real MoE forward.

Runs with LUSPO_CPU_COMPAT_TRACE=1 and LUSPO_CPU_COMPAT_DISABLE=P5: the MoE router forward must
then fail with megatron's own NameError (so the fix is needed and the switch works); after
applying P5 by hand, forward + backward run, and the trace lists the redirected call sites.
"""

import argparse

import torch

from luspo_megatron.runtime import cpu_compat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    first = cpu_compat.apply()
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from luspo_megatron.models import arch_from_hf, tiny_qwen3_moe
    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.megatron_config import transformer_config

    load_state_dict = DistributedOptimizer.load_state_dict
    second = cpu_compat.apply()  # idempotent: nothing re-wrapped
    rewrapped = DistributedOptimizer.load_state_dict is not load_state_dict
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    arch = arch_from_hf(tiny_qwen3_moe(vocab_size=128))
    model = build_model(arch, transformer_config(arch), use_transformer_engine=False)[0]
    tokens = torch.arange(16)[None]
    positions = torch.arange(16)[None]
    try:
        model(tokens, positions, None)
        error = None
    except NameError as err:
        error = str(err)
    cpu_compat.FIXES["P5"].apply()
    model(tokens, positions, None).sum().backward()
    torch.save({
        "first": first, "second": second, "rewrapped": rewrapped, "error_without_p5": error,
        "trace": cpu_compat.redirected_call_sites(),
        "grad_norm": torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm().item(),
    }, args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
