"""The import graph is the architecture diagram: the layers DESIGN.md draws, checked on every module."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What each layer may import from this repository's own packages.
ALLOWED = {
    "lookalike": {"lookalike"},
    "builder": {"builder", "lookalike"},
    "server": {"server", "lookalike"},
    "client": {"client", "lookalike.v1"},
}
OWN = ("lookalike", "builder", "server", "client", "bench", "tests")


# Not the repository's code, though under its folders (git ignores both): installed packages, and the benchmarks'
# scratch folder, whose files would otherwise be imported (so run) by the test below.
SCRATCH = REPO / "bench" / "work"


def sources(layer: str) -> list[Path]:
    """The layer's Python files, sorted."""
    return sorted(p for p in (REPO / layer).rglob("*.py")
                  if "node_modules" not in p.parts and not p.is_relative_to(SCRATCH))


def own_imports(path: Path) -> list[str]:
    """Every module of this repository that a file imports, at any depth (lazy imports count too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [name for name in names if name.split(".")[0] in OWN]


def allowed(name: str, layer: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in ALLOWED[layer])


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_the_design_allows(layer):
    files = sources(layer)
    assert files, f"no Python files under {layer}/"
    wrong = {f"{path.relative_to(REPO)}: {name}" for path in files for name in own_imports(path)
             if not allowed(name, layer)}
    assert not wrong, f"{layer}/ imports outside its layer:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_lazy_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from builder.model import export\n    import server.core\n")
    assert own_imports(sample) == ["builder.model", "builder.model.export", "server.core"]
    assert not allowed("builder.model", "server") and allowed("lookalike.v1.lookalike_pb2", "client")
    assert not allowed("lookalike.preprocess", "client")


def test_every_module_imports():
    """A module that fails to import (a moved name, a typo) fails here, not in a subprocess far away."""
    import importlib

    for layer in ("lookalike", "builder", "server", "client", "bench"):
        for path in sources(layer):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            importlib.import_module(module)
