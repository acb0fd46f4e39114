"""Serve a Hugging Face model directory over SGLang's native HTTP API (CPU or one GPU).

    python tools/serve_local.py --hf-dir DIR --port PORT [--host 127.0.0.1] [--device cuda]
        [--api-key KEY] [--allowed-weight-dirs DIR ...] [--max-n 1024] [--context-length N]

See luspo_megatron/rollout/local/server.py for the endpoints, docs/reliability.md §1 for what the
server promises (auth, limits, isolation, all-or-nothing weight updates) and --help for every flag.
``--enable-fault-injection`` and the ``--fault-*`` flags are for tests only.
"""

from luspo_megatron.rollout.local.server import main

if __name__ == "__main__":
    main()
