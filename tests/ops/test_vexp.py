"""The CPU kernels' own exp/expm1 (csrc/vexp.h, vectorizable) against libm over the whole float64 range,
including the overflow/underflow edges, ±inf and NaN."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"

PROGRAM = r"""
#include "vexp.h"
#include <cmath>
#include <cstdio>
#include <random>
static double rel(double got, double want) {
  if (std::isnan(want)) return std::isnan(got) ? 0.0 : 1.0;
  if (std::isinf(want)) return got == want ? 0.0 : 1.0;
  if (want == 0.0) return std::fabs(got);
  return std::fabs(got - want) / std::fabs(want);
}
int main() {
  std::mt19937_64 gen(7);
  std::uniform_real_distribution<double> wide(-708.0, 709.78), unit(-1.0, 1.0);
  double exp_err = 0, expm1_err = 0;
  for (int i = 0; i < 2000000; ++i) {
    const double x = i % 2 ? wide(gen) : unit(gen) * (i % 4 == 0 ? 1e-6 : 2.0);
    exp_err = std::fmax(exp_err, rel(luspo::vexp(x), std::exp(x)));
    expm1_err = std::fmax(expm1_err, rel(luspo::vexpm1(x), std::expm1(x)));
  }
  const double special[] = {0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 709.782712893384, 709.79, 1e300, -708.0, -1e300,
                            INFINITY, -INFINITY, NAN};
  double special_err = 0;
  for (double x : special) {
    special_err = std::fmax(special_err, rel(luspo::vexp(x), x < -708.0 ? 0.0 : std::exp(x)));
    special_err = std::fmax(special_err, rel(luspo::vexpm1(x), x < -708.0 ? -1.0 : std::expm1(x)));
  }
  std::printf("%.3e %.3e %.3e\n", exp_err, expm1_err, special_err);
}
"""


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_vectorizable_exp_and_expm1_are_within_two_ulp_of_libm(tmp_path):
    source, binary = tmp_path / "vexp_accuracy.cpp", tmp_path / "vexp_accuracy"
    source.write_text(PROGRAM)
    subprocess.run(["c++", "-O2", "-std=c++17", f"-I{CSRC}", str(source), "-o", str(binary)], check=True, timeout=120)
    exp_err, expm1_err, special_err = map(float, subprocess.run([str(binary)], capture_output=True, text=True,
                                                                check=True, timeout=120).stdout.split())
    ulp = 2.0**-52
    assert exp_err <= 2 * ulp and expm1_err <= 2 * ulp
    # Below −708 the kernels flush to 0 (exact: a subnormal ≤ 3.3e-308), ±inf and NaN are exact.
    assert special_err <= 2 * ulp
