"""Megatron-Core training engine (docs/design.md §3, ``parallel/``).

- ``cpu_compat``: the CPU/gloo redirections for megatron-core 0.16.1 (applied by ``init_parallel``).
- ``state``: ``validate_parallel`` / ``init_parallel`` (process groups, seeds).
- ``logprobs``: chunked vocab-parallel log-prob + entropy.
- ``microbatch``: ``MicroBatch`` (token-aligned, what the trainer builds) and its TP/CP layout.
- ``train``: ``wrap_model``, ``build_optimizer``, ``train_step``, ``compute_logprobs``.
- ``policy``: ``MegatronPolicy``, all of the above from a ``RunConfig``.

Importing this package imports nothing else; import the submodules you need.
"""
