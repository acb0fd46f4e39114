"""Which weights drew a sample: every sample's ``weight_version`` against the version the trainer pushed.

Versions are the trainer's RL step numbers as strings: after step s it pushes ``str(s)``
(``trainer/weights.py``), a resumed run first pushes the step it resumed at, and an SFT warm-up or
``--pretrained-checkpoint`` pushes "0". A server starts on ``"default"``: the run's assets, that is
version 0. So the samples of RL step s were drawn by version s − 1, and one that is older is
stale: ``--max-weight-staleness N`` (default 0; 1 with ``--async-rollout``, whose samples of step s
are drawn by version s − 2 while step s − 1 trains) tolerates up to N versions, counted in the step's
``stale_samples`` metric; anything older, newer or unknown is an error. A stale sample means an
engine missed a weight sync (a worker that joined the router unseen, a restart that reloaded old
weights); a newer one, that the servers hold weights this run did not push (a previous run's).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from luspo_megatron.errors import RolloutError

INITIAL_VERSION = "default"  # what a server reports before its first update (SGLang's default)


def version_number(version: str) -> int:
    """``"default"`` → 0, ``"7"`` → 7; anything else is a RolloutError (not a version of this trainer)."""
    text = str(version)
    if text == INITIAL_VERSION:
        return 0
    if text.isdigit():
        return int(text)
    raise RolloutError(f"weight_version: expected a step number or {INITIAL_VERSION!r} (the versions this trainer "
                       f"pushes), got {text!r}: the engines hold weights from another source")


def check_weight_versions(samples: Iterable, step: int, max_staleness: int = 0) -> int:
    """Check the ``weight_version`` of every sample drawn for RL step ``step`` (which the trainer
    draws after pushing version ``step − 1``) and return how many are stale, i.e. 1 to
    ``max_staleness`` versions old. Raise a RolloutError naming the versions found otherwise."""
    assert step >= 1 and max_staleness >= 0, (step, max_staleness)
    pushed = step - 1
    found = Counter(str(s.weight_version) for s in samples)
    lags = {version: pushed - version_number(version) for version in found}
    newer = sorted(v for v, lag in lags.items() if lag < 0)
    if newer:
        raise RolloutError(
            f"step {step}: {sum(found[v] for v in newer)} samples carry weight_version {newer}, newer than the "
            f"version the trainer pushed ({pushed}): the engines hold weights this run did not push (restart them, "
            "or resume the run they belong to)")
    too_old = sorted((v for v, lag in lags.items() if lag > max_staleness), key=version_number)
    if too_old:
        raise RolloutError(
            f"step {step}: {sum(found[v] for v in too_old)} of {sum(found.values())} samples carry weight_version "
            f"{too_old}, more than --max-weight-staleness {max_staleness} behind the version the trainer pushed "
            f"({pushed}): an engine missed a weight sync (a worker added to the router unseen, a server restarted "
            "on old weights)")
    return sum(found[v] for v, lag in lags.items() if lag > 0)


def staleness_metrics(samples: Iterable, step: int) -> dict[str, float]:
    """How far behind the samples of RL step ``step`` are (in versions, against ``step − 1``), for
    ``metrics.jsonl``; :func:`check_weight_versions` has already bounded it."""
    versions = [version_number(str(s.weight_version)) for s in samples]
    lags = [step - 1 - v for v in versions]
    return {"weight_staleness_max": float(max(lags, default=0)),
            "weight_staleness_mean": float(sum(lags) / len(lags)) if lags else 0.0,
            "weight_version_min": float(min(versions, default=step - 1))}
