"""`detris export`: the remote code (our role files, copied), the Hub folder, and loading it where our packages cannot be
imported (a subprocess started with `python -I -S`, the venv's site-packages appended by hand so its `.pth` files,
among them the editable-install finder of detris-hf, never run; cwd a temporary folder)."""

import ast
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from hub_helpers import save_tiny_model, write_test_image

import hub_card  # noqa: F401
from hub_card.card import usage_snippet
from hub_card.export import MODEL_AUTO_MAP, ExportError, export_model_folder
from hub_card.folders import OutputFolderError
from hub_card.remote_code import HUB_FILES, RemoteCodeError, RoleFile, package_dir, write_remote_code
from training.cli import main as cli

OURS = {"configuration_detris", "modeling_detris", "processing_detris", "hub_card", "training"}
EXPRESSIONS = ["the red box", "the grey noise on the left", "a very long expression that will surely be cut here"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_export")
    model_dir = save_tiny_model(root / "model")
    hub_dir = root / "hub"
    assert cli(["export", "--model", str(model_dir), "--output", str(hub_dir), "--repo-id", "org/detris-tiny"]) == 0
    image = write_test_image(root / "photo.png")
    return model_dir, hub_dir, image


def test_export_writes_a_hub_folder(tiny_dirs):
    _, hub_dir, _ = tiny_dirs
    files = {p.name for p in hub_dir.iterdir()}
    assert {
        "config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
        "configuration_detris.py", "modeling_detris.py", "image_processing_detris.py", "tokenization_detris.py",
        "processing_detris.py", "pipeline_detris.py", "README.md",
        "bpe_simple_vocab_16e6.txt.gz", "LICENSE_bpe_vocab.md", "LICENSE_open_clip",
    } <= files
    assert not any(name.startswith(".") for name in files)
    config = json.loads((hub_dir / "config.json").read_text())
    assert config["auto_map"] == MODEL_AUTO_MAP
    assert config["custom_pipelines"]["referring-image-segmentation"]["impl"] == "pipeline_detris.ReferringImageSegmentationPipeline"
    processor = json.loads((hub_dir / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_detris.DetrisProcessor"}
    assert processor["image_processor"]["auto_map"]["AutoImageProcessor"] == "image_processing_detris.DetrisImageProcessor"
    tokenizer = json.loads((hub_dir / "tokenizer_config.json").read_text())
    assert tokenizer["auto_map"]["AutoTokenizer"] == ["tokenization_detris.DetrisTokenizer", None]
    # Readable by others, like a folder the user creates (mkdtemp's staging folder is 0700).
    umask = os.umask(0o022)
    os.umask(umask)
    assert hub_dir.stat().st_mode & 0o777 == 0o777 & ~umask


def test_remote_code_is_the_role_files_with_sibling_configuration_imports(tiny_dirs):
    from transformers.dynamic_module_utils import get_relative_imports

    _, hub_dir, _ = tiny_dirs
    shipped = {p.stem for p in hub_dir.glob("*.py")}
    for spec in HUB_FILES:
        original = (package_dir(spec.package) / f"{spec.module}.py").read_text()
        copied = (hub_dir / f"{spec.name}.py").read_text()
        # line for line the role file; only the configuration imports differ
        changed = [(a, b) for a, b in zip(original.splitlines(), copied.splitlines()) if a != b]
        assert len(original.splitlines()) == len(copied.splitlines())
        for before, after in changed:
            assert before.lstrip().startswith("from configuration_detris"), before
            assert after.lstrip().startswith("from .configuration_detris import") or after.lstrip().startswith(
                "from .release import"), after
        for node in ast.walk(ast.parse(copied)):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or node.module.split(".")[0] not in OURS, ast.unparse(node)
                assert node.level <= 1, ast.unparse(node)
                if node.level == 1:
                    assert node.module in shipped, ast.unparse(node)
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & OURS, ast.unparse(node)
    assert get_relative_imports(str(hub_dir / "configuration_detris.py")) == []
    assert set(get_relative_imports(str(hub_dir / "modeling_detris.py"))) <= {"configuration_detris", "release"}
    assert "class DetrisImageProcessor" in (hub_dir / "image_processing_detris.py").read_text()
    assert "class DetrisTokenizer" in (hub_dir / "tokenization_detris.py").read_text()
    assert "class DetrisProcessor" in (hub_dir / "processing_detris.py").read_text()


ISOLATED = textwrap.dedent(
    r'''
    import importlib.util, json, sys
    sys.path.append(sys.argv[1])  # site-packages without running its .pth files
    hub_dir, image_path, inputs_path, out_path, snippet_path = sys.argv[2:7]
    ours = ("configuration_detris", "modeling_detris", "processing_detris", "hub_card", "training")
    report = {"found": [n for n in ours if importlib.util.find_spec(n) is not None],
              "editable_finders": [n for n in (getattr(f, "__name__", type(f).__name__) for f in sys.meta_path) if "ditable" in n],
              "sys_path": sys.path}
    try:
        import modeling_detris  # noqa: F401
        report["import_modeling_detris"] = "succeeded"
    except ModuleNotFoundError as error:
        report["import_modeling_detris"] = str(error)
    if report["found"] or report["editable_finders"] or report["import_modeling_detris"] == "succeeded":
        json.dump(report, open(out_path + ".json", "w"))
        raise SystemExit("our packages are importable")

    import torch
    from transformers import AutoModel, AutoProcessor, pipeline

    model = AutoModel.from_pretrained(hub_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(hub_dir, trust_remote_code=True)
    report["model_class"] = type(model).__module__ + "." + type(model).__name__
    report["processor_class"] = type(processor).__module__ + "." + type(processor).__name__
    report["tokenizer_class"] = type(processor.tokenizer).__module__ + "." + type(processor.tokenizer).__name__
    inputs = torch.load(inputs_path)
    with torch.inference_mode():
        logits = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).logits
    encoded = processor(images=image_path, text=inputs["texts"], return_tensors="pt")
    pipe = pipeline(model=hub_dir, trust_remote_code=True)
    results = pipe(image_path, inputs["texts"])
    namespace = {}
    exec(open(snippet_path).read(), namespace)
    torch.save({
        "logits": logits,
        "encoded": {k: v for k, v in encoded.items()},
        "pipeline_masks": [torch.from_numpy(r["mask"]) for r in results],
        "pipeline_scores": [r["score"] for r in results],
        "snippet_masks": namespace["masks"],
    }, out_path)
    json.dump(report, open(out_path + ".json", "w"))
    '''
)


def test_remote_code_loads_without_our_packages(tiny_dirs, tmp_path):
    from modeling_detris import DetrisForReferringSegmentation
    from processing_detris import DetrisProcessor
    from transformers import pipeline

    model_dir, hub_dir, image = tiny_dirs
    model = DetrisForReferringSegmentation.from_pretrained(str(model_dir)).eval()
    processor = DetrisProcessor.from_pretrained(str(model_dir))
    generator = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(3, 3, 56, 56, generator=generator)
    input_ids = processor(text=EXPRESSIONS, return_tensors="pt")["input_ids"]
    torch.save({"pixel_values": pixel_values, "input_ids": input_ids, "texts": EXPRESSIONS}, tmp_path / "inputs.pt")
    snippet = usage_snippet(str(hub_dir), remote_code=True).replace('"photo.jpg"', repr(str(image)))
    (tmp_path / "snippet.py").write_text(snippet)
    (tmp_path / "check.py").write_text(ISOLATED)

    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    # bit-identical logits need the same float summation order: the same intra-op thread count on both sides
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    site_packages = sysconfig.get_paths()["purelib"]
    out = tmp_path / "out.pt"
    run = subprocess.run(
        [sys.executable, "-I", "-S", str(tmp_path / "check.py"), site_packages, str(hub_dir), str(image),
         str(tmp_path / "inputs.pt"), str(out), str(tmp_path / "snippet.py")],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    report = json.loads(Path(str(out) + ".json").read_text()) if Path(str(out) + ".json").exists() else {}
    # Control: the same check without -S (the .pth files run) sees the editable install and stops.
    control = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "check.py"), site_packages, str(hub_dir), str(image),
         str(tmp_path / "inputs.pt"), str(tmp_path / "control.pt"), str(tmp_path / "snippet.py")],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )
    assert control.returncode != 0 and "our packages are importable" in control.stderr
    assert "modeling_detris" in json.loads((tmp_path / "control.pt.json").read_text())["found"]
    assert run.returncode == 0, run.stderr[-4000:] + json.dumps(report)
    # The subprocess really could not see our packages, and ran the generated code.
    assert report["found"] == [] and report["editable_finders"] == []
    assert "No module named 'modeling_detris'" in report["import_modeling_detris"]
    assert not any("/work/main" == p.rstrip("/") or p.endswith("detris-hf") for p in report["sys_path"])
    assert report["model_class"].startswith("transformers_modules.") and report["model_class"].endswith(
        "modeling_detris.DetrisForReferringSegmentation")
    assert report["processor_class"].endswith(".processing_detris.DetrisProcessor")
    assert report["tokenizer_class"].endswith(".tokenization_detris.DetrisTokenizer")

    remote = torch.load(out)
    with torch.inference_mode():
        expected = model(pixel_values=pixel_values, input_ids=input_ids).logits
    assert torch.equal(remote["logits"], expected), (remote["logits"] - expected).abs().max()

    encoded = processor(images=str(image), text=EXPRESSIONS, return_tensors="pt")
    assert set(remote["encoded"]) == set(encoded)
    for key in encoded:
        assert torch.equal(remote["encoded"][key], encoded[key]), key

    local_pipe = pipeline("referring-image-segmentation", model=str(model_dir))
    local = local_pipe(str(image), EXPRESSIONS)
    assert len(remote["pipeline_masks"]) == len(local) == 3
    for mask, result in zip(remote["pipeline_masks"], local):
        assert torch.equal(mask, torch.from_numpy(result["mask"]))
    assert remote["pipeline_scores"] == [r["score"] for r in local]
    assert len(remote["snippet_masks"]) == 2 and tuple(remote["snippet_masks"][0].shape) == (61, 83)


def test_export_refuses_bad_folders(tiny_dirs, tmp_path):
    model_dir, hub_dir, _ = tiny_dirs
    with pytest.raises(ExportError, match="no config.json"):
        export_model_folder(tmp_path, tmp_path / "out")
    with pytest.raises(OutputFolderError, match="is the model folder itself"):
        export_model_folder(model_dir, model_dir, overwrite=True)
    with pytest.raises(OutputFolderError, match="not empty; pass --overwrite"):
        export_model_folder(model_dir, hub_dir)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ExportError, match="model_type 'bert'; expected 'detris'"):
        export_model_folder(other, tmp_path / "out")
    # A processor whose text length differs from the model's.
    mismatched = tmp_path / "mismatched"
    save_tiny_model(mismatched)
    from processing_detris import DetrisImageProcessor, DetrisProcessor

    DetrisProcessor(image_processor=DetrisImageProcessor(size={"height": 56, "width": 56}), word_len=9).save_pretrained(mismatched)
    with pytest.raises(ExportError, match="word_len=9 but the model expects word_len=7"):
        export_model_folder(mismatched, tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))
    assert cli(["export", "--model", str(tmp_path), "--output", str(tmp_path / "x")]) == 2


def test_overwrite_never_deletes_the_input_and_killed_runs_are_cleaned(tiny_dirs, tmp_path, capsys):
    model_dir, _, _ = tiny_dirs
    parent = tmp_path / "project"
    inside = parent / "model"
    inside.mkdir(parents=True)
    for path in model_dir.iterdir():
        (inside / path.name).write_bytes(path.read_bytes())
    before = sorted(p.name for p in inside.iterdir())
    # --output is the folder holding the model: refused, the model stays
    assert cli(["export", "--model", str(inside), "--output", str(parent), "--overwrite"]) == 2
    assert "contains the model folder" in capsys.readouterr().err
    assert sorted(p.name for p in inside.iterdir()) == before
    # --output inside the model folder: refused too
    assert cli(["export", "--model", str(inside), "--output", str(inside / "hub"), "--overwrite"]) == 2
    assert "is inside the model folder" in capsys.readouterr().err
    assert not (inside / "hub").exists()
    # a staging folder a killed run left (its process is gone) is removed by the next run; a live one is kept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".hub.{int(dead.stdout)}.abc123"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    live = tmp_path / f".hub.{os.getpid()}.def456"
    live.mkdir()
    assert cli(["export", "--model", str(model_dir), "--output", str(tmp_path / "hub")]) == 0
    assert not stale.exists() and live.exists()
    assert (tmp_path / "hub" / "model.safetensors").is_file()


def _fake_packages(root: Path) -> Path:
    """A fake role-file layout: `fakeproc` with three role files, one importing a module that does not ship."""
    pkg = root / "fakeproc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "image_fake.py").write_text("import numpy as np\n\nSCALE = 2\n")
    (pkg / "helpers.py").write_text("def helper():\n    return 1\n")
    (pkg / "processing_fake.py").write_text(
        '"""Fake processor."""\n\nimport os\n\nfrom configuration_detris import DetrisConfig  # the config\n'
        "from configuration_detris.configuration_detris import PRESETS\nfrom .image_fake import SCALE\n\n\n"
        "def build():\n    from configuration_detris import DetrisConfig as Config\n    return Config, SCALE, PRESETS, os.sep\n"
    )
    return pkg


def test_copier_makes_configuration_imports_sibling_imports(tmp_path, monkeypatch):
    pkg = _fake_packages(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    files = (RoleFile("image_fake", "fakeproc", "image_fake"), RoleFile("processing_fake", "fakeproc", "processing_fake"),
             RoleFile("configuration_detris", "configuration_detris", "configuration_detris"))
    out = tmp_path / "out"
    out.mkdir()
    written = write_remote_code(out, files)
    assert sorted(written) == ["configuration_detris.py", "image_fake.py", "processing_fake.py"]
    copied = (out / "processing_fake.py").read_text()
    assert copied == (pkg / "processing_fake.py").read_text().replace(
        "from configuration_detris import", "from .configuration_detris import").replace(
        "from configuration_detris.configuration_detris import", "from .configuration_detris import")
    assert "from .image_fake import SCALE" in copied
    assert (out / "image_fake.py").read_bytes() == (pkg / "image_fake.py").read_bytes()


@pytest.mark.parametrize("line, message", [
    ("from modeling_detris.adapters import DenseAligner", "processing_fake.py:1: `from modeling_detris.adapters import DenseAligner` imports one of our packages"),
    ("from .helpers import helper", "processing_fake.py:1: `from .helpers import helper` imports a module that is not shipped"),
    ("import training", "processing_fake.py:1: `import training` imports one of our packages"),
    ("from ..other import x", "processing_fake.py:1: `from ..other import x` is not a single-dot import"),
    ("from configuration_detris.configuration_detris import NOT_THERE", "needs ['NOT_THERE']"),
    ("import pandas", "`import pandas` is not a runtime dependency"),
    ("def f():\n    from processing_detris import DetrisProcessor", "processing_fake.py:2: `from processing_detris import DetrisProcessor` imports one of our packages"),
])
def test_copier_refuses_any_other_import_of_ours(tmp_path, monkeypatch, line, message):
    pkg = _fake_packages(tmp_path)
    (pkg / "processing_fake.py").write_text(line + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    files = (RoleFile("image_fake", "fakeproc", "image_fake"), RoleFile("processing_fake", "fakeproc", "processing_fake"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RemoteCodeError) as error:
        write_remote_code(out, files)
    assert message in str(error.value)
    assert list(out.iterdir()) == []  # nothing written
