"""Every Python block of README.md, docs/*.md and the generated cards runs as written, on tiny stand-ins.

Each block runs in a fresh interpreter (so it imports exactly what it says, and nothing registered by the test
process helps it) from a working folder holding the stand-ins. Blocks that name real Hub ids, large checkpoints or
files of the reader's own are mapped to tiny local stand-ins by the explicit table `BLOCKS`: per block, the literal
replacements, the lines it needs before it (what the surrounding prose defines) and the blocks it continues. A block
missing from the table fails the test (no silent skip): add it, with the stand-ins it needs.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

from hub_helpers import save_tiny_model, tiny_clip_config, write_test_image
from official_standins import make_official_checkpoint, write_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = "TINY = DetrisConfig.from_json_file('tiny_config.json')"
TINY_IMPORT = "from configuration_detris import DetrisConfig\n" + TINY + "\n"


@dataclass
class Block:
    """How one documented block runs on the stand-ins: `replace` literal text (real ids -> stand-ins), `before`
    lines standing for what the prose around it defines, `after` the block it continues (same script)."""

    replace: dict = field(default_factory=dict)
    before: str = ""
    after: tuple | None = None


# (file, first line of the block) -> how it runs. Stand-ins in the working folder: `model/` (a tiny DETRIS with its
# processor), `photo.jpg`, `a.jpg`, `b.jpg`, `standins/dinov2` and `standins/clip` (tiny public-layout backbones),
# `tiny_config.json` (their DetrisConfig), `detris-base-release/` (a tiny split release: base, refcoco,
# refcocog-umd), `card.md` / `adapter_card.md` (cards generated for the tiny model and adapter).
BACKBONES = {'"facebook/dinov2-with-registers-base", "openai/clip-vit-base-patch16"': '"standins/dinov2", "standins/clip", config=TINY'}
BLOCKS = {
    ("README.md", "import torch"): Block(replace={"path/to/detris-base-refcoco": "model"}),
    ("README.md", "from modeling_detris import DetrisForReferringSegmentation"): Block(
        replace=BACKBONES, before=TINY_IMPORT),
    ("README.md", "import modeling_detris"): Block(
        replace={'DetrisAdapterConfig.from_preset("base")': "DetrisAdapterConfig.from_model_config(TINY)"},
        before=TINY_IMPORT + "from modeling_detris import DetrisForReferringSegmentation\n"
        "DetrisForReferringSegmentation.from_backbones('standins/dinov2', 'standins/clip', config=TINY, "
        "adapters_in_model=False).save_pretrained('detris-base-backbones')\n"),
    ("docs/data.md", "from processing_detris import DetrisProcessor"): Block(
        before="import torch\nfrom training.data import build_refshapes\n"
        "dd = build_refshapes(n_train=6, n_validation=2, n_test=2, image_size=64)\n"),
    ("docs/data.md", "from training.data import build_letterbox_cache, LetterboxCache, DeviceNormalizer"): Block(
        after=("docs/data.md", "from processing_detris import DetrisProcessor"),
        before="from torch.utils.data import DataLoader\ndevice = 'cpu'\n"),
    ("docs/hub.md", 'import hub_card  # registers "referring-image-segmentation"'): Block(
        replace={'model="DIR", device=0': 'model="model", device="cpu"'}),
    ("docs/peft.md", "import modeling_detris  # registers the model and the PEFT method"): Block(
        replace={'"facebook/dinov2-with-registers-base", "openai/clip-vit-base-patch16", adapters_in_model=False':
                     '"standins/dinov2", "standins/clip", config=TINY, adapters_in_model=False',
                 'DetrisAdapterConfig.from_preset("base")': "DetrisAdapterConfig.from_model_config(TINY)"},
        before=TINY_IMPORT),
    ("docs/peft.md", "import modeling_detris"): Block(
        after=("docs/peft.md", "import modeling_detris  # registers the model and the PEFT method")),
    ("docs/peft.md", 'model = get_peft_model(base, DetrisAdapterConfig.from_preset("base"), adapter_name="refcoco")'): Block(
        after=("docs/peft.md", "import modeling_detris"),
        replace={'DetrisAdapterConfig.from_preset("base"), adapter_name': "DetrisAdapterConfig.from_model_config(TINY), adapter_name",
                 'DetrisAdapterConfig.from_preset("base", vision_adapter_dim=64)': "DetrisAdapterConfig.from_model_config(TINY, vision_adapter_dim=32)",
                 '"folder/refcocog"': '"my-task-adapter"'},
        # the prose: a fresh base (the one above now carries the adapters PeftModel injected)
        before="from peft import get_peft_model, PeftModel\nfrom modeling_detris import DetrisAdapterConfig\n"
        "base = DetrisForReferringSegmentation.from_pretrained('detris-base-backbones')\n"),
    ("docs/peft.md", "from modeling_detris import to_standalone_model"): Block(
        after=("docs/peft.md", 'model = get_peft_model(base, DetrisAdapterConfig.from_preset("base"), adapter_name="refcoco")')),
    ("docs/release.md", "import modeling_detris, processing_detris  # register DETRIS, its PEFT method and its processor"): Block(),
    # a folder of the current layout stands for `old_dir` (the mapping's renames are tested in test_peft; here: that
    # the documented call runs)
    ("docs/peft.md", "from modeling_detris.peft_detris import LEGACY_KEY_MAPPING"): Block(
        before="from transformers import AutoModel\nold_dir = 'model'\n"),
    ("docs/processing.md", "import torch"): Block(replace={"path/to/detris-base-refcoco": "model"}),
    ("docs/benchmarks.md", "from transformers import AutoModel"): Block(replace={'"path/or/hub-id"': '"model"'}),
    ("docs/release.md", "import torch"): Block(
        replace={'"openai/clip-vit-base-patch16"': '"standins/clip"'}),
    # generated cards
    ("card.md", "import torch"): Block(replace={"org/detris-tiny": "model"}),
    ("card.md", "import hub_card  # detris-hf: registers the pipeline task"): Block(replace={"org/detris-tiny": "model"}),
    ("adapter_card.md", "import torch"): Block(
        replace={"org/detris-tiny-base": "detris-base-release/base", "org/detris-tiny-refcoco": "detris-base-release/refcoco"},
        before="from PIL import Image\n", ),
}


def python_blocks(path: Path) -> list[tuple[str, str]]:
    """(first line, code) of every ```python block of the markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(code.splitlines()[0].rstrip(), code) for code in re.findall(r"```python\n(.*?)```", text, re.S)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from official_standins import standin_config
    from training.cli import main as cli

    work = tmp_path_factory.mktemp("docs")
    for name in ("photo.jpg", "a.jpg", "b.jpg"):
        image = write_test_image(work / "image.png")
        Image.open(image).convert("RGB").save(work / name)
    save_tiny_model(work / "model")
    config = tiny_clip_config()
    (work / "tiny_config.json").write_text(config.to_json_string())
    torch.manual_seed(0)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config.vision_config.to_dict())).save_pretrained(work / "standins" / "dinov2")
    CLIPTextModelWithProjection(CLIPTextConfig(**config.text_config.to_dict())).save_pretrained(work / "standins" / "clip")
    official = work / "official"
    checkpoints = [make_official_checkpoint(official / "base_refcoco.pth", seed=1),
                   make_official_checkpoint(official / "base_refcocog_u.pth", seed=2)]
    assert cli(["convert", "--checkpoint", str(checkpoints[0]), "--checkpoint", str(checkpoints[1]), "--config",
                str(write_config(work / "standin.json", standin_config())), "--split-adapters",
                "--output", str(work / "detris-base-release")]) == 0
    assert cli(["card", "--model", str(work / "model"), "--repo-id", "org/detris-tiny", "--output", str(work / "card.md")]) == 0
    assert cli(["card", "--model", str(work / "detris-base-release" / "refcoco"), "--repo-id", "org/detris-tiny-refcoco",
                "--base-model", "org/detris-tiny-base", "--output", str(work / "adapter_card.md")]) == 0
    return work


def documented_blocks(work: Path) -> dict:
    blocks = {}
    for path in DOCS + [work / "card.md", work / "adapter_card.md"]:
        name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
        for first, code in python_blocks(path):
            blocks[(name, first)] = code
    return blocks


def test_every_block_is_in_the_table(workdir):
    missing = [key for key in documented_blocks(workdir) if key not in BLOCKS]
    assert not missing, f"Python blocks without an entry in BLOCKS (add how they run on stand-ins): {missing}"


def script_for(key, blocks: dict) -> str:
    """The block with its replacements, preceded by the blocks it continues and the lines the prose stands for."""
    spec = BLOCKS[key]
    code = blocks[key]
    for old, new in spec.replace.items():
        assert old in code, f"{key}: the table replaces {old!r}, which the block no longer contains"
        code = code.replace(old, new)
    head = script_for(spec.after, blocks) + "\n" if spec.after else ""
    return head + spec.before + code


def pytest_generate_tests(metafunc):
    if "chain" in metafunc.fixturenames:
        ends = [key for key, spec in BLOCKS.items() if key not in {s.after for s in BLOCKS.values() if s.after}]
        metafunc.parametrize("chain", ends, ids=[f"{file}:{first[:40]}" for file, first in ends])


def test_block_runs_as_written(workdir, chain, tmp_path):
    blocks = documented_blocks(workdir)
    assert chain in blocks, f"{chain} is in BLOCKS but no longer in the docs: remove its entry (or restore the block)"
    script = tmp_path / "block.py"
    script.write_text(script_for(chain, blocks), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{chain} failed:\n{script.read_text()}\n--- stderr ---\n{run.stderr[-3000:]}"


PROJECT_PATH = re.compile(
    r"(?<![\w/.-])((?:hub_card|training|modeling_detris|processing_detris|configuration_detris|benchmarks|tests|docs"
    r"|requirements|\.ci)/[\w./+-]*\w)"
)
# the developers' reference documents, issue numbers and section signs of documents outside the repository
OUTSIDE_DOCUMENTS = re.compile(r"\b(?:ARCHITECTURE|ECOSYSTEM|PERFORMANCE)\b(?:\.md)?|\b[Ii]ssue[ -]#?\d+|§")
PACKAGES = ("configuration_detris", "modeling_detris", "processing_detris", "training", "hub_card", "benchmarks")
# what documented commands write (the tests' screenshots, a benchmark's --json / --markdown, `make gpu-check`)
CREATED_AT_RUN_TIME = {"tests/artifacts", "benchmarks/results/cpu-fast-path.json", "benchmarks/results/cpu-fast-path.md",
                       "benchmarks/results/gpu", "benchmarks/results/gpu.json"}


def test_docs_cite_only_files_in_the_repository(workdir):
    """README, docs and the generated cards name no document outside the repository, and every project path they
    name exists."""
    texts = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
             for path in DOCS + sorted((ROOT / "hub_card").glob("*.md"))}
    texts.update({name: (workdir / name).read_text(encoding="utf-8") for name in ("card.md", "adapter_card.md")})
    outside = {name: OUTSIDE_DOCUMENTS.findall(text) for name, text in texts.items() if OUTSIDE_DOCUMENTS.search(text)}
    assert not outside, f"documents outside the repository are cited: {outside}"
    missing = {name: sorted({p for p in PROJECT_PATH.findall(text) if not (ROOT / p).exists()} - CREATED_AT_RUN_TIME)
               for name, text in texts.items()}
    missing = {name: paths for name, paths in missing.items() if paths}
    assert not missing, f"paths that are not in the repository: {missing}"


def test_code_cites_only_files_in_the_repository():
    """Docstrings, comments, help texts and recipe headers of the six packages (.py, .yaml, .md), and the tests, name
    no document outside the repository, and every project path they name exists."""
    paths = [p for package in PACKAGES for ext in ("py", "yaml", "md")
             for p in sorted((ROOT / package).rglob(f"*.{ext}"))]
    paths += [p for p in sorted((ROOT / "tests").glob("*.py")) if p != Path(__file__).resolve()]
    assert len(paths) > 100
    texts = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8") for path in paths}
    outside = {name: OUTSIDE_DOCUMENTS.findall(text) for name, text in texts.items() if OUTSIDE_DOCUMENTS.search(text)}
    assert not outside, f"documents outside the repository are cited: {outside}"
    missing = {name: sorted({p for p in PROJECT_PATH.findall(text)  # a pattern such as tests/test_hub_*.py names files
                             if not (ROOT / p).exists() and not list(ROOT.glob(p + "*"))} - CREATED_AT_RUN_TIME)
               for name, text in texts.items()}
    missing = {name: paths for name, paths in missing.items() if paths}
    assert not missing, f"paths that are not in the repository: {missing}"
