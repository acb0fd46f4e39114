"""What every layer may lean on and nothing of ours lies under (docs/design.md §3).

- ``distributed``: the one process-group start-up, and the small collectives the trainer uses;
- ``durable``: fsync and publish-by-rename, for checkpoints and weight directories;
- ``cpu_compat`` (+ ``cpu_fixes``): megatron-core on a CPU with gloo (imports megatron only when applied).

Importing this package imports none of them.
"""
