"""Module boundaries (DESIGN.md, Layout): train.py is the one place that wires components together,
only engine.py imports deepspeed (and export.py, which merges ZeRO checkpoints offline with
deepspeed.utils.zero_to_fp32), and the model knows nothing of ranks."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "grape_ds"

# Leaf modules anyone may import.
SHARED = {"grape_ds.config", "grape_ds.devices", "grape_ds.distributed", "grape_ds.schedules", "grape_ds.rundir",
          "grape_ds.hostprobe"}
# Extra edges allowed beyond SHARED (the wiring modules and the data package's own internals).
ALLOWED = {
    "grape_ds.train": "*",
    "grape_ds.bench": "*",
    "grape_ds.cli": {"grape_ds.train", "grape_ds.bench", "grape_ds.data", "grape_ds.evaluation",
                     "grape_ds.export", "grape_ds.preflight"},
    # pre-flight checks what a launch needs before it starts: run directory, checkpoints, data, model
    "grape_ds.preflight": {"grape_ds.checkpoint", "grape_ds.data", "grape_ds.model"},
    "grape_ds.launch": {"grape_ds.preflight"},
    "grape_ds.data": {"grape_ds.data"},
    # evaluation scores the data package's multiple-choice items; export reads a finished run back
    # (its checkpoints, data and model) for `grape-ds eval` / `grape-ds export`.
    "grape_ds.evaluation": {"grape_ds.data"},
    "grape_ds.export": {"grape_ds.checkpoint", "grape_ds.data", "grape_ds.model"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if node.module == "grape_ds"}
    return out


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_sideways_imports():
    bad = []
    for path in PKG.rglob("*.py"):
        mod = _module(path)
        key = "grape_ds.data" if mod.startswith("grape_ds.data") else mod
        allowed = ALLOWED.get(key, set())
        for imp in _imports(path):
            if not imp.startswith("grape_ds.") or imp in SHARED or allowed == "*":
                continue
            if any(imp == a or imp.startswith(a + ".") for a in allowed):
                continue
            if mod == "grape_ds.__main__" and imp == "grape_ds.cli":
                continue
            bad.append(f"{mod} imports {imp}")
    assert not bad, "sideways imports (wire components in grape_ds/train.py instead):\n" + "\n".join(bad)


def test_only_engine_imports_deepspeed():
    users = {_module(p) for p in PKG.rglob("*.py") if any(i.split(".")[0] == "deepspeed" for i in _imports(p))}
    assert users == {"grape_ds.engine", "grape_ds.export"}, users


def test_model_is_rank_free():
    imports = _imports(PKG / "model.py")
    assert not any(i.startswith(("torch.distributed", "grape_ds.distributed", "deepspeed")) for i in imports)
