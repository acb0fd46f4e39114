"""A dense, deterministic reward for trainer tests (used via --custom-reward-path): a random tiny
model almost never writes a correct \\boxed{} answer, so the math reward would be all zeros and
every loss trivially 0. The fraction of digit characters varies from sample to sample."""


def digit_fraction(response: str, label, metadata=None) -> float:
    return sum(ch.isdigit() for ch in response) / max(1, len(response))
