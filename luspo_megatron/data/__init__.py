"""Prompt datasets (JSONL / Parquet; DAPO-verl and flat schemas), chat templates, a resumable
shuffled iterator, the synthetic arithmetic task of the embedded default, and packing of rollouts into
the one micro-batch type. Never imports megatron."""
