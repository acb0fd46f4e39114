"""Packaging for luspo_megatron. Runtime pins live in requirements/runtime.txt (one place).

The csrc/ extension (``luspo_megatron._C``, docs/design.md §3) is built here: the CPU kernels always, the CUDA
kernels as well where ``nvcc`` and a CUDA build of torch both exist. ``make venv`` builds it in place with
``pip install --no-build-isolation -e .`` (the build must see the installed torch). Set
``LUSPO_NO_EXTENSION=1`` to skip it: ``luspo_megatron.ops`` then falls back to the pure-PyTorch reference.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def requirements(name: str) -> list[str]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def extension_build() -> dict:
    """ext_modules + cmdclass for the csrc extension, or nothing when it is switched off."""
    if os.environ.get("LUSPO_NO_EXTENSION") == "1":
        return {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # C++20: torch 2.13 headers use C++20 features; the kernels themselves are plain C++17.
    # -fno-trapping-math / -fno-math-errno (not -ffast-math: NaN and inf keep their meaning) let the compiler
    # turn the kernels' branch-free selects into vector blends. -g0: no debug info (a shorter build).
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    sources = ["csrc/seq_logratio.cpp", "csrc/seq_logratio_avx2.cpp", "csrc/bindings.cpp"]
    with_cuda = torch.version.cuda is not None and shutil.which(os.environ.get("NVCC", "nvcc")) is not None
    if with_cuda:
        # sm_90a for H100/H200 and the portable PTX of sm_80+; TORCH_CUDA_ARCH_LIST overrides.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a+PTX")
        ext = CUDAExtension(
            "luspo_megatron._C",
            sources=[*sources, "csrc/seq_logratio_cuda.cu"],
            define_macros=[("LUSPO_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("luspo_megatron._C", sources=sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    # ninja (requirements/build.txt) compiles the sources in parallel; the venv's bin is not always on PATH.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


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
    **extension_build(),
)
