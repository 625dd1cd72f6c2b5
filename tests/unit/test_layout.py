"""The layout keeps the architecture visible: subpackages import one way, model code knows
nothing of the cluster, the SDK stays light, and no product file outgrows one reader.

Every import counts, function-level ones too (an AST walk, not what happens to be loaded).
The rules are the table in README.md ("Layout"); a new folder gets a row here and there.
"""
from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("cluster", "experts", "router_service")
MAX_LINES = 300

SUBSTRATE = ("cluster.config", "cluster.checkpoint", "cluster.placement", "cluster.state")
# component -> the components it may import (besides itself, the standard library and third parties).
ALLOWED: dict[str, tuple[str, ...]] = {
    "cluster.config": (),
    "cluster.checkpoint": ("cluster.config",),
    "cluster.placement": ("cluster.config", "cluster.checkpoint"),
    "cluster.state": ("cluster.config", "cluster.checkpoint", "cluster.placement"),
    # experts/kernels reads weights from a checkpoint; the reference model computes experts in-process
    "experts.kernels": SUBSTRATE,
    "experts": SUBSTRATE + ("experts.kernels", "elasticmoe"),
    "router_service.model": SUBSTRATE + ("experts.kernels",),
    "router_service.engine": SUBSTRATE + ("router_service.model",),
    "router_service.serving": SUBSTRATE + ("router_service.model", "router_service.engine", "experts",
                                           "elasticmoe"),  # of experts: wire and credentials only (below)
    "router_service.client": ("elasticmoe",),
    "cluster.control": SUBSTRATE + ("experts", "experts.kernels", "elasticmoe"),
    "cluster.deploy": SUBSTRATE + ("cluster.control", "experts", "experts.kernels", "router_service.model",
                                   "router_service.engine", "router_service.serving", "router_service.client"),
    "cluster.bench": SUBSTRATE + ("cluster.control", "cluster.deploy", "experts", "experts.kernels",
                                  "router_service.model", "router_service.engine", "router_service.serving",
                                  "router_service.client", "elasticmoe"),
    "cluster.cli": SUBSTRATE + ("cluster.control", "cluster.deploy", "cluster.bench", "experts", "experts.kernels",
                                "router_service.model", "router_service.engine", "router_service.serving",
                                "router_service.client"),
    "elasticmoe": (),
}
# What router_service may take from experts/: the tensor wire format, the cluster secret, and (for the
# reference model's local experts) the kernels. Never the group actor or its servicer.
ROUTER_FROM_EXPERTS = ("experts.wire", "experts.credentials", "experts.kernels")
MODEL_CODE = ("router_service.model", "experts.kernels")
CLUSTER_LIBS = ("ray", "grpc", "redis")  # ray.serve is under ray


def component(module: str) -> str | None:
    """The component a dotted module belongs to (longest prefix), None outside the project."""
    names = sorted(ALLOWED, key=len, reverse=True)
    return next((c for c in names if module == c or module.startswith(c + ".")), None)


def product_files() -> list[Path]:
    # the top folders' own __init__.py are empty namespaces, not part of any component
    return sorted(p for top in PRODUCT for p in (ROOT / top).rglob("*.py") if p.parent != ROOT / top
                  or p.name != "__init__.py")


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; the project uses absolute ones"
            out.append((node.lineno, node.module))
            # `from cluster.bench import kernel` imports the module cluster.bench.kernel
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                    if component(f"{node.module}.{a.name}") not in (None, component(node.module))]
    return out


def edges() -> list[tuple[str, str, str]]:
    """(importing component, imported component, 'file:line') across components."""
    out = []
    for path in product_files():
        mine = component(module_of(path))
        for line, module in imports(path):
            theirs = component(module)
            if theirs is not None and theirs != mine:
                out.append((mine, theirs, f"{path.relative_to(ROOT)}:{line}"))
    return out


def test_every_product_module_belongs_to_a_component():
    stray = [str(p.relative_to(ROOT)) for p in product_files() if component(module_of(p)) is None]
    assert not stray, f"modules outside every component of the layout: {stray}"


def test_components_import_only_what_the_layout_allows():
    bad = [f"{where}: {a} imports {b}" for a, b, where in edges() if b not in ALLOWED[a]]
    assert not bad, "imports against the layout (README.md, Layout):\n" + "\n".join(bad)


def test_router_service_takes_only_wire_credentials_and_kernels_from_experts():
    bad = [f"{p.relative_to(ROOT)}:{line}: {m}" for p in product_files() if module_of(p).startswith("router_service")
           for line, m in imports(p) if component(m) == "experts" and not m.startswith(ROUTER_FROM_EXPERTS)]
    assert not bad, "\n".join(bad)


def test_components_form_a_dag():
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError(f"import cycle between components: {' -> '.join(path + [node])}")
        if state.get(node) != 2:
            state[node] = 1
            for nxt in sorted(graph.get(node, ())):
                visit(nxt, path + [node])
            state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_nothing_but_the_cli_imports_the_cli_or_the_benchmarks():
    bad = [f"{where}: {a} imports {b}" for a, b, where in edges()
           if b in ("cluster.cli", "cluster.bench") and a not in ("cluster.cli", "cluster.bench")]
    bad += [f"{where}: cluster.bench imports cluster.cli" for a, b, where in edges()
            if a == "cluster.bench" and b == "cluster.cli"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", MODEL_CODE)
def test_model_code_imports_no_cluster_library(package):
    bad = [f"{p.relative_to(ROOT)}:{line}: {m}" for p in product_files() if module_of(p).startswith(package)
           for line, m in imports(p) if m.split(".")[0] in CLUSTER_LIBS]
    assert not bad, f"model code must not import {CLUSTER_LIBS}:\n" + "\n".join(bad)


def test_the_sdk_imports_grpc_protobuf_and_the_generated_modules_only():
    ok = set(sys.stdlib_module_names) | {"grpc", "google", "elasticmoe", "router_service"}
    sdk = [p for p in product_files() if module_of(p).startswith("router_service.client")]
    assert sdk, "router_service/client not found"
    bad = [f"{p.relative_to(ROOT)}:{line}: {m}" for p in sdk for line, m in imports(p)
           if m.split(".")[0] not in ok or (m.startswith("router_service") and not m.startswith("router_service.client"))]
    assert not bad, "\n".join(bad)


def test_no_product_file_is_longer_than_one_reader_holds():
    long = {str(p.relative_to(ROOT)): n for p in product_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"product files over {MAX_LINES} lines (split them by concern): {long}"


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"]) - {"elasticmoe", "elasticmoe.v1"}
    found = {module_of(p) for top in PRODUCT for p in (ROOT / top).rglob("__init__.py")}
    assert listed == found, f"pyproject's packages {sorted(listed ^ found)} differ from the folders"
