"""Generate the flat remote-code files of a Hub repository from our packages.

The Hub's remote code (`trust_remote_code=True`) loads single modules that sit at the top of the repository and
follows only single-dot relative imports to sibling files (`from .configuration_detris import DetrisConfig`);
sub-packages and `..` imports are not supported (transformers `dynamic_module_utils.get_relative_imports`). Our code
lives in packages of several modules, so `detris export` concatenates each package into one file:

- the modules a root module needs are found by following its intra-package imports (relative ones, and absolute
  ones naming the package itself), and are emitted in dependency order;
- sub-packages are flattened too (their `__init__` runs where it sits in the order, e.g. a registration);
  `..` imports inside a sub-package are intra-package imports like any other;
- intra-package imports are dropped (the names they import are now defined in the same file). An import inside a
  function (a lazy import) becomes `pass`, or `alias = name` when it renamed the name;
- imports of another of our packages become a sibling import (`from configuration_detris import DetrisConfig`
  -> `from .configuration_detris import DetrisConfig`), allowed only towards the files listed in `siblings`;
- third-party top-level imports are hoisted, de-duplicated, to the top of the file; the `__all__` lists are merged;
- a name defined by two modules (or by a module and a hoisted import) would be silently rebound by the
  concatenation: the later module's definition is renamed (`_<module>__<name>`) together with every reference
  to it in that module and in the modules importing it; two imports binding one name to different things, or a
  duplicate that is also a parameter / keyword name, are refused.

The result is checked: it must compile, its relative imports must name shipped sibling files, and its absolute
imports must be runtime dependencies a user has (`RUNTIME_IMPORTS`).
"""

import ast
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

# Import names of the declared runtime dependencies (setup.cfg install_requires) plus the standard library, which
# the remote code may import. Anything else would fail `check_imports` on a user's machine.
RUNTIME_IMPORTS = frozenset(
    {"torch", "transformers", "peft", "safetensors", "huggingface_hub", "numpy", "PIL", "cv2", "ftfy", "regex"}
)
FIRST_PARTY = ("configuration_detris", "modeling_detris", "processing_detris", "training", "hub_card")


@dataclass(frozen=True)
class FlatFileSpec:
    """One generated file: `name`.py made of `package`'s `roots` modules and everything they import."""

    name: str
    package: str
    roots: tuple[str, ...]
    siblings: tuple[str, ...] = ()  # flat files this one may import from (`from .x import ...`)
    docstring: str = ""


HUB_FILES = (
    FlatFileSpec(
        "configuration_detris",
        "configuration_detris",
        ("configuration_detris",),
        docstring="DETRIS configuration (generated from the detris-hf package `configuration_detris`).",
    ),
    FlatFileSpec(
        "modeling_detris",
        "modeling_detris",
        ("modeling_detris",),
        siblings=("configuration_detris",),
        docstring="DETRIS model (generated from the detris-hf package `modeling_detris`).",
    ),
    FlatFileSpec(
        "processing_detris",
        "processing_detris",
        ("processing_detris",),
        siblings=("configuration_detris",),
        docstring="DETRIS processor, image processor and tokenizer (generated from the detris-hf package "
        "`processing_detris`).",
    ),
)

PIPELINE_FILE = FlatFileSpec(
    "pipeline_detris",
    "hub_card",
    ("pipeline",),
    docstring="The `referring-image-segmentation` pipeline of DETRIS (generated from `hub_card.pipeline`).",
)


class FlattenError(ValueError):
    """The package cannot be turned into one remote-code file; the message names the module and the statement."""


@dataclass
class _Module:
    key: str  # dotted name relative to the package root, e.g. "modeling_detris" or "peft_detris.layer"
    path: Path
    source: str
    tree: ast.Module
    top_deps: list[str] = field(default_factory=list)  # modules imported at module level
    lazy_deps: list[str] = field(default_factory=list)  # modules imported inside functions


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FlattenError(f"cannot find the package {package!r} to flatten; expected an importable package folder")
    return Path(list(spec.submodule_search_locations)[0])


def _module_file(root: Path, key: str) -> Path | None:
    base = root.joinpath(*key.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _is_package_init(path: Path) -> bool:
    return path.name == "__init__.py"


class _Resolver:
    def __init__(self, package: str, root: Path, siblings: tuple[str, ...]):
        self.package, self.root, self.siblings = package, root, siblings

    def classify(self, module: _Module, node: ast.ImportFrom | ast.Import):
        """('intra', key) | ('sibling', flat_name) | ('external', None); raises for what cannot be flattened."""
        where = f"{module.path}:{node.lineno}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in FIRST_PARTY:
                    raise FlattenError(
                        f"{where}: `import {alias.name}` imports one of our packages as a module; remote code needs "
                        f"`from {alias.name} import name` (resolvable to a flat file)"
                    )
            return "external", None
        if node.level >= 1:
            parts = module.key.split(".")
            if not _is_package_init(module.path):
                parts = parts[:-1]  # the package the module sits in
            if node.level - 1 > len(parts):
                raise FlattenError(
                    f"{where}: `{'.' * node.level}{node.module or ''}` climbs above the package {self.package!r}; "
                    "expected an import inside the package"
                )
            parts = parts[: len(parts) - (node.level - 1)]
            if node.module is None:  # `from . import x`
                raise FlattenError(f"{where}: `from . import ...` cannot be flattened; expected `from .module import name`")
            target = ".".join(parts + node.module.split("."))
            return "intra", self._existing(target, where)
        top = (node.module or "").split(".")[0]
        if top == self.package:
            target = node.module[len(self.package) + 1 :] if "." in node.module else ""
            if not target:
                raise FlattenError(
                    f"{where}: `from {node.module} import ...` imports the package's __init__, which is not flattened; "
                    f"import from the defining module instead"
                )
            return "intra", self._existing(target, where)
        if top in FIRST_PARTY:
            if top not in self.siblings:
                raise FlattenError(
                    f"{where}: `from {node.module} import ...` reaches the package {top!r}, which this remote-code file "
                    f"may not import; allowed sibling files: {list(self.siblings)}"
                )
            return "sibling", top
        return "external", None

    def _existing(self, key: str, where: str) -> str:
        if _module_file(self.root, key) is None:
            raise FlattenError(f"{where}: the import names module {key!r}, but {self.root} has no such file")
        return key


def _load(root: Path, key: str) -> _Module:
    path = _module_file(root, key)
    source = path.read_text(encoding="utf-8")
    return _Module(key, path, source, ast.parse(source, filename=str(path)))


def _collect(spec: FlatFileSpec, root: Path) -> tuple[list[_Module], _Resolver]:
    resolver = _Resolver(spec.package, root, spec.siblings)
    modules: dict[str, _Module] = {}
    pending = list(spec.roots)
    while pending:
        key = pending.pop()
        if key in modules:
            continue
        if _module_file(root, key) is None:
            raise FlattenError(f"the package {spec.package!r} has no module {key!r} (looked in {root})")
        module = _load(root, key)
        modules[key] = module
        top_level = set(map(id, module.tree.body))
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                kind, target = resolver.classify(module, node)
                if kind == "intra":
                    (module.top_deps if id(node) in top_level else module.lazy_deps).append(target)
                    pending.append(target)
    # Dependency order (module-level imports only; lazy imports need no order but must be present).
    ordered, state = [], {}

    def visit(key, chain):
        if state.get(key) == "done":
            return
        if state.get(key) == "active":
            raise FlattenError(f"circular module-level imports cannot be flattened: {' -> '.join(chain + [key])}")
        state[key] = "active"
        for dep in modules[key].top_deps:
            visit(dep, chain + [key])
        state[key] = "done"
        ordered.append(modules[key])

    for key in sorted(modules):
        visit(key, [])
    # Put the roots' own dependency chains first in a stable, readable order: sort only ties via the DFS above.
    return ordered, resolver


def _bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    names = []
    for target in targets:
        for sub in ast.walk(target):
            if isinstance(sub, ast.Name):
                names.append(sub.id)
    return names


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _segment(source_lines: list[str], node: ast.AST) -> str:
    return "".join(source_lines[node.lineno - 1 : node.end_lineno])


def _top_level_definitions(module: _Module) -> dict[str, int]:
    """Names a module defines at its top level (functions, classes, assignments) -> line."""
    names = {}
    for index, node in enumerate(module.tree.body):
        if index == 0 and _is_docstring(node) or isinstance(node, (ast.Import, ast.ImportFrom)) or _is_main_guard(node):
            continue
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            continue
        for name in _bound_names(node):
            names.setdefault(name, node.lineno)
    return names


def _mangled(module_key: str, name: str) -> str:
    return f"_{module_key.replace('.', '_')}__{name.lstrip('_')}"


class _Flattener:
    """Two passes: decide every module's final top-level names (renaming later duplicates), then emit."""

    def __init__(self, spec: FlatFileSpec, root: Path):
        self.spec, self.root = spec, root
        self.modules, self.resolver = _collect(spec, root)
        self.by_key = {m.key: m for m in self.modules}
        self.definitions = {m.key: _top_level_definitions(m) for m in self.modules}
        self.final: dict[tuple[str, str], str] = {}  # (module, defined name) -> name in the flat file
        self.external: dict[str, str] = {}  # name bound by a hoisted import -> what it imports
        self.sibling: dict[str, str] = {}  # name bound by a sibling import -> "file:name"
        self._plan()

    # -- pass 1 ------------------------------------------------------------------------------------------------
    def _plan(self):
        taken: dict[str, str] = {}  # flat name -> owner description
        for module in self.modules:
            for node in module.tree.body:
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not (
                    isinstance(node, ast.ImportFrom) and node.module == "__future__"
                ):
                    kind, target = self.resolver.classify(module, node)
                    if kind == "intra":
                        continue
                    for alias in node.names:
                        if alias.name == "*":
                            raise FlattenError(f"{module.path}:{node.lineno}: star imports cannot be flattened")
                        bound = alias.asname or alias.name.split(".")[0]
                        what = (f"{target}:{alias.name}" if kind == "sibling"
                                else f"{getattr(node, 'module', None) or ''}:{alias.name}")
                        table = self.sibling if kind == "sibling" else self.external
                        if bound in taken and taken[bound] != f"import {what}":
                            raise FlattenError(
                                f"{module.path}:{node.lineno}: `{ast.unparse(node)}` binds {bound!r}, which is already "
                                f"bound by {taken[bound]}; import it under another name"
                            )
                        taken[bound] = f"import {what}"
                        table[bound] = what
        for module in self.modules:
            for name in self.definitions[module.key]:
                final = name
                if name in taken:
                    final = _mangled(module.key, name)
                    self._check_renamable(module, name)
                if final in taken:
                    raise FlattenError(f"cannot rename {name!r} of {module.path} to {final!r}: the name is taken")
                taken[final] = f"the definition in {module.path.relative_to(self.root.parent).as_posix()}"
                self.final[(module.key, name)] = final

    def _check_renamable(self, module: _Module, name: str):
        for node in ast.walk(module.tree):
            if isinstance(node, ast.arg) and node.arg == name or isinstance(node, ast.keyword) and node.arg == name:
                raise FlattenError(
                    f"{module.path}:{node.lineno}: {name!r} is defined by two modules of {self.spec.package!r} and is "
                    "also used as a parameter / keyword name here, so it cannot be renamed safely; rename it"
                )
            if isinstance(node, (ast.Global, ast.Nonlocal)) and name in node.names:
                raise FlattenError(f"{module.path}:{node.lineno}: {name!r} is declared global; rename it")

    def resolve(self, key: str, name: str, chain=()) -> str:
        """The flat-file name of `name` as seen in module `key` (following intra-package re-exports)."""
        if (key, name) in self.final:
            return self.final[(key, name)]
        module = self.by_key[key]
        for node in module.tree.body:
            if isinstance(node, ast.ImportFrom):
                kind, target = self.resolver.classify(module, node)
                for alias in node.names:
                    if (alias.asname or alias.name) != name:
                        continue
                    if kind == "intra":
                        if (target, alias.name) in chain:
                            raise FlattenError(f"circular re-export of {name!r} through {[c[0] for c in chain]}")
                        return self.resolve(target, alias.name, chain + ((key, name),))
                    return alias.asname or alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if (alias.asname or alias.name.split(".")[0]) == name:
                        return name
        raise FlattenError(
            f"{module.path} is asked for {name!r}, which it neither defines nor imports at module level"
        )

    # -- pass 2 ------------------------------------------------------------------------------------------------
    def _renames(self, module: _Module) -> dict[str, str]:
        """Module-level names of `module` whose flat name differs: its own renamed definitions and the names it
        imports from other modules of the package."""
        renames = {}
        for name in self.definitions[module.key]:
            if self.final[(module.key, name)] != name:
                renames[name] = self.final[(module.key, name)]
        for node in module.tree.body:
            if isinstance(node, ast.ImportFrom):
                kind, target = self.resolver.classify(module, node)
                if kind != "intra":
                    continue
                for alias in node.names:
                    local = alias.asname or alias.name
                    final = self.resolve(target, alias.name)
                    if final != local:
                        renames[local] = final
        return renames

    def emit_module(self, module: _Module, header_imports: list[str], sibling_imports: dict, future: list,
                    exported: list) -> str:
        source_lines = module.source.splitlines(keepends=True)
        lines = [line.encode("utf-8") for line in source_lines]
        rel = module.path.relative_to(self.root.parent).as_posix()
        renames = self._renames(module)

        # Name edits (positions are UTF-8 byte offsets, as ast gives them).
        edits: dict[int, list[tuple[int, int, str]]] = {}
        if renames:
            for node in ast.walk(module.tree):
                if isinstance(node, ast.Name) and node.id in renames:
                    edits.setdefault(node.lineno, []).append((node.col_offset, node.end_col_offset, renames[node.id]))
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in renames:
                    line = lines[node.lineno - 1]
                    keyword = b"class " if isinstance(node, ast.ClassDef) else b"def "
                    start = line.index(keyword, node.col_offset) + len(keyword)
                    while line[start : start + 1] == b" ":
                        start += 1
                    if line[start : start + len(node.name)] != node.name.encode():
                        raise FlattenError(f"{rel}:{node.lineno}: could not locate the name of {node.name!r} to rename it")
                    edits.setdefault(node.lineno, []).append((start, start + len(node.name), renames[node.name]))
        for line_no, line_edits in edits.items():
            line = lines[line_no - 1]
            for start, end, text in sorted(line_edits, reverse=True):
                line = line[:start] + text.encode() + line[end:]
            lines[line_no - 1] = line
        text_lines = [line.decode("utf-8") for line in lines]

        replacements: dict[int, tuple[int, str]] = {}  # first line -> (last line, new text)
        top_level_ids = set()
        for index, node in enumerate(module.tree.body):
            top_level_ids.add(id(node))
            where = f"{rel}:{node.lineno}"
            if index == 0 and _is_docstring(node) or _is_main_guard(node):
                replacements[node.lineno] = (node.end_lineno, "")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                replacements[node.lineno] = (node.end_lineno, "")
                if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                    future.append(_segment(source_lines, node).strip())
                    continue
                kind, target = self.resolver.classify(module, node)
                if kind == "external":
                    text = _segment(source_lines, node).strip()
                    if text not in header_imports:
                        header_imports.append(text)
                elif kind == "sibling":
                    for alias in node.names:
                        entry = alias.name if not alias.asname else f"{alias.name} as {alias.asname}"
                        names = sibling_imports.setdefault(target, [])
                        if entry not in names:
                            names.append(entry)
            elif isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
                try:
                    names = ast.literal_eval(node.value)
                except ValueError as error:
                    raise FlattenError(f"{where}: __all__ must be a literal list of names to be merged") from error
                for name in names:
                    if name in self.definitions[module.key] and self.final[(module.key, name)] != name:
                        continue  # a renamed duplicate: the flat file exports the other module's name
                    if name not in exported:
                        exported.append(name)
                replacements[node.lineno] = (node.end_lineno, "")
        # Imports inside functions (lazy imports).
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.ImportFrom) or id(node) in top_level_ids:
                continue
            kind, target = self.resolver.classify(module, node)
            if kind == "external":
                continue
            first = text_lines[node.lineno - 1]
            indent = first[: len(first) - len(first.lstrip())]
            if kind == "sibling":
                text = f"{indent}from .{target} import {', '.join(ast.unparse(a) for a in node.names)}\n"
            else:
                assignments = []
                for alias in node.names:
                    local, final = alias.asname or alias.name, self.resolve(target, alias.name)
                    if local != final:
                        assignments.append(f"{indent}{local} = {final}\n")
                text = "".join(assignments) or f"{indent}pass  # flattened: {ast.unparse(node)}\n"
            replacements[node.lineno] = (node.end_lineno, text)

        out, line_no = [], 1
        while line_no <= len(text_lines):
            if line_no in replacements:
                end, text = replacements[line_no]
                out.append(text)
                line_no = end + 1
            else:
                out.append(text_lines[line_no - 1])
                line_no += 1
        body = "".join(out).strip("\n")
        while "\n\n\n\n" in body:
            body = body.replace("\n\n\n\n", "\n\n\n")
        note = ""
        if any(self.final[(module.key, n)] != n for n in self.definitions[module.key]):
            renamed = [f"{n} -> {self.final[(module.key, n)]}" for n in self.definitions[module.key]
                       if self.final[(module.key, n)] != n]
            note = f"# renamed here (defined by another module too): {', '.join(renamed)}\n"
        return f"# {'-' * 110}\n# from {rel}\n{note}# {'-' * 110}\n\n{body}\n"

    def source(self) -> str:
        header_imports, sibling_imports, future, exported = [], {}, [], []
        sections = [self.emit_module(m, header_imports, sibling_imports, future, exported) for m in self.modules]
        flat_names = set(self.final.values()) | set(self.external) | set(self.sibling)
        missing = [name for name in exported if name not in flat_names]
        if missing:
            raise FlattenError(f"{self.spec.name}.py would export names it does not define: {missing}")
        module_list = ", ".join(m.path.relative_to(self.root.parent).as_posix() for m in self.modules)
        parts = [
            "# coding=utf-8\n"
            "# Copyright 2025 The detris-hf authors. Licensed under the MIT License.\n"
            f"# GENERATED by `detris export` from {module_list}.\n"
            "# Do not edit: change the package and export again.\n",
            f'"""{self.spec.docstring}"""\n' if self.spec.docstring else "",
        ]
        if future:
            parts.append("\n".join(dict.fromkeys(future)) + "\n")
        parts.append("\n".join(header_imports) + "\n")
        for target, names in sibling_imports.items():
            parts.append(f"from .{target} import {', '.join(names)}\n")
        parts.append("\n\n" + "\n\n".join(sections))
        if exported:
            parts.append("\n\n__all__ = [\n" + "".join(f'    "{name}",\n' for name in exported) + "]\n")
        return "\n".join(p for p in parts if p)


def flatten(spec: FlatFileSpec, root: Path | None = None) -> str:
    """The source of `spec.name`.py: the package's modules concatenated for remote code."""
    return _Flattener(spec, root or package_dir(spec.package)).source()


def check_flat_file(path: Path, shipped: set[str]) -> None:
    """Refuse a generated file that would not load as remote code: syntax, relative imports to files that are not
    shipped (`shipped` holds the stems of the sibling files), absolute imports of packages users do not have."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    source = path.read_text(encoding="utf-8")
    compile(source, str(path), "exec")
    for relative in get_relative_imports(str(path)):
        if relative not in shipped:
            raise FlattenError(f"{path.name} imports .{relative}, which is not one of the shipped files {sorted(shipped)}")
    stdlib = set(getattr(__import__("sys"), "stdlib_module_names", ()))
    for name in get_imports(str(path)):
        if name not in RUNTIME_IMPORTS and name not in stdlib:
            raise FlattenError(
                f"{path.name} imports {name!r}, which is neither a declared runtime dependency "
                f"({sorted(RUNTIME_IMPORTS)}) nor the standard library"
            )
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in FIRST_PARTY:
            raise FlattenError(f"{path.name}:{node.lineno} still imports our package {node.module!r}")


def write_flat_files(output_dir, specs=HUB_FILES) -> list[Path]:
    """Generate every file of `specs` into `output_dir` and check them; returns the written paths."""
    output_dir = Path(output_dir)
    written = []
    for spec in specs:
        path = output_dir / f"{spec.name}.py"
        path.write_text(flatten(spec), encoding="utf-8")
        written.append(path)
    shipped = {p.stem for p in output_dir.glob("*.py")}
    for path in written:
        check_flat_file(path, shipped)
    return written


__all__ = ["FlatFileSpec", "FlattenError", "HUB_FILES", "PIPELINE_FILE", "check_flat_file", "flatten", "write_flat_files"]
