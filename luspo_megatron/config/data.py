"""The data section: prompts, their format, and the reward that scores the responses."""

from __future__ import annotations

import re
from dataclasses import dataclass

from luspo_megatron.config.fields import check, opt, positive, seconds, validate_fields

REWARD_KINDS = ("math", "math+format", "dapo", "auto")  # rewards/compose.py builds each
# module:function, as importlib.import_module and getattr take them (rewards/pool.py::load_function)
IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig:
    """Prompts. Without ``prompt_data`` the built-in synthetic arithmetic task is used."""

    prompt_data: str | None = opt(None, "--prompt-data", help="JSONL or Parquet prompt file.")
    input_key: str = opt("prompt", "--input-key", help="Column with the prompt (text or chat messages).")
    label_key: str = opt(
        "reward_model.ground_truth", "--label-key", help="Column with the ground truth (dotted path allowed)."
    )
    metadata_key: str | None = opt(None, "--metadata-key", help="Column passed to the reward as metadata.")
    max_prompt_len: int = opt(512, "--max-prompt-len", help="Prompts longer than this (tokens) are filtered out.")
    apply_chat_template: bool = opt(
        True, "--no-chat-template", help="Feed prompts raw, without the tokenizer's chat template.",
        action="store_false",
    )
    enable_thinking: bool = opt(False, "--enable-thinking", help="Qwen3 chat template thinking mode.",
                                action="store_true")
    skip_bad_rows: bool = opt(False, "--skip-bad-rows", help="Count and skip rows that fail to parse.",
                              action="store_true")
    reward: str = opt(
        "math", "--reward", choices=REWARD_KINDS,
        help="Reward: math = the last \\boxed{} (math-verify); dapo = the last 'Answer:' line, normalised as verl's "
             "math_dapo (DAPO-Math-17k); auto = \\boxed{} if present, else the Answer line; math+format = math "
             "plus a format term.",
    )
    custom_reward_path: str | None = opt(
        None, "--custom-reward-path", help="module:function computing the reward instead of --reward."
    )
    reward_timeout_s: float = opt(5.0, "--reward-timeout", help="Per-item reward timeout, seconds.")
    sft_key: str = opt("solution", "--sft-key", help="Column with the reference response for --sft-warmup-steps.")
    sft_direct_fraction: float = opt(
        0.0, "--sft-direct-fraction",
        help="Fraction of warm-up targets taken from the `direct_solution` column (the bare answer) instead of "
             "--sft-key: the warm-up then teaches both a long and a short way to answer, and RL chooses.",
    )
    format_reward_weight: float = opt(0.1, "--format-reward-weight", help="Weight of the format term in math+format.")
    reward_num_workers: int = opt(2, "--reward-num-workers", help="Processes scoring rewards (math-verify).")
    tokenizer_path: str | None = opt(
        None, "--tokenizer-path", help="HF tokenizer directory; None: the Qwen3 tokenizer (offline, built in)."
    )
    synthetic_num_prompts: int = opt(
        4096, "--synthetic-num-prompts", help="Prompts of the built-in arithmetic task (without --prompt-data)."
    )
    synthetic_max_steps: int = opt(8, "--synthetic-max-steps", help="Hardest arithmetic level (operations).")
    synthetic_sft_prompts: int = opt(
        0, "--synthetic-sft-prompts",
        help="Rows of the built-in task the SFT warm-up trains on (the same seeded draw, extended: the RL prompts "
             "are its first rows); 0: the RL prompts. A larger pool keeps the warm-up from memorising the RL "
             "prompts' answers.",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        positive(DataConfig, self, "max_prompt_len", "reward_num_workers", "synthetic_num_prompts",
                  "synthetic_max_steps")
        check(self.format_reward_weight >= 0, DataConfig, "format_reward_weight", "≥ 0", self.format_reward_weight)
        seconds(DataConfig, self, "reward_timeout_s")
        for name in ("input_key", "label_key", "sft_key", "metadata_key"):
            value = getattr(self, name)
            check(value is None or bool(value.strip()), DataConfig, name, "a non-empty column name", value)
        check(self.synthetic_sft_prompts >= 0, DataConfig, "synthetic_sft_prompts", "≥ 0 (0: the RL prompts)",
               self.synthetic_sft_prompts)
        check(0.0 <= self.sft_direct_fraction <= 1.0, DataConfig, "sft_direct_fraction", "a fraction in [0, 1]",
               self.sft_direct_fraction)
        if self.custom_reward_path is not None:
            check(IMPORT_PATH.fullmatch(self.custom_reward_path) is not None, DataConfig, "custom_reward_path",
                  "module:function (e.g. my_pkg.rewards:score)", self.custom_reward_path)
