"""LUSPO's gradient is length-unbiased; GSPO's is not. Checked by exact enumeration on a tiny tabular
autoregressive policy (docs/design.md §2, "Why LUSPO is unbiased").

Policy: vocabulary {a, b, EOS}; one logit vector per prefix of a/b tokens (15 prefixes of length
0..3); a response stops at EOS (included, mask 1) or is truncated at 4 tokens. Reward: 1 when the
last non-EOS token is `a`. Groups of G = 2 responses, Dr.GRPO advantages Â_i = R_i − mean_g R.

On-policy (s_i = 1), with y_1, y_2 independent:
    E[∇L_LUSPO] = −(1/G) E[Σ_i Â_i ∇log π(y_i)] = −(1/G)(G − 1) ∇E[R] = −(1 − 1/G) ∇E[R]
    E[∇L_GSPO]  = −(1/G) E[Σ_i Â_i (1/|y_i|) ∇log π(y_i)]
"""

from __future__ import annotations

import itertools

import pytest
import torch

from luspo_megatron.algorithms.advantages import group_advantages
from luspo_megatron.algorithms.losses import LossConfig, policy_loss

A, B_TOK, EOS = 0, 1, 2
MAX_LEN = 4
G = 2


def all_responses() -> list[tuple[int, ...]]:
    out = []
    for k in range(MAX_LEN):  # k a/b tokens then EOS
        out += [(*p, EOS) for p in itertools.product((A, B_TOK), repeat=k)]
    out += list(itertools.product((A, B_TOK), repeat=MAX_LEN))  # truncated, no EOS
    return out


PREFIXES = {p: i for i, p in enumerate(p for k in range(MAX_LEN) for p in itertools.product((A, B_TOK), repeat=k))}


def reward(y: tuple[int, ...]) -> float:
    body = [t for t in y if t != EOS]
    return 1.0 if body and body[-1] == A else 0.0


def token_logps(theta: torch.Tensor, y: tuple[int, ...]) -> torch.Tensor:
    logits = torch.stack([theta[PREFIXES[y[:t]]] for t in range(len(y))])
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(y).unsqueeze(1)).squeeze(1)


def expected_gradients(theta0: torch.Tensor, loss_name: str):
    """(E[∇L] by enumerating policy_loss over all groups, ∇E[R], the GSPO oracle −(1/G)E[Σ Â/|y| ∇logπ])."""
    responses = all_responses()
    rewards = torch.tensor([reward(y) for y in responses], dtype=torch.float64)

    theta = theta0.clone().requires_grad_(True)
    logps = [token_logps(theta, y) for y in responses]
    seq_logp = torch.stack([lp.sum() for lp in logps])
    probs = seq_logp.exp()
    assert float(probs.sum().detach()) == pytest.approx(1.0, abs=1e-12)

    expected_loss = theta.new_zeros(())
    gspo_surrogate = theta.new_zeros(())
    cfg = LossConfig(name=loss_name)
    for group in itertools.product(range(len(responses)), repeat=G):
        p_group = torch.prod(probs[list(group)]).detach()
        adv = group_advantages(rewards[list(group)], G, std_normalize=False)
        logp = torch.cat([logps[j] for j in group])
        lengths = [len(responses[j]) for j in group]
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        loss, _ = policy_loss(logp, logp.detach(), adv, torch.ones_like(logp), cu, cfg, num_sequences=G)
        expected_loss = expected_loss + p_group * loss
        gspo_surrogate = gspo_surrogate - p_group / G * sum(
            adv[k] / lengths[k] * seq_logp[j] for k, j in enumerate(group)
        )
    grad_loss, = torch.autograd.grad(expected_loss, theta, retain_graph=True)
    grad_reward, = torch.autograd.grad((probs * rewards).sum(), theta, retain_graph=True)
    grad_gspo_oracle, = torch.autograd.grad(gspo_surrogate, theta)
    return grad_loss, grad_reward, grad_gspo_oracle


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_luspo_gradient_is_length_unbiased(seed):
    theta = torch.randn(len(PREFIXES), 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad_luspo, grad_reward, _ = expected_gradients(theta, "luspo")
    assert grad_reward.abs().max() > 1e-3  # the check is not vacuous
    torch.testing.assert_close(grad_luspo, -(1 - 1 / G) * grad_reward, rtol=0, atol=1e-9)


def test_gspo_gradient_weights_each_sequence_by_one_over_length():
    cosines = []
    for seed in range(3):
        theta = torch.randn(len(PREFIXES), 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        grad_gspo, grad_reward, grad_gspo_oracle = expected_gradients(theta, "gspo")
        torch.testing.assert_close(grad_gspo, grad_gspo_oracle, rtol=0, atol=1e-9)
        cosines.append(_cos(-grad_gspo, grad_reward))
    # GSPO is biased: for some parameters its expected gradient is not parallel to ∇E[R].
    assert min(cosines) < 1 - 1e-3, cosines
