"""Convert a Hugging Face Qwen3-MoE / Qwen3 / Qwen2.5 checkpoint into a Megatron-Core
``dist_checkpointing`` checkpoint that any TP/PP/EP layout loads (resharding on load).

    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-30B-A3B --save ckpt/qwen3-30b-a3b
    torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py --hf-dir ... --save ... \\
        --target-tp 4 --target-ep 8

Streams the safetensors shard by shard (each rank converts its share). ``--target-*`` chunk the
stored tensors for that layout, so that loading in it reads each rank's bytes contiguously.
The default dtype is the source's own, so HF -> Megatron -> HF is bit-identical.
Exit status 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import sys

from luspo_megatron.checkpoint import cli
from luspo_megatron.checkpoint.convert import DTYPE_FLAGS, TargetLayout, distributed_session
from luspo_megatron.checkpoint.hf_import import convert_hf_to_megatron, prepare_hf_import


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json + safetensors).")
    parser.add_argument("--save", required=True, help="Output directory (written as <save>.tmp, then renamed).")
    parser.add_argument("--target-tp", type=int, default=1, help="Tensor parallel size to chunk for.")
    parser.add_argument("--target-pp", type=int, default=1, help="Pipeline stages (checked: must divide the layers).")
    parser.add_argument("--target-ep", type=int, default=1,
                        help="Expert parallel size (checked: must divide the experts).")
    parser.add_argument("--target-etp", type=int, default=None,
                        help="Expert tensor parallel size; default: --target-tp.")
    parser.add_argument("--dtype", choices=sorted(DTYPE_FLAGS), default=None,
                        help="Stored dtype; default: the source's own (lossless round trip).")
    parser.add_argument("--allow-extra", action="store_true", help="Ignore source tensors the model does not use.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --save directory.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = TargetLayout(args.target_tp, args.target_pp, args.target_ep, args.target_etp)

    def body() -> None:
        plan = prepare_hf_import(args.hf_dir, args.save, target, args.overwrite, args.allow_extra)
        with distributed_session() as (rank, world):
            report = convert_hf_to_megatron(plan, target, DTYPE_FLAGS.get(args.dtype), progress=not args.no_progress)
        if rank == 0:
            print(f"wrote {args.save}: {report['tensors']} Hugging Face tensors, {report['bytes'] / 1e9:.3f} GB "
                  f"in {report['seconds']:.1f} s on {world} rank(s)")

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
