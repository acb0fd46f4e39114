"""The main job: RL post-training of a Megatron-Core model against SGLang rollouts.

    python tools/train_luspo.py                                   # embedded default: examples/tiny_cpu.yaml
    torchrun --nproc-per-node 2 tools/train_luspo.py --tp 2       # the same, tensor parallel on 2 CPU ranks
    torchrun --nnodes 4 --nproc-per-node 8 tools/train_luspo.py --config examples/qwen3_30b_a3b_luspo.yaml \\
        --tp 4 --ep 8 --hf-checkpoint /models/Qwen3-30B-A3B --load /ckpt/q3 --save /ckpt/q3 \\
        --rollout-engine sglang --sglang-router http://router:30000

A bad flag, config value, dataset, checkpoint or server reply is reported in one line and the
exit status is 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "examples" / "tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from luspo_megatron.config import config_to_yaml, load_config, validate_paths
    from luspo_megatron.errors import UserError

    prog = Path(sys.argv[0]).name
    try:
        config, args = load_config(argv, default_config=DEFAULT_CONFIG)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    try:  # the files and directories the config names, on every rank, before any process group exists
        validate_paths(config)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    # megatron-core announces at import that it falls back from TE/Apex to torch (expected on CPU),
    # once per module; keep stderr for what needs reading.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("megatron", "torch.distributed", "math_verify", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from luspo_megatron.trainer import Trainer, TrainingDiverged

    try:
        Trainer(config).run()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # the guard dist_checkpointing's spawned writer needs
    sys.exit(main())
