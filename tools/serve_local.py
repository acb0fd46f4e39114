"""Serve a Hugging Face model directory over SGLang's native HTTP API (CPU or one GPU).

    python tools/serve_local.py --hf-dir DIR --port PORT [--host 127.0.0.1] [--device cuda]

See luspo_megatron/rollout/local/server.py for the endpoints and --help for the fault-injection flags.
"""

from luspo_megatron.rollout.local.server import main

if __name__ == "__main__":
    main()
