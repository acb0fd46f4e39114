"""The flags of ``tools/serve_local.py`` (also ``python -m luspo_megatron.rollout.local.server``).

Every bad flag is one line and exit status 2. The ``--fault-*`` flags are refused unless
``--enable-fault-injection`` is given (tests only). The API key is ``--api-key`` or, so that it
need not show in the process list, ``$LUSPO_ROLLOUT_API_KEY``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from luspo_megatron.rollout.local.faults import FaultConfig

DTYPES_CLI = ("float32", "bfloat16", "float16")
FAULT_FLAGS = {  # flag -> FaultConfig field
    "--fault-health-503-first": "health_503_first", "--fault-500-every": "error_500_every",
    "--fault-drop-every": "drop_every", "--fault-abort-every": "abort_every", "--fault-slow-s": "slow_s",
    "--fault-stall-s": "stall_s",
}


def build_arg_parser() -> argparse.ArgumentParser:
    from luspo_megatron.config import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="serve_local.py",
                                   description="Serve a Hugging Face model over SGLang's native HTTP API.")
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory to serve.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (and to bind weight-update "
                                                            "group sockets to).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (one GPU).")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES_CLI))
    parser.add_argument("--max-running-requests", type=int, default=64, help="Rows (samples) per batch.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds requests that carry no sampling_seed.")
    parser.add_argument("--weight-version", default="default")
    service = parser.add_argument_group("service")
    service.add_argument("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every route but "
                                                         "/health* (as sglang). Default: $LUSPO_ROLLOUT_API_KEY, "
                                                         "else no key.")
    service.add_argument("--max-n", type=int, default=1024, help="Samples per /generate request, over all its "
                                                                 "prompts.")
    service.add_argument("--max-body-bytes", type=int, default=64 * 2**20, help="Largest request body (HTTP 413 "
                                                                                "past it).")
    service.add_argument("--max-tensor-body-bytes", type=int, default=2**30,
                         help="Largest /update_weights_from_tensor body (tensors pickled by value).")
    service.add_argument("--context-length", type=int, default=None,
                         help="Prompt + response tokens per sample. Default: the model's max_position_embeddings.")
    service.add_argument("--health-timeout-s", type=float, default=20.0,
                         help="/health_generate answers 503 when the model makes no progress this long.")
    service.add_argument("--allowed-weight-dirs", nargs="+", default=None, metavar="DIR",
                         help="Directories /update_weights_from_disk may read (resolved; no symlink or .. escape). "
                              "Default: any.")
    faults = parser.add_argument_group("fault injection (tests only)")
    faults.add_argument("--enable-fault-injection", action="store_true",
                        help="Serve /luspo/faults and honour the --fault-* flags. Never on a shared server.")
    for flag, name in FAULT_FLAGS.items():
        kind = float if name.endswith("_s") else int
        faults.add_argument(flag, type=kind, default=None, metavar="S" if kind is float else "N")
    return parser


def options_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      env_key: str | None) -> dict[str, Any]:
    """:class:`~.server.SGLangAPIServer` keywords from parsed flags; one-line errors (exit 2)."""
    if not Path(args.hf_dir, "config.json").is_file():
        parser.error(f"--hf-dir: expected a Hugging Face model directory with config.json, got {args.hf_dir!r}")
    for flag, value, low in (("--port", args.port, 1), ("--max-running-requests", args.max_running_requests, 1),
                             ("--max-n", args.max_n, 1), ("--max-body-bytes", args.max_body_bytes, 1024),
                             ("--max-tensor-body-bytes", args.max_tensor_body_bytes, 1024)):
        if value < low:
            parser.error(f"{flag}: expected an integer ≥ {low}, got {value}")
    if args.context_length is not None and args.context_length < 2:
        parser.error(f"--context-length: expected an integer ≥ 2, got {args.context_length}")
    if not (math.isfinite(args.health_timeout_s) and args.health_timeout_s > 0):
        parser.error(f"--health-timeout-s: expected a finite number > 0, got {args.health_timeout_s}")
    api_key = args.api_key if args.api_key is not None else env_key
    if api_key is not None and not api_key.strip():
        parser.error("--api-key: expected a non-empty key")
    given = {flag: getattr(args, name_of(flag)) for flag in FAULT_FLAGS if getattr(args, name_of(flag)) is not None}
    if given and not args.enable_fault_injection:
        parser.error(f"{next(iter(given))}: fault injection is for tests; it needs --enable-fault-injection")
    try:
        faults = FaultConfig(**{FAULT_FLAGS[flag]: value for flag, value in given.items()})
    except ValueError as err:
        parser.error(f"--fault-*: {err}")
    return dict(
        max_running_requests=args.max_running_requests, weight_version=args.weight_version, api_key=api_key,
        max_n=args.max_n, max_body_bytes=args.max_body_bytes, max_tensor_body_bytes=args.max_tensor_body_bytes,
        context_length=args.context_length, health_timeout_s=args.health_timeout_s,
        allowed_weight_dirs=args.allowed_weight_dirs, enable_fault_injection=args.enable_fault_injection,
        faults=faults if args.enable_fault_injection else None,
    )


def name_of(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")
