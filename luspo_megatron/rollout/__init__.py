"""Rollouts: the engine protocol, the SGLang HTTP client, our SGLang-API server, weight export and sync.

Never imports megatron (docs/design.md §3); the trainer wires this package to the Megatron policy.
"""
