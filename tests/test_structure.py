"""The package's structure as docs/ARCHITECTURE.md draws it: every module in its layer, imports only
downwards, no import cycle (imports inside functions count), DeepSpeed only in engine.py, the data
package on layer-0 modules only, and the model free of ranks. No per-file exceptions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "grape_ds"
SOURCES = {str(p.relative_to(PKG.parent).with_suffix("")).removesuffix("/__init__") for p in PKG.rglob("*.py")}
ARCHITECTURE = PKG.parent / "docs" / "ARCHITECTURE.md"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:  # from grape_ds.data import corpora: the module grape_ds.data.corpora
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub.replace(".", "/") in SOURCES else node.module)
    return out


def _part(module: str) -> str:
    """The part a module belongs to: ``grape_ds.data.sampler`` -> ``data``, ``grape_ds.train`` -> ``train``."""
    rest = module.removeprefix("grape_ds").lstrip(".")
    return rest.split(".")[0] if rest else ""


MODULES = {_module(p): p for p in PKG.rglob("*.py")}
GRAPH = {m: {i for i in _imports(p) if i == "grape_ds" or i.startswith("grape_ds.")} for m, p in MODULES.items()}


def _layers() -> dict[str, int]:
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*`([\w.]+)`\s*\|", ARCHITECTURE.read_text(), flags=re.M)
    return {part: int(layer) for layer, part in rows}


def _resolve(name: str) -> str | None:
    """The package module an import names (``grape_ds.data.sampler.Draw`` -> ``grape_ds.data.sampler``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_every_module_has_a_layer_on_the_architecture_page():
    layers = _layers()
    parts = {_part(m) for m in MODULES} - {""}
    assert parts == set(layers), (f"docs/ARCHITECTURE.md lists {sorted(set(layers) - parts)} that do not exist "
                                  f"and misses {sorted(parts - set(layers))}")


def test_imports_only_go_down_the_layers():
    layers = _layers()
    bad = []
    for module, imports in GRAPH.items():
        mine = _part(module)
        if not mine:  # grape_ds/__init__.py imports nothing of the package
            assert not imports, imports
            continue
        for target in filter(None, map(_resolve, imports)):
            other = _part(target)
            if other and other != mine and layers[other] >= layers[mine]:
                bad.append(f"{module} (layer {layers[mine]}) imports {target} (layer {layers[other]})")
    assert not bad, "imports that go sideways or up (docs/ARCHITECTURE.md):\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    edges = {m: {t for t in map(_resolve, imports) if t and t != m and t != "grape_ds"}
             for m, imports in GRAPH.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_only_engine_imports_deepspeed():
    users = {m for m, p in MODULES.items() if any(i.split(".")[0] == "deepspeed" for i in _imports(p))}
    assert users == {"grape_ds.engine"}, users


def test_data_knows_no_model():
    layers = _layers()
    for module, imports in GRAPH.items():
        if _part(module) == "data":
            outside = {_part(t) for t in filter(None, map(_resolve, imports))} - {"data"}
            assert all(layers[p] == 0 for p in outside), (module, outside)


def test_model_is_rank_free():
    imports = _imports(PKG / "model.py")
    assert not any(i.startswith(("torch.distributed", "grape_ds.distributed", "deepspeed")) for i in imports)


def test_a_cycle_or_an_upward_import_is_caught(tmp_path):
    """The checks above can fail: a planted upward edge (data -> train) and cycle are found."""
    layers = _layers()
    assert layers["train"] > layers["data"]
    saved = GRAPH["grape_ds.data.sampler"]
    GRAPH["grape_ds.data.sampler"] = saved | {"grape_ds.train"}
    try:
        for check in (test_imports_only_go_down_the_layers, test_no_import_cycle, test_data_knows_no_model):
            try:
                check()
            except AssertionError:
                continue
            raise AssertionError(f"{check.__name__} missed data.sampler -> train")
    finally:
        GRAPH["grape_ds.data.sampler"] = saved
