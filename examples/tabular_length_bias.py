"""LUSPO vs GSPO vs GRPO on a tiny tabular policy: how each loss treats response length.

A toy RLVR task where length matters. The policy emits tokens from {a, b, EOS}, one logit vector per
position (max 12 tokens). The reward is 1 when the response holds at least 4 `a` tokens, so a
correct answer needs a long enough response. Every loss sees the same samples (same seed), trains
with the real ``policy_loss`` on packed sequences, two optimizer steps per rollout, and reports
the response length, the reward and the length-weight share (fraction of gradient weight on
sequences longer than the median).

This is a pedagogical toy, not a reproduction: the Megatron trainer (tools/train_luspo.py) is the
product. Whatever ordering of lengths comes out is printed as measured.

    python examples/tabular_length_bias.py [--steps 60] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from luspo_megatron.algorithms.advantages import group_advantages
from luspo_megatron.algorithms.losses import LossConfig, policy_loss

A, B_TOK, EOS = 0, 1, 2
MAX_LEN = 12
NEEDED_A = 4


def sample(theta: torch.Tensor, n: int, gen: torch.Generator) -> list[list[int]]:
    """n responses, token by token from softmax(θ[t]); stop at EOS (kept) or MAX_LEN."""
    probs = torch.softmax(theta.detach(), dim=-1)
    draws = torch.multinomial(probs.repeat(n, 1), 1, replacement=True, generator=gen).view(n, MAX_LEN)
    out = []
    for row in draws.tolist():
        resp = []
        for tok in row:
            resp.append(tok)
            if tok == EOS:
                break
        out.append(resp)
    return out


def reward(resp: list[int]) -> float:
    return float(resp.count(A) >= NEEDED_A)


def packed_logp(theta: torch.Tensor, responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.cat([torch.arange(len(r)) for r in responses])
    tokens = torch.tensor([t for r in responses for t in r])
    logp = torch.log_softmax(theta, dim=-1)[positions, tokens]
    cu = torch.tensor([0] + [len(r) for r in responses]).cumsum(0).to(torch.int32)
    return logp, cu


def train(loss_name: str, seed: int, steps: int, prompts: int, group: int) -> list[dict[str, float]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(MAX_LEN, 3, dtype=torch.float64)
    theta[:, EOS] = 0.7  # start short: E|y| ≈ 3.5, P(reward) ≈ 4 %
    theta.requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    cfg = LossConfig(name=loss_name)
    history = []
    for _ in range(steps):
        responses = sample(theta, prompts * group, gen)
        rewards = torch.tensor([reward(r) for r in responses], dtype=torch.float64)
        adv = group_advantages(rewards, group)
        with torch.no_grad():
            old_logp, cu = packed_logp(theta, responses)
        mask = torch.ones_like(old_logp)
        for _ in range(2):  # two optimizer steps per rollout: the second one is off-policy
            logp, _ = packed_logp(theta, responses)
            loss, metrics = policy_loss(logp, old_logp, adv, mask, cu, cfg, num_sequences=len(responses))
            opt.zero_grad()
            loss.backward()
            opt.step()
        lengths = [len(r) for r in responses]
        history.append({"len": statistics.mean(lengths), "reward": float(rewards.mean()),
                        "lw_share": metrics["length_weight_share"], "clip_frac": metrics["clip_frac"]})
    return history


def window(runs: list[list[dict[str, float]]], key: str, first: bool) -> float:
    """Mean of ``key`` over the first (or last) 10 steps, averaged over seeds."""
    return statistics.mean(statistics.mean(h[key] for h in (run[:10] if first else run[-10:])) for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]Tabular length-bias demo[/]: reward = 1 iff ≥ {NEEDED_A} `a` tokens; max {MAX_LEN} tokens; "
                  f"{args.prompts}×{args.group} samples/step; {args.steps} steps; {args.seeds} seeds")
    table = Table(title="response length and reward (mean over seeds; first → last 10 steps)")
    for col in ("loss", "length first", "length last", "reward first", "reward last", "len-weight share", "time"):
        table.add_column(col, justify="right")
    for loss_name in ("grpo", "gspo", "luspo"):
        t0 = time.perf_counter()
        runs = [train(loss_name, seed, args.steps, args.prompts, args.group) for seed in range(args.seeds)]


        table.add_row(
            loss_name, f"{window(runs, 'len', True):.2f}", f"{window(runs, 'len', False):.2f}",
            f"{window(runs, 'reward', True):.3f}", f"{window(runs, 'reward', False):.3f}",
            f"{window(runs, 'lw_share', False):.3f}", f"{time.perf_counter() - t0:.1f}s",
        )
    console.print(table)
    console.print("This is a toy illustration; the product's main job is tools/train_luspo.py (see README).")


if __name__ == "__main__":
    main()
