"""The CPU compatibility layer: pinned megatron call sites, and its switches on a real model."""

import os
from pathlib import Path

import pytest

from luspo_megatron.errors import ConfigError
from luspo_megatron.runtime import cpu_compat
from tests.distributed import run_worker

SITES = [(fix.name, site) for fix in cpu_compat.FIXES.values() for site in fix.pinned]


def test_pinned_against_the_installed_megatron_version():
    from megatron.core.package_info import __version__

    assert __version__ == cpu_compat.CHECKED_MEGATRON_VERSION, (
        f"megatron-core {__version__} installed; cpu_compat was checked against "
        f"{cpu_compat.CHECKED_MEGATRON_VERSION}: re-verify every fix (LUSPO_CPU_COMPAT_DISABLE) and re-pin"
    )


@pytest.mark.parametrize("fix, site", SITES, ids=[f"{f}:{s.module.rsplit('.', 1)[-1]}.{s.attr}" for f, s in SITES])
def test_every_patched_call_site_is_still_there(fix, site):
    """Fails loudly when an upgrade moves a call site, instead of a patch silently not applying."""
    cpu_compat.resolve(site)  # the patched module / attribute still exists
    assert site.fragment in cpu_compat.pinned_source(site), (
        f"{fix}: {site.module}.{site.attr} no longer contains {site.fragment!r}"
    )


def test_every_fix_is_documented_with_call_sites():
    assert sorted(cpu_compat.FIXES, key=lambda n: int(n[1:])) == [f"P{i}" for i in range(1, 12)]
    for fix in cpu_compat.FIXES.values():
        assert fix.call_sites and fix.pinned and fix.summary
        assert fix.kind in ("cpu", "bug", "local-spec")


def test_unknown_fix_name_in_disable_switch_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(cpu_compat.DISABLE_ENV, "P5,P12")
    with pytest.raises(ConfigError, match="P12"):
        cpu_compat.disabled_fixes()


@pytest.fixture(scope="module")
def switches(tmp_path_factory):
    env = {cpu_compat.TRACE_ENV: "1", cpu_compat.DISABLE_ENV: "P5"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return run_worker(Path(__file__).with_name("cpu_compat_worker.py"), 1,
                          tmp_path_factory.mktemp("compat") / "out.pt")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def test_disable_switch_skips_a_fix_and_megatron_then_fails_where_documented(switches):
    assert switches["first"]["P5"] == "disabled"
    assert switches["error_without_p5"] is not None and "te_general_gemm" in switches["error_without_p5"]


def test_apply_is_idempotent(switches):
    assert switches["first"] == switches["second"]
    assert not switches["rewrapped"]
    assert {name for name, s in switches["first"].items() if s == "applied"} >= {"P1", "P2", "P3", "P4", "P6"}


def test_trace_switch_logs_redirected_megatron_call_sites(switches):
    sites = {(fix, site.split(":")[0]) for fix, site in switches["trace"]}
    assert ("P1", "models/common/embeddings/rotary_pos_embedding.py") in sites
    assert ("P2", "tensor_parallel/random.py") in sites
    assert switches["grad_norm"] > 0  # the model trained through the patched layer
