"""The house rules of docs/design.md §3, read from the code itself (ast), not from a list kept by hand.

- Layers, lowest first: config/errors/logging/runtime → algorithms/ops → data, rewards, rollout,
  models → parallel → checkpoint → trainer → tools. A module may import its own layer or lower
  ones, never a higher one; ``config`` imports nothing of ours but ``errors``; ``data``, ``rewards``
  and ``rollout`` never import ``models`` (the trainer hands the rollout layer (HF name, tensor)
  pairs).
- No import cycle between modules (every import counts, function-local ones included).
- ``import luspo_megatron.{algorithms,rollout,rewards,data}`` loads no ``megatron`` module.
- No file over 500 lines and no class over 250 lines unless a comment at its top says why
  (``# why this file is long:`` in the file's first 30 lines, ``# why this class is long:`` on the
  lines right after the ``class`` line).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "luspo_megatron"

# Layer of each top-level part of the package (``luspo_megatron.<part>``), and of tools/.
LAYERS = {
    "config": 0, "errors": 0, "logging": 0, "runtime": 0, "_C": 0,
    "algorithms": 1, "ops": 1,
    "data": 2, "rewards": 2, "rollout": 2, "models": 2,
    "parallel": 3,
    "checkpoint": 4,
    "trainer": 5,
    "tools": 6,
}
# Parts of layer 2 that must stay free of the Megatron side (and of each other's model code).
MEGATRON_SIDE = {"models", "parallel", "checkpoint"}
NO_MEGATRON_SIDE = {"data", "rewards", "rollout"}
FILE_LIMIT, CLASS_LIMIT = 500, 250


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for the package and tools/."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    for path in sorted((ROOT / "tools").glob("*.py")):
        out[f"tools.{path.stem}"] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> set[str]:
    """Every luspo_megatron module ``module`` imports (anywhere in the file), as known module names."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            if not name.startswith("luspo_megatron"):
                continue
            while name and name not in MODULES:  # `from pkg import name` where name is not a module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[0] if parts[0] == "tools" else (parts[1] if len(parts) > 1 else "")


def test_every_part_has_a_layer():
    parts = {_part(m) for m in MODULES} - {""}
    assert parts <= set(LAYERS), f"parts with no layer in LAYERS (add them to docs/design.md §3 too): " \
                                 f"{sorted(parts - set(LAYERS))}"


def test_no_import_runs_up_the_layers():
    bad = []
    for module, targets in GRAPH.items():
        src = _part(module)
        for target in targets:
            dst = _part(target)
            if src in LAYERS and dst in LAYERS and LAYERS[dst] > LAYERS[src]:
                bad.append(f"{module} (layer {LAYERS[src]}) -> {target} (layer {LAYERS[dst]})")
            if src in NO_MEGATRON_SIDE and dst in MEGATRON_SIDE:
                bad.append(f"{module} -> {target}: {src}/ never imports {dst}/")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def test_config_is_a_leaf():
    for module, targets in GRAPH.items():
        if _part(module) == "config":
            outside = {t for t in targets if _part(t) not in ("config", "errors")}
            assert not outside, f"{module} imports {sorted(outside)}: config imports nothing of ours but errors"


def test_no_import_cycle():
    # A package's __init__ handing on names of its own modules is its face, not a tie of design:
    # those edges are left out. Everything else counts. Tarjan's strongly connected components.
    graph = {m: {t for t in targets if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))}
             for m, targets in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_pure_layers_load_no_megatron():
    code = ("import sys, luspo_megatron.algorithms, luspo_megatron.rollout, luspo_megatron.rewards, "
            "luspo_megatron.data\n"
            "print(sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", f"megatron modules loaded: {out.stdout.strip()[:300]}"


def _long_files() -> list[str]:
    bad = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        if len(lines) > FILE_LIMIT and not any("# why this file is long:" in line for line in lines[:30]):
            bad.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
    return bad


def _long_classes() -> list[str]:
    bad = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                head = lines[node.lineno: node.lineno + 5]
                if size > CLASS_LIMIT and not any("# why this class is long:" in line for line in head):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} class {node.name}: {size} lines")
    return bad


@pytest.mark.parametrize("check", [_long_files, _long_classes], ids=["files", "classes"])
def test_no_file_or_class_is_longer_than_the_limit_without_saying_why(check):
    bad = check()
    assert not bad, "too long, with no comment at the top saying why:\n" + "\n".join(bad)
