"""Convert a Megatron-Core ``dist_checkpointing`` checkpoint (converted, or a training checkpoint
directory: its latest complete step) into a Hugging Face directory: safetensors sharded at 5 GB
with ``model.safetensors.index.json``, ``config.json`` with the official key names, and the
tokenizer files. transformers' ``from_pretrained`` and SGLang's loader read it.

    python tools/convert_megatron_to_hf.py --load ckpt/qwen3-30b-a3b --save hf/qwen3-30b-a3b-rl
    torchrun --nproc-per-node 8 tools/convert_megatron_to_hf.py --load runs/x/checkpoints --save ... \\
        --hf-config-from Qwen3-30B-A3B

The config and tokenizer come from --hf-config-from, else from the checkpoint itself (a converted
checkpoint keeps them in hf/; a training checkpoint saved with its hf_config). Exit status 2 with a
one-line message on bad input.
"""

from __future__ import annotations

import argparse
import sys

from luspo_megatron.checkpoint import cli
from luspo_megatron.checkpoint.convert import DTYPE_FLAGS, distributed_session
from luspo_megatron.checkpoint.hf_export import convert_megatron_to_hf, prepare_megatron_export
from luspo_megatron.checkpoint.safetensors_io import parse_size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="dist checkpoint directory, or a training --save directory.")
    parser.add_argument("--save", required=True, help="Output HF directory (written as <save>.tmp, then renamed).")
    parser.add_argument("--hf-config-from", default=None,
                        help="HF directory whose config.json and tokenizer files to use.")
    parser.add_argument("--dtype", choices=sorted(DTYPE_FLAGS), default=None,
                        help="Output dtype; default: the checkpoint's own.")
    parser.add_argument("--max-shard-size", default="5GB", help="Largest safetensors file (default 5GB).")
    parser.add_argument("--allow-extra", action="store_true",
                        help="Ignore model tensors in the checkpoint that the config does not use.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --save directory.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        max_bytes = parse_size(args.max_shard_size)
        plan = prepare_megatron_export(args.load, args.save, args.hf_config_from, args.overwrite)
        with distributed_session() as (rank, world):
            report = convert_megatron_to_hf(plan, DTYPE_FLAGS.get(args.dtype), max_bytes, args.allow_extra,
                                            progress=not args.no_progress)
        if rank == 0:
            verified = report["verified_against_source"]
            check = f"; {verified} tensors match the source checksums" if verified else ""
            print(f"wrote {args.save}: {report['tensors']} tensors in {report['files']} file(s), "
                  f"{report['bytes'] / 1e9:.3f} GB in {report['seconds']:.1f} s on {world} rank(s){check}")

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
