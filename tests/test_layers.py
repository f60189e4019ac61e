"""The import layers of docs/architecture.md: a module imports only its own layer or those below."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "distloop"

LAYERS = {
    0: ["errors", "arguments", "optim", "control", "results", "progress", "data", "checkpoint", "rng",
        "hparams", "stages", "extras", "plot"],
    1: ["strategies", "module", "datamodule", "rank_zero"],
    2: ["loops", "examples"],
    3: ["callbacks", "loggers"],
    4: ["state", "hooks"],
    5: ["trainer"],
    6: ["cli", "worker", "__main__", "__init__"],
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def layer(module: str) -> int:
    """``distloop.a.b`` -> the layer of ``a`` (a top-level module or a package)."""
    parts = module.split(".")
    return LAYER_OF["__init__" if len(parts) == 1 else parts[1]]


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "distloop":
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "distloop"]
    return found


def test_every_module_has_a_layer():
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert top - {"configs"} <= set(LAYER_OF), sorted(top - set(LAYER_OF))


def test_imports_go_down_the_layers():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts)
        own = layer(name) if path.name != "__init__.py" or path.parent != PACKAGE else LAYER_OF["__init__"]
        upward += [f"{name} imports {target}" for target in imports(path) if layer(target) > own]
    assert not upward, upward
