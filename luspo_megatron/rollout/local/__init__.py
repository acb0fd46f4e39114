"""Our SGLang-API rollout server, for CPU runs and tests: the production client cannot tell it from SGLang.

- ``server``: the aiohttp app (SGLang's native HTTP API) around a transformers model;
- ``generation``: the batched sampler behind it (transformers' forward, our sampling and log-probs);
- ``faults``: fault injection for tests;
- ``process``: start / stop servers as subprocesses; ``supervisor``: restart a server that died;
- ``inprocess``: the same generator in the trainer's process (no HTTP), for toy runs.
"""
