"""Prompt datasets (JSONL / Parquet; DAPO-verl and flat schemas), chat templates, a resumable
shuffled iterator, and packing of rollouts into micro-batches. Never imports megatron."""
