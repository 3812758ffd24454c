"""Every `detris X --help` prints its options at once: neither torch nor transformers is imported before the
arguments are parsed (measured in a fresh interpreter, with a generous wall-clock bound)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent

FAST = sorted(COMMANDS)

CHECK = """
import sys
from training.cli import main
try:
    main(sys.argv[1:] + ["--help"])
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("HEAVY", sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules))
"""


@pytest.mark.parametrize("command", FAST)
def test_help_imports_neither_torch_nor_transformers_and_is_quick(command):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHECK, command], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"usage: detris {command}" in result.stdout and "HEAVY []" in result.stdout, result.stdout[-2000:]
    assert seconds < 3.0, f"detris {command} --help took {seconds:.1f} s"


def test_after_a_help_the_packages_import_for_real():
    # --help imports a command's module without its package's __init__; that shortcut must not outlive the help
    code = CHECK + """
import hub_card, modeling_detris
from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY
assert hub_card.TASK in PIPELINE_REGISTRY.supported_tasks
assert modeling_detris.DetrisConfig.model_type == "detris"
print("REAL", AutoModel.from_config.__qualname__)
"""
    result = subprocess.run([sys.executable, "-c", code, "card"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "HEAVY []" in result.stdout and "REAL" in result.stdout, result.stderr[-3000:]
    result = subprocess.run([sys.executable, "-c", code, "info"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "HEAVY []" in result.stdout and "REAL" in result.stdout, result.stderr[-3000:]
