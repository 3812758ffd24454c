"""The remote code of an exported DETRIS folder: our role files, copied.

The Hub's remote code (`trust_remote_code=True`) loads modules that sit at the top of the repository and follows only
single-dot relative imports to sibling files (`from .configuration_detris import DetrisConfig`). Our role files are
written so that they can be copied as they are:

| shipped file                 | copied from                                   | may import (of ours)                      |
|------------------------------|-----------------------------------------------|-------------------------------------------|
| `configuration_detris.py`    | `configuration_detris/configuration_detris.py` | nothing                                   |
| `modeling_detris.py`         | `modeling_detris/modeling_detris.py`           | `configuration_detris`                    |
| `image_processing_detris.py` | `processing_detris/image_processing_detris.py` | `configuration_detris`, sibling role files |
| `tokenization_detris.py`     | `processing_detris/tokenization_detris.py`     | `configuration_detris`, sibling role files |
| `processing_detris.py`       | `processing_detris/processing_detris.py`       | `configuration_detris`, sibling role files |
| `pipeline_detris.py`         | `hub_card/pipeline.py`                         | nothing                                   |
| `quantization_detris.py`     | `modeling_detris/quantization_detris.py`       | nothing (the fast CPU path; torch only)   |

The only change made while copying: `from configuration_detris import X` and
`from configuration_detris.configuration_detris import X` become `from .configuration_detris import X` (and
`from configuration_detris.release import X` becomes `from .release import X`, shipping the release table beside
them). Relative imports of shipped sibling files stay as they are. Any other import of our packages (another module
of a package, `modeling_detris`, `training`, ...) and any third-party import that is not a runtime dependency is
refused with the file, the line and the import, so a broken layout is caught at export, not on a user's machine.
"""

import ast
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# Import names of the runtime dependencies (setup.cfg install_requires) the remote code may use besides the
# standard library.
RUNTIME_IMPORTS = frozenset(
    {"torch", "transformers", "peft", "safetensors", "huggingface_hub", "numpy", "PIL", "cv2", "ftfy", "regex"}
)
OUR_PACKAGES = ("configuration_detris", "modeling_detris", "processing_detris", "training", "hub_card", "benchmarks")


@dataclass(frozen=True)
class RoleFile:
    """One shipped file: `name`.py copied from `package`/`module`.py; `data` files of the package ship beside it."""

    name: str
    package: str
    module: str
    data: tuple[str, ...] = ()


CONFIGURATION_FILE = RoleFile("configuration_detris", "configuration_detris", "configuration_detris")
RELEASE_FILE = RoleFile("release", "configuration_detris", "release")
ROLE_FILES = (
    CONFIGURATION_FILE,
    RoleFile("modeling_detris", "modeling_detris", "modeling_detris"),
    RoleFile("image_processing_detris", "processing_detris", "image_processing_detris"),
    # the CLIP BPE merges a tokenizer built without files reads, and their licences
    RoleFile("tokenization_detris", "processing_detris", "tokenization_detris",
             data=("bpe_simple_vocab_16e6.txt.gz", "LICENSE_bpe_vocab.md", "LICENSE_open_clip")),
    RoleFile("processing_detris", "processing_detris", "processing_detris"),
)
PIPELINE_FILE = RoleFile("pipeline_detris", "hub_card", "pipeline")
# `optimize_for_cpu`, loaded by the Space's app from the exported folder (`get_class_from_dynamic_module`)
QUANTIZATION_FILE = RoleFile("quantization_detris", "modeling_detris", "quantization_detris")
HUB_FILES = ROLE_FILES + (PIPELINE_FILE, QUANTIZATION_FILE)

# absolute imports of ours that a role file may use -> the shipped file they become a sibling import of
SIBLING_REWRITES = {
    "configuration_detris": CONFIGURATION_FILE,
    "configuration_detris.configuration_detris": CONFIGURATION_FILE,
    "configuration_detris.release": RELEASE_FILE,
}


class RemoteCodeError(ValueError):
    """A role file cannot be shipped as remote code; the message names the file, the line and the import."""


def package_dir(package: str) -> Path:
    """The folder of one of our packages, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RemoteCodeError(f"cannot find the package {package!r}; expected it importable (detris-hf installed)")
    return Path(list(spec.submodule_search_locations)[0])


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _is_allowed_external(module: str) -> bool:
    top = module.split(".")[0]
    return top in RUNTIME_IMPORTS or top in sys.stdlib_module_names or top == "__future__"


def _char_column(line: str, byte_offset: int) -> int:
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))


def copy_role_source(path, shipped: dict[str, Path]) -> tuple[str, set[str]]:
    """The source of the role file `path` with its configuration imports made sibling imports, and the names of the
    extra shipped files it needs (e.g. `release`). `shipped` maps the shipped file names (without `.py`) to the
    source files they are copied from. Raises `RemoteCodeError` for any other import of our packages."""
    path = Path(path)
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as error:
        raise RemoteCodeError(f"{path} does not parse ({error}); expected a Python role file") from error
    lines = source.splitlines(keepends=True)
    edits, needs = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OUR_PACKAGES:
                    raise RemoteCodeError(
                        f"{path}:{node.lineno}: `import {alias.name}` imports one of our packages; a role file shipped "
                        "as remote code may only use `from configuration_detris import ...` and sibling role files"
                    )
                if not _is_allowed_external(alias.name):
                    raise RemoteCodeError(
                        f"{path}:{node.lineno}: `import {alias.name}` is not a runtime dependency; expected the standard "
                        f"library or one of {sorted(RUNTIME_IMPORTS)}"
                    )
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        names = ", ".join(alias.name for alias in node.names)
        shown = f"from {'.' * node.level}{node.module or ''} import {names}"
        if node.level == 1 and node.module and "." not in node.module:
            if node.module not in shipped:
                raise RemoteCodeError(
                    f"{path}:{node.lineno}: `{shown}` imports a module that is not shipped as remote code; expected "
                    f"only sibling role files {sorted(shipped)}"
                )
            continue
        if node.level >= 1:
            raise RemoteCodeError(
                f"{path}:{node.lineno}: `{shown}` is not a single-dot import of a sibling role file; the Hub's remote "
                f"code only follows those (shipped: {sorted(shipped)})"
            )
        module = node.module or ""
        if module in SIBLING_REWRITES:
            target = SIBLING_REWRITES[module]
            target_path = package_dir(target.package) / f"{target.module}.py"
            defined = _top_level_names(ast.parse(target_path.read_text(encoding="utf-8")))
            missing = [alias.name for alias in node.names if alias.name != "*" and alias.name not in defined]
            if missing:
                raise RemoteCodeError(
                    f"{path}:{node.lineno}: `{shown}` needs {missing}, which {target_path} does not define; remote "
                    f"code imports them from the shipped {target.name}.py, so import them from where they are defined"
                )
            if target.name != CONFIGURATION_FILE.name:
                needs.add(target.name)
            line = lines[node.lineno - 1]
            start = _char_column(line, node.col_offset)
            match = re.compile(r"from\s+" + re.escape(module) + r"\s+import\b").match(line, start)
            if match is None:
                raise RemoteCodeError(f"{path}:{node.lineno}: cannot rewrite `{shown}`; expected it on one line "
                                      f"starting with `from {module} import`")
            edits.append((node.lineno - 1, match.start(), match.end(), f"from .{target.name} import"))
            continue
        if module.split(".")[0] in OUR_PACKAGES:
            raise RemoteCodeError(
                f"{path}:{node.lineno}: `{shown}` imports one of our packages; a role file shipped as remote code may "
                f"only import {sorted(SIBLING_REWRITES)} (made sibling imports) and sibling role files"
            )
        if not _is_allowed_external(module):
            raise RemoteCodeError(
                f"{path}:{node.lineno}: `{shown}` is not a runtime dependency; expected the standard library or one of "
                f"{sorted(RUNTIME_IMPORTS)}"
            )
    for index, start, end, replacement in sorted(edits, reverse=True):
        lines[index] = lines[index][:start] + replacement + lines[index][end:]
    return "".join(lines), needs


def write_remote_code(output_dir, files=HUB_FILES) -> list[str]:
    """Copy the role files `files` (and the data files and extra modules they need) into `output_dir`, with the
    configuration imports made sibling imports; returns the written file names. Writes nothing when a file breaks the
    layout (see the module docstring)."""
    output_dir = Path(output_dir)
    sources = {spec.name: package_dir(spec.package) / f"{spec.module}.py" for spec in files}
    for name, source in sources.items():
        if not source.is_file():
            raise RemoteCodeError(f"the role file {source} is missing; expected it to ship as {name}.py")
    shipped = dict(sources)
    shipped[RELEASE_FILE.name] = package_dir(RELEASE_FILE.package) / f"{RELEASE_FILE.module}.py"
    copies, extra = {}, set()
    for name, source in sources.items():
        copies[name], needs = copy_role_source(source, shipped)
        extra |= needs
    for name in sorted(extra - set(copies)):
        copies[name], _ = copy_role_source(shipped[name], shipped)
    written = []
    for name, text in copies.items():
        (output_dir / f"{name}.py").write_text(text, encoding="utf-8")
        written.append(f"{name}.py")
    for spec in files:
        folder = package_dir(spec.package)
        for data_name in spec.data:
            if not (folder / data_name).is_file():
                raise RemoteCodeError(f"{folder / data_name} is missing; expected it to ship beside {spec.name}.py")
            (output_dir / data_name).write_bytes((folder / data_name).read_bytes())
            written.append(data_name)
    return written


__all__ = ["HUB_FILES", "PIPELINE_FILE", "QUANTIZATION_FILE", "ROLE_FILES", "RemoteCodeError", "RoleFile", "copy_role_source",
           "write_remote_code"]
