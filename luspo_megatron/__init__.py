"""luspo-megatron: RLVR post-training of Megatron-Core MoE models with LUSPO, GSPO and GRPO."""

__version__ = "0.1.0"
