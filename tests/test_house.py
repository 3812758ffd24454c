"""The import arrows of the project, read from the source with `ast` (imports inside functions included).

configuration_detris is the leaf; modeling_detris and processing_detris import only it; training and hub_card build on
those three and never import each other; nothing imports benchmarks; no circle between files; no private name taken
from another module; the files the Hub export ships import nothing of ours but what the export rewrites.
"""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configuration_detris", "modeling_detris", "processing_detris", "training", "hub_card", "benchmarks")
ALLOWED = {
    "configuration_detris": set(),
    "modeling_detris": {"configuration_detris"},
    "processing_detris": {"configuration_detris"},
    "training": {"configuration_detris", "modeling_detris", "processing_detris"},
    "hub_card": {"configuration_detris", "modeling_detris", "processing_detris"},
    "benchmarks": {"configuration_detris", "modeling_detris", "processing_detris", "training"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(absolute target, imported names, line) for every import statement of `module`."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def _edges() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for module in MODULES:
        for base, names, _ in _imports(module):
            targets = [_resolve(f"{base}.{name}") for name in names] + [_resolve(base)]
            for target in targets:
                if target and target != module:
                    edges[module].add(target)
    return edges


def test_package_arrows_follow_the_data_flow():
    package_edges = defaultdict(set)
    for source, targets in _edges().items():
        for target in targets:
            a, b = source.split(".")[0], target.split(".")[0]
            if a != b:
                package_edges[a].add(b)
    forbidden = sorted(f"{a} -> {b}" for a, bs in package_edges.items() for b in bs if b not in ALLOWED[a])
    assert forbidden == []
    # The arrows the layers are built on really exist (a rename that silently cut them would pass the check above).
    for source, target in [("modeling_detris", "configuration_detris"), ("processing_detris", "configuration_detris"),
                           ("training", "modeling_detris"), ("training", "processing_detris"),
                           ("hub_card", "modeling_detris"), ("hub_card", "processing_detris")]:
        assert target in package_edges[source], f"{source} no longer imports {target}"


def test_no_import_circle_between_files():
    edges = _edges()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert circles == []


def test_no_private_name_is_imported_from_another_module():
    private = []
    for module in MODULES:
        for base, names, line in _imports(module):
            if _resolve(base) and _resolve(base) != module:
                private += [f"{MODULES[module].relative_to(ROOT)}:{line} {name} from {base}"
                            for name in names if name.startswith("_") and not name.startswith("__")]
    assert private == []


@pytest.mark.parametrize("role_file", [
    "modeling_detris/modeling_detris.py",
    "processing_detris/image_processing_detris.py",
    "processing_detris/tokenization_detris.py",
    "processing_detris/processing_detris.py",
])
def test_role_files_import_only_the_configuration_and_siblings(role_file):
    """The Hub export copies these files beside `configuration_detris.py`: of our code they may import only the
    configuration (rewritten into a sibling import) and, relatively, files of their own folder."""
    module = role_file[: -len(".py")].replace("/", ".")
    folder = module.rpartition(".")[0]
    bad = []
    for base, _, line in _imports(module):
        target = _resolve(base)
        if target is None:
            continue
        if target.split(".")[0] == "configuration_detris" or target.rpartition(".")[0] == folder:
            continue
        bad.append(f"{role_file}:{line} imports {base}")
    assert bad == []


def test_the_dispatcher_imports_subcommands_by_name_only():
    """`detris --help` must not pay for torch: training/cli.py names its subcommands' modules as strings."""
    statically_imported = {_resolve(base) for base, _, _ in _imports("training.cli")} - {None}
    assert statically_imported == set()
