"""Architecture checks: layers import only downwards (docs/architecture.md), no import
cycles between lada's modules, and configs load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. A module may import its own package and lower layers; the packages of
# one layer (hosts and plugin) must not import each other.
LAYERS = [
    ["lada.schema", "lada.timing", "lada.threads"],  # timing and threads import no lada module
    ["lada.data"],  # records, answers, loaders, the synthetic task: plain Python, no config
    ["lada.registry"],
    ["lada.config"],
    ["lada.models"],
    ["lada.protocol"],
    ["lada.hosts", "lada.plugin"],
    ["lada.engines"],
    ["lada.experiments"],
    ["lada.cli"],
    ["lada.__main__"],  # `python -m lada`: calls lada.cli
]


def _package(module: str) -> str | None:
    for group in LAYERS:
        for pkg in group:
            if module == pkg or module.startswith(pkg + "."):
                return pkg
    return None


def _layer(pkg: str) -> int:
    return next(i for i, group in enumerate(LAYERS) if pkg in group)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def lada_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a lada module in the file, at any depth
    (function-level included), except under ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lada")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "lada":
            if node.module == "lada":  # from lada import registry
                out.extend((node.lineno, f"lada.{a.name}") for a in node.names)
            else:
                out.append((node.lineno, node.module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def all_imports() -> dict[str, list[tuple[int, str]]]:
    return {_module_name(p): lada_imports(p) for p in sorted((ROOT / "lada").rglob("*.py"))}


def test_every_module_belongs_to_a_layer():
    assert [m for m in all_imports() if m != "lada" and _package(m) is None] == []


def test_layers_import_only_downwards():
    bad = []
    for module, imports in all_imports().items():
        src = _package(module)
        if src is None:
            continue
        for line, target in imports:
            dst = _package(target)
            if dst is None or dst == src:
                continue
            if _layer(dst) >= _layer(src):
                bad.append(f"{module}:{line} imports {target} ({dst} is not below {src})")
    assert bad == [], "\n".join(bad)


def test_no_import_cycles_between_modules():
    imports = all_imports()
    graph = {m: {t for _, t in imps if t in imports and t != m} for m, imps in imports.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                dfs(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m, [m])
    assert cycles == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nif TYPE_CHECKING:\n    from lada.hosts import x\n"
                   "def f():\n    from lada.engines.launch import run_engine\n")
    assert lada_imports(bad) == [(5, "lada.engines.launch")]


def _fresh_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_config_loading_does_not_import_torch():
    """Config validation (host and plug-in options included) is pure Python: a config
    error is never a missing-torch error, and tools that only read configs stay light."""
    out = _fresh_python(
        "import sys, lada.config as c\n"
        "assert 'torch' not in sys.modules, 'import lada.config'\n"
        "for host in ('cot', 'fedmkt', 'fedcollm', 'standalone'):\n"
        "    plugin = 'none' if host == 'standalone' else 'lada'\n"
        "    cfg = c.load_config('configs/default.toml', [f'host={{name=\"{host}\"}}', f'plugin.name=\"{plugin}\"'])\n"
        "print('torch' in sys.modules, cfg.plugin_name)")
    assert out == "False none"
    out = _fresh_python("import sys, lada.config as c\n"
                        "cfg = c.load_config('configs/default.toml', ['plugin.name=\"lada\"'])\n"
                        "print('torch' in sys.modules, cfg.plugin_name)")
    assert out == "False lada"
