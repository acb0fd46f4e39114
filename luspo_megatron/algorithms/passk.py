"""Held-out evaluation metrics over k samples per prompt: avg@k and the unbiased pass@k' estimator.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1): with n
samples of one prompt of which c are correct, the chance that k of them drawn without replacement
hold at least one correct one is

    pass@k = 1 - C(n-c, k) / C(n, k) = 1 - ∏_{i=n-c+1}^{n} (1 - k/i)

The product form (the paper's numerically stable version) avoids the huge binomials. It is
computed per prompt and averaged over prompts, for every k' ≤ k that is a power of 2 (the
evaluation's ``eval/NAME/pass@1``, ``pass@2``, ``pass@4``, ...). avg@k is the mean accuracy over
the k samples of a prompt, averaged over prompts. Plain Python/numpy: never imports megatron.

    metrics = eval_metrics(correct, response_lens, truncated)   # {"avg@4": ..., "pass@1": ..., ...}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with ``c`` correct among ``n`` samples (needs k ≤ n)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: expected 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample: C(n-c, k) = 0
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)  # [c]
    return float(1.0 - np.prod(1.0 - k / i))  # 1 - ∏_{i=n-c+1}^{n} (1 - k/i) = 1 - C(n-c,k)/C(n,k)


def powers_of_two_up_to(k: int) -> list[int]:
    """[1, 2, 4, ..., the largest power of 2 ≤ k]."""
    if k < 1:
        raise ValueError(f"k: expected ≥ 1, got {k}")
    return [1 << e for e in range(k.bit_length())]


def _check_rows(name: str, rows: Sequence[Sequence], num_prompts: int, k: int) -> None:
    if len(rows) != num_prompts:
        raise ValueError(f"{name}: expected {num_prompts} prompts (as correct has), got {len(rows)}")
    for p, row in enumerate(rows):
        if len(row) != k:
            raise ValueError(f"{name}: expected {k} samples for every prompt (as prompt 0 has), "
                             f"prompt {p} has {len(row)}")


def eval_metrics(correct: Sequence[Sequence[bool | float]], response_lens: Sequence[Sequence[int]] | None = None,
                 truncated: Sequence[Sequence[bool]] | None = None) -> dict[str, float]:
    """The evaluation metrics of one data set, each prompt with the same number k of samples.

    ``correct[p][j]``: whether sample j of prompt p is right (bool or 0/1). ``response_lens`` (tokens)
    and ``truncated`` (the sample stopped at the length limit), shaped the same, are optional.
    Returns ``avg@k``, ``pass@1``, ``pass@2``, ... (powers of 2 up to k), and, when given,
    ``response_len_mean`` (over all samples) and ``truncation_rate`` (fraction of all samples).
    """
    if not correct:
        raise ValueError("correct: expected at least one prompt, got none")
    k = len(correct[0])
    if k < 1:
        raise ValueError("correct: expected at least one sample per prompt, prompt 0 has none")
    _check_rows("correct", correct, len(correct), k)
    hits = np.asarray(correct, dtype=np.float64)  # [P, k]
    if not np.all((hits == 0.0) | (hits == 1.0)):
        raise ValueError("correct: expected booleans or 0/1 per sample, got other values")
    c = hits.sum(axis=1).astype(np.int64)  # [P] correct samples per prompt
    metrics = {f"avg@{k}": float(hits.mean(axis=1).mean())}  # mean over prompts of (c / k)
    for kk in powers_of_two_up_to(k):
        metrics[f"pass@{kk}"] = float(np.mean([pass_at_k(k, int(ci), kk) for ci in c]))
    if response_lens is not None:
        _check_rows("response_lens", response_lens, len(correct), k)
        metrics["response_len_mean"] = float(np.asarray(response_lens, dtype=np.float64).mean())
    if truncated is not None:
        _check_rows("truncated", truncated, len(correct), k)
        metrics["truncation_rate"] = float(np.asarray(truncated, dtype=np.float64).mean())
    return metrics
