"""The policy-loss options: names, per-loss defaults, and :class:`LossConfig`, the validated set the
loss functions (``algorithms/losses.py``) compute with. They are configuration, so they live here,
at the bottom of the house, and the algorithm section builds a LossConfig from its flags."""

from __future__ import annotations

from dataclasses import dataclass

from luspo_megatron.config.fields import validate_fields
from luspo_megatron.errors import ConfigError

KL_TYPES = ("k1", "k2", "k3")  # estimators of KL(π_θ ‖ π_ref) per token (algorithms/kl.py)
# Importance correction against the rollout engine (algorithms/tis.py, docs/importance_sampling.md).
TIS_LEVELS = ("token", "sequence", "geometric")
TIS_MODES = ("truncate", "mask")
SEQUENCE_TIS_LEVELS = ("sequence", "geometric")  # one weight per sequence


def default_tis_lower(tis_clip: float) -> float:
    """lo of mask mode when it is not given: 1/C, the symmetric bound of IcePop / slime / verl."""
    return 1.0 / tis_clip


def _invalid(name: str, rule: str) -> ConfigError:
    """``name: rule``, with the field and the rule kept apart so that the algorithm section can
    name its flag instead (``--eps-clip: expected …``)."""
    return ConfigError(f"{name}: {rule}", field=name, rule=rule)
LOSS_NAMES = ("luspo", "gspo", "gspo_token", "grpo")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SEQUENCE_RATIO_LOSSES = ("gspo", "luspo")  # ratio and clip decision per sequence

# (ε_lo, ε_hi). grpo: DAPO clip-higher; gspo: GSPO paper v2 §5.1; luspo: LUSPO paper §5.1 (via TRL).
DEFAULT_CLIPS = {"grpo": (0.2, 0.28), "gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4), "luspo": (2e-3, 2.5e-3)}
# The aggregation is part of the definition of the sequence-level losses (table in docs/design.md §2).
DEFINING_AGG = {"gspo": "seq-mean-token-mean", "gspo_token": "seq-mean-token-mean", "luspo": "seq-mean-token-sum"}
DEFAULT_GRPO_AGG = "token-mean"


@dataclass(frozen=True)
class LossConfig:
    """What the policy loss computes. ``None`` clips and agg resolve to the loss's own defaults."""

    name: str = "luspo"
    eps_clip: float | None = None
    """ε_lo: the ratio is clipped below at 1 − ε_lo. None: the loss's default (DEFAULT_CLIPS)."""
    eps_clip_high: float | None = None
    """ε_hi: the ratio is clipped above at 1 + ε_hi. None: the loss's default, or ε_lo if that was set."""
    agg: str | None = None
    """GRPO aggregation (AGG_MODES). gspo/gspo_token/luspo have their aggregation by definition."""
    kl_coef: float = 0.0
    """β of the token-level KL penalty against ``ref_logp``; 0 disables it."""
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    """Entropy bonus coefficient c (the loss gets −c·H_t per token); 0 disables it."""
    use_tis: bool = False
    """Importance correction against ``rollout_logp`` (algorithms/tis.py)."""
    tis_clip: float = 2.0
    """C: truncate caps the weight at C; mask zeroes terms whose ratio is above C."""
    tis_level: str = "token"
    """token: ρ_t; sequence: ρ_i = Π_t ρ_t (TRL, verl); geometric: ρ_i = (Π_t ρ_t)^(1/|y_i|)."""
    tis_mode: str = "truncate"
    """truncate: w = min(ρ, C) (TIS); mask: w = ρ on [tis_lower, C], else 0 (MIS / IcePop)."""
    tis_lower: float | None = None
    """lo of mask mode (None: 1/C); unused by truncate."""
    max_response_len: int | None = None
    """L_max of seq-mean-token-sum-norm. None: the longest response of the call (not micro-batch
    invariant, so the trainer always sets it to the generation limit)."""

    def __post_init__(self) -> None:
        validate_fields(self)  # finite floats, ints, bools (the named rules below need numbers)
        if self.name not in LOSS_NAMES:
            raise _invalid("loss", f"expected one of {LOSS_NAMES}, got {self.name!r}")
        lo_default, hi_default = DEFAULT_CLIPS[self.name]
        eps_lo = lo_default if self.eps_clip is None else self.eps_clip
        if self.eps_clip_high is not None:
            eps_hi = self.eps_clip_high
        else:
            eps_hi = hi_default if self.eps_clip is None else self.eps_clip
        if not 0.0 < eps_lo < 1.0:
            raise _invalid("eps_clip", f"expected a float in (0, 1), got {eps_lo}")
        if not eps_hi > 0.0:
            raise _invalid("eps_clip_high", f"expected a float > 0, got {eps_hi}")
        if self.name == "grpo":
            agg = DEFAULT_GRPO_AGG if self.agg is None else self.agg
            if agg not in AGG_MODES:
                raise _invalid("agg", f"expected one of {AGG_MODES}, got {agg!r}")
        else:
            agg = DEFINING_AGG[self.name]
            if self.agg is not None and self.agg != agg:
                raise _invalid("agg", f"{self.name} aggregates {agg} by definition; "
                                      f"agg={self.agg!r} applies to grpo only")
        if self.kl_type not in KL_TYPES:
            raise _invalid("kl_type", f"expected one of {KL_TYPES}, got {self.kl_type!r}")
        if self.kl_coef < 0:
            raise _invalid("kl_coef", f"expected ≥ 0, got {self.kl_coef}")
        if self.entropy_coef < 0:
            raise _invalid("entropy_coef", f"expected ≥ 0, got {self.entropy_coef}")
        if self.tis_level not in TIS_LEVELS:
            raise _invalid("tis_level", f"expected one of {TIS_LEVELS}, got {self.tis_level!r}")
        if not self.tis_clip > 0:
            raise _invalid("tis_clip", f"expected > 0, got {self.tis_clip}")
        if self.tis_mode not in TIS_MODES:
            raise _invalid("tis_mode", f"expected one of {TIS_MODES}, got {self.tis_mode!r}")
        tis_lower = self.tis_lower
        if self.tis_mode == "mask":
            tis_lower = default_tis_lower(self.tis_clip) if tis_lower is None else tis_lower
            if not 0.0 < tis_lower < self.tis_clip:
                raise _invalid("tis_lower", f"expected 0 < tis_lower < tis_clip = {self.tis_clip} for mask mode, "
                                            f"got {tis_lower}")
        if self.max_response_len is not None and self.max_response_len < 1:
            raise _invalid("max_response_len", f"expected a positive int, got {self.max_response_len}")
        object.__setattr__(self, "eps_clip", float(eps_lo))
        object.__setattr__(self, "eps_clip_high", float(eps_hi))
        object.__setattr__(self, "agg", agg)
        object.__setattr__(self, "tis_lower", None if tis_lower is None else float(tis_lower))

    @property
    def sequence_level(self) -> bool:
        """True when the importance ratio and clip decision are per sequence (gspo, luspo)."""
        return self.name in SEQUENCE_RATIO_LOSSES
