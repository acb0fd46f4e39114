"""The CUDA side compiles without a GPU or a CUDA build of torch, so its source cannot rot on CPU-only
CI: the kernels with nvcc alone (torch-free by design), and the CUDA branch of the torch bindings as a
syntax check against torch's headers."""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")


@needs_nvcc
def test_cuda_kernels_compile_with_nvcc_for_sm90a_without_register_spills(tmp_path):
    obj = tmp_path / "seq_logratio_cuda.o"
    # The same restrictions torch's CUDAExtension compiles with (no implicit half/bfloat16 conversions).
    cmd = [
        "nvcc", "-c", "-arch=sm_90a", "-std=c++17", "-O3", "-Werror", "all-warnings",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__", "-Xptxas", "-v", str(CSRC / "seq_logratio_cuda.cu"), "-o", str(obj),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert obj.stat().st_size > 0
    # ptxas reports every kernel instantiation; a spill to local memory is a silent slowdown on the GPU.
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", done.stderr)]
    assert len(spills) >= 8 and all(n == 0 for n in spills), done.stderr[-4000:]


@pytest.mark.slow
@needs_nvcc
def test_cuda_branch_of_the_torch_bindings_compiles(tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    # nvcc may be a wrapper script; its dry run names the CUDA include directory it really uses.
    (empty := tmp_path / "empty.cu").write_text("")
    dry = subprocess.run(["nvcc", "--dryrun", "-c", str(empty)], capture_output=True, text=True, timeout=60).stderr
    cuda_include = Path(re.search(r'INCLUDES="-I([^"]+)"', dry).group(1).strip())
    # A CPU wheel of torch ships c10/cuda headers but not the generated cuda_cmake_macros.h; an empty one
    # stands in (it only carries build-time macros the bindings do not use).
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [tmp_path, *map(Path, cpp_extension.include_paths()), cuda_include,
                Path(sysconfig.get_paths()["include"])]
    cmd = ["c++", "-fsyntax-only", "-std=c++20", "-DLUSPO_WITH_CUDA", *(f"-I{p}" for p in includes),
           str(CSRC / "bindings.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
