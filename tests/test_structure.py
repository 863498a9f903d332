"""The shape of the code: imports run one way, and the package maps exactly what it should."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"qlite": "qlite", "quant": "qlite.quant", "kernels": "qlite.kernels"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, name in PACKAGES.items():
        for f in (ROOT / folder).glob("*.py"):
            mods[name if f.stem == "__init__" else f"{name}.{f.stem}"] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> modules of ours it imports, from every import statement in the file
    (function-level ones included; `from x import y` counts x, and x.y when that is a module)."""
    mods = _modules()
    graph = {}
    for name, file in mods.items():
        package = name if file.stem == "__init__" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = f"{parent}.{base}" if base else parent
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith(("kernels", "quant")):  # the top-level spelling
                    t = "qlite." + t
                if t in mods and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "qlite.quant.swap" in graph["qlite.loader"]  # it sees imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_import_nothing_of_ours_and_quant_no_runtime():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("qlite.kernels"):
            assert all(d.startswith("qlite.kernels") for d in deps), (name, deps)
        if name.startswith("qlite.quant.") or name == "qlite.quant":  # below the runtime
            below = {d for d in graph if d.startswith(("qlite.quant.", "qlite.kernels"))} | {"qlite.quant"}
            assert deps <= below | {"qlite.errors", "qlite.model", "qlite.config"}, (name, deps)


def test_the_package_maps_exactly_kernels_quant_and_tui():
    code = ("import importlib, qlite, qlite.kernels, qlite.quant, qlite.tui, qlite.quant.swap\n"
            "print(qlite.kernels.__file__, qlite.quant.swap.__file__, qlite.tui.__file__)\n"
            "for name in ('qlite.setup', 'qlite.bench', 'qlite.tests', 'qlite.docs'):\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "        print('imported', name)\n"
            "    except ImportError:\n"
            "        pass\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert files == [str(ROOT / "kernels" / "__init__.py"), str(ROOT / "quant" / "swap.py"),
                     str(ROOT / "tui.py")]


@pytest.mark.parametrize("message, shown", [
    ("gpu_budget 5.00 GiB is too small: x", "--gpu-budget 5.00 GiB is too small: x"),
    ("gpu_budget/expert_slots: not an MoE model", "--gpu-budget/--expert-slots: not an MoE model"),
    ("keep_16bit 'x': choose", "--keep-16bit 'x': choose"),
    ("/tmp/q: already exists (force=True replaces it)", "/tmp/q: already exists (--force replaces it)"),
    ("policy 'x': choose one of lru, lrfu", "policy 'x': choose one of lru, lrfu"),  # no such flag
    ("/m/config.json: missing field 'bits'", "/m/config.json: missing field 'bits'"),
])
def test_the_cli_names_its_flags_where_the_library_names_parameters(message, shown):
    from qlite.cli import build_parser, flag_message
    assert flag_message(message, build_parser()) == shown


def test_no_library_message_begins_with_a_cli_flag():
    import re
    for folder in ("qlite", "quant", "kernels"):
        for f in (ROOT / folder).glob("*.py"):
            if f.name == "cli.py":
                continue
            found = re.findall(r"(?:QliteError|QliteWarning)\(\s*f?\"--[a-z]", f.read_text())
            assert not found, f"{f}: {found}"
