"""Packaging for luspo_megatron. Runtime pins live in requirements/runtime.txt (one place)."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def requirements(name: str) -> list[str]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="luspo-megatron",
    version="0.1.0",
    description="RLVR post-training of Megatron-Core MoE models with LUSPO, GSPO and GRPO",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["luspo_megatron", "luspo_megatron.*"]),
    install_requires=requirements("runtime.txt"),
    extras_require={
        "test": requirements("test.txt"),
        "bench": requirements("bench.txt"),
        # Transformer Engine layer specs on GPU machines; megatron-core falls back to its local specs.
        "gpu": ["transformer-engine[pytorch]==2.12.0"],
        # sglang-router in front of several SGLang servers (the servers themselves run elsewhere).
        "sglang": ["sglang-router==0.3.2"],
    },
)
