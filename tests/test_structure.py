"""The package's shape: complete ``__all__`` lists, one-way imports, a light ``import pvt_backbone``, short functions,
installed commands."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import benchmarks
import heads
import pvt_backbone

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (pvt_backbone, heads, benchmarks)
MAX_FUNCTION_LINES = 60


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package.__name__)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")]
    return sorted(names)


def _source_files() -> list[Path]:
    return sorted(p for d in ("pvt_backbone", "heads", "benchmarks", "tools") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("name", _modules())
def test_all_is_complete_and_importable(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(exported) == len(set(exported)), f"{name}.__all__ lists a name twice"
    missing = [item for item in exported if not hasattr(module, item)]
    assert not missing, f"{name}.__all__ lists names it does not define: {missing}"
    if module.__file__ and not module.__file__.endswith("__init__.py"):
        tree = ast.parse(Path(module.__file__).read_text())
        public = {
            node.name
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and not node.name.startswith("_")
        }
        unlisted = sorted(public - set(exported))
        assert not unlisted, f"{name} defines public names missing from __all__: {unlisted}"


def _package_imports(path: Path, module: str) -> set[str]:
    """Modules of this repository that ``path`` imports at module level (function-local imports excluded)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names]
            # "from . import sibling" imports the sibling; the package itself is already being imported
            candidates = submodules if node.level and not node.module else [target, *submodules]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c.split(".")[0] in {p.__name__ for p in PACKAGES})
    return found


def _import_graph() -> dict[str, set[str]]:
    files = {}
    for package in PACKAGES:
        root = Path(package.__file__).parent
        for path in root.rglob("*.py"):
            parts = path.relative_to(root.parent).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {name: {t for t in _package_imports(path, name) if t in files} - {name} for name, path in files.items()}


def test_no_import_cycle() -> None:
    graph = _import_graph()
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        for target in sorted(graph[node]):
            if target in trail:
                pytest.fail(f"import cycle: {' -> '.join(trail[trail.index(target) :] + [target])}")
            if target not in done:
                visit(target, [*trail, target])
        done.add(node)

    for name in sorted(graph):
        visit(name, [name])


def test_import_pvt_backbone_stays_light() -> None:
    code = (
        "import sys, pvt_backbone\n"
        "heavy = ('pvt_backbone.training', 'pvt_backbone.cli', 'pvt_backbone.integrations', 'benchmarks', 'timm',"
        " 'matplotlib', 'pycocotools', 'huggingface_hub', 'transformers', 'segmentation_models_pytorch', 'openvino',"
        " 'nncf', 'onnxruntime')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_top_level_is_small() -> None:
    assert len(pvt_backbone.__all__) <= 20
    assert {"PVTv2Backbone", "pvt_v2_b2", "list_models", "create_model", "load_weights"} <= set(pvt_backbone.__all__)


@pytest.mark.parametrize("path", _source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_are_short(path: Path) -> None:
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.relative_to(ROOT)}: {long}"


def test_commands_are_declared_and_importable() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"pvt-train", "pvt-evaluate", "pvt-predict", "pvt-convert", "pvt-export", "pvt-benchmark"}
    for target in scripts.values():
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), target


def test_installed_command_follows_the_error_contract(tmp_path: Path) -> None:
    command = Path(sys.executable).with_name("pvt-convert")
    if not command.exists():
        pytest.skip("package not installed with its commands (pip install -e .)")
    usage = subprocess.run([str(command)], capture_output=True, text=True)
    assert usage.returncode == 2
    error = subprocess.run([str(command), "--inspect", str(tmp_path / "absent.pth")], capture_output=True, text=True)
    assert error.returncode == 1 and "Traceback" not in error.stderr
    assert len(error.stderr.strip().splitlines()) == 1
