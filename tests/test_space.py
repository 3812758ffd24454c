"""`detris space` (the Space folder), `detris app` (the same app served in this process), the app's request logic
and its readable errors, and `detris push` of a Space folder. The served Space in a browser:
tests/test_space_browser.py."""

import ast
import hashlib
import json
import os
import re
import sys
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.repocard import metadata_load
from PIL import Image

from hub_helpers import save_tiny_model, write_test_image
from space_helpers import free_port

import hub_card  # noqa: F401
from hub_card import space_app
from hub_card.export import is_exported_folder
from hub_card.folders import is_space_folder
from hub_card.space import APP_SOURCE, PHOTOS, RUNTIME_PACKAGES, scikit_image_data_dir
from training.cli import main as cli

APP_IMPORTS = {"gradio", "numpy", "torch", "PIL", "transformers"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("space")
    model = save_tiny_model(root / "model")
    exported = root / "exported"
    assert cli(["export", "--model", str(model), "--output", str(exported), "--repo-id", "org/detris-tiny"]) == 0
    image = write_test_image(root / "photo.png", width=83, height=61)
    return root, model, exported, image


@pytest.fixture(scope="module")
def segmenter(tiny):
    return space_app.Segmenter(str(tiny[1]))


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# detris space
# ---------------------------------------------------------------------------------------------------------------


def test_space_folder_from_a_model_folder(tiny, tmp_path):
    _, model, _, _ = tiny
    space = tmp_path / "space"
    assert cli(["space", "--model", str(model), "--output", str(space), "--model-repo-id", "org/detris-tiny"]) == 0
    assert {"app.py", "requirements.txt", "README.md", "space_config.json", "examples", "model"} <= {p.name for p in space.iterdir()}
    umask = os.umask(0o022)
    os.umask(umask)
    assert space.stat().st_mode & 0o777 == (space / "model").stat().st_mode & 0o777 == 0o777 & ~umask  # readable by others
    assert not [p for p in space.parent.iterdir() if p.name.startswith(".space")], "staging folder left behind"
    assert (space / "app.py").read_bytes() == APP_SOURCE.read_bytes()
    assert is_exported_folder(space / "model") and is_space_folder(space)
    assert json.loads((space / "space_config.json").read_text())["model"] == "model"

    requirements = (space / "requirements.txt").read_text().splitlines()
    assert [line.split("==")[0] for line in requirements] == list(RUNTIME_PACKAGES)
    for line in requirements:
        name, version = line.split("==")
        assert version == metadata.version(name).split("+")[0] and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), line
    assert "detris" not in (space / "requirements.txt").read_text()

    header = metadata_load(space / "README.md")
    assert header["sdk"] == "gradio" and header["sdk_version"] == metadata.version("gradio")
    assert header["app_file"] == "app.py" and header["license"] == "mit"
    assert header["models"] == ["org/detris-tiny"] and header["title"]

    examples = json.loads((space / "examples" / "examples.json").read_text())
    shapes = [e for e in examples if e["file"].startswith("shapes_")]
    assert len(shapes) == 4 and all(e["license"] == "MIT" for e in shapes)
    for entry in examples:
        with Image.open(space / "examples" / entry["file"]) as image:
            image.verify()
        assert entry["expressions"] and all(isinstance(t, str) and t.strip() for t in entry["expressions"])
        assert entry["source"] and entry["license"]
    card = (space / "README.md").read_text()
    assert scikit_image_data_dir() is not None, "scikit-image is part of the space extra"
    photos = [e for e in examples if e["file"].startswith("photo_")]
    assert [e["file"] for e in photos] == [f"photo_{name}" for name, *_ in PHOTOS]
    for entry in photos:
        assert entry["license"] in ("CC0", "public domain (NASA)", "public domain (released by SpaceX)")
        assert f"`examples/{entry['file']}`" in card and entry["license"] in card


def test_space_folder_from_an_export_or_a_repo_id(tiny, tmp_path):
    _, _, exported, _ = tiny
    assert cli(["space", "--model", str(exported), "--output", str(tmp_path / "a"), "--scenes", "1", "--no-photos"]) == 0
    assert _files(tmp_path / "a" / "model") == _files(exported)
    assert "models" not in metadata_load(tmp_path / "a" / "README.md")
    assert [e["file"] for e in json.loads((tmp_path / "a" / "examples" / "examples.json").read_text())] == [
        "shapes_00.png"]

    assert cli(["space", "--model", "org/detris-tiny", "--output", str(tmp_path / "b"), "--no-photos",
                "--title", "My DETRIS"]) == 0
    assert not (tmp_path / "b" / "model").exists()
    assert json.loads((tmp_path / "b" / "space_config.json").read_text())["model"] == "org/detris-tiny"
    header = metadata_load(tmp_path / "b" / "README.md")
    assert header["models"] == ["org/detris-tiny"] and header["title"] == "My DETRIS"


def test_space_refuses_bad_arguments(tiny, tmp_path, capsys):
    _, model, _, _ = tiny
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "DETRIS"}))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file.txt").write_text("x")
    cases = [
        (["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o1")],
         f"--model {str(tmp_path / 'missing')!r} is neither a folder nor a Hub repo id"),
        (["--model", str(adapter), "--output", str(tmp_path / "o2")], "is an adapter-only folder"),
        (["--model", str(model), "--output", str(taken)], f"--output {str(taken)!r} exists and is not empty"),
        (["--model", str(model), "--output", str(model / "space")], "is inside the model folder"),
        (["--model", str(model), "--output", str(model.parent), "--overwrite"], "contains the model folder"),
        (["--model", "org/a", "--output", str(tmp_path / "o3"), "--model-repo-id", "org/b"],
         "--model-repo-id 'org/b' differs from --model 'org/a'"),
        (["--model", "org/a", "--output", str(tmp_path / "o4"), "--max-expressions", "0"], "--max-expressions 0 is outside [1, 64]"),
        (["--model", "org/a", "--output", str(tmp_path / "o5"), "--scenes", "-1"], "--scenes -1 is outside [0, 100]"),
    ]
    for arguments, message in cases:
        assert cli(["space", *arguments]) == 2, arguments
        assert message in capsys.readouterr().err, arguments
    assert (taken / "file.txt").read_text() == "x"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()
    assert (model / "config.json").is_file()  # --overwrite never deleted the model


def test_push_uploads_a_space_folder_as_a_gradio_space(tiny, tmp_path, monkeypatch):
    space = tmp_path / "space"
    assert cli(["space", "--model", "org/detris-tiny", "--output", str(space), "--scenes", "1", "--no-photos"]) == 0
    calls = []
    monkeypatch.setattr(HfApi, "whoami", lambda self, *args, **kwargs: {"name": "org-member"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kwargs: calls.append(("create_repo", kwargs)) or "url")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: calls.append(
        ("upload_folder", dict(kwargs, files=_files(Path(kwargs["folder_path"]))))) or "https://hf.co/commit/1")
    assert cli(["push", "--model", str(space), "--repo-id", "org/detris-demo"]) == 0
    assert calls[0] == ("create_repo", dict(repo_id="org/detris-demo", repo_type="space", private=False, exist_ok=True,
                                            space_sdk="gradio"))
    assert calls[1][1]["repo_type"] == "space" and calls[1][1]["repo_id"] == "org/detris-demo"
    assert calls[1][1]["files"] == _files(space)


# ---------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------


def test_app_imports_nothing_of_ours():
    stdlib = set(sys.stdlib_module_names)
    for node in ast.walk(ast.parse(APP_SOURCE.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, ast.unparse(node)
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            assert top in stdlib or top in APP_IMPORTS, ast.unparse(node)
    assert "trust_remote_code=True" in APP_SOURCE.read_text()


def test_all_expressions_of_an_image_run_in_one_forward_pass(segmenter, tiny):
    image = np.asarray(Image.open(tiny[3]).convert("RGB"))
    batches = []
    handle = segmenter.model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        masks, scores, seconds = segmenter.segment(image, ["the red box", "the noise", "the corner"], 0.35)
    finally:
        handle.remove()
    assert batches == [3]
    assert [m.shape for m in masks] == [(61, 83)] * 3 and all(m.dtype == bool for m in masks)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores) and seconds > 0
    low, _, _ = segmenter.segment(image, ["the red box"], 0.05)
    high, _, _ = segmenter.segment(image, ["the red box"], 0.95)
    assert not (high[0] & ~low[0]).any() and low[0].sum() >= high[0].sum()


def test_run_builds_overlay_legend_masks_and_timing(segmenter, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    overlay, legend, mask_files, timing = space_app.run(segmenter, str(tiny[3]), "the red box\n\n  the noise  \n", 0.35)
    assert all(Path(p).parent.parent == tmp_path / "detris-space-masks" for p in mask_files)
    rgb = np.asarray(Image.open(tiny[3]).convert("RGB"))
    masks = [np.asarray(Image.open(path)) > 127 for path in mask_files]
    assert [Path(p).name for p in mask_files] == ["mask_01_the-red-box.png", "mask_02_the-noise.png"]
    assert all(Image.open(p).size == (83, 61) and Image.open(p).mode == "L" for p in mask_files)
    # the overlay is the processor's renderer applied to the downloadable masks, in the legend's colours
    expected = segmenter.processor.draw_referring_overlay(rgb, masks, ["the red box", "the noise"])
    assert overlay.dtype == np.uint8 and np.array_equal(overlay, np.asarray(expected))
    colours = [segmenter.processor.overlay_colour(0), segmenter.processor.overlay_colour(1)]
    assert colours[0] != colours[1]
    assert legend.count('class="detris-legend-item"') == 2
    assert [space_app.hex_colour(c) for c in colours] == re.findall(r'data-colour="(#[0-9a-f]{6})"', legend)
    assert "the red box" in legend and "the noise" in legend
    assert re.fullmatch(r"\*\*Model time: \d+ ms\*\* on `cpu` for 2 expressions in one forward pass \(image 83 x 61 px\)\.",
                        timing)
    # HTML in an expression is shown as text
    _, legend, _, _ = space_app.run(segmenter, str(tiny[3]), "<b>bold</b>", 0.35)
    assert "&lt;b&gt;bold&lt;/b&gt;" in legend and "<b>" not in legend


def test_run_takes_gradio_file_payloads(segmenter, tiny, tmp_path, monkeypatch):
    import base64

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    data = Path(tiny[3]).read_bytes()
    by_path = space_app.run(segmenter, {"path": str(tiny[3]), "orig_name": "holiday.png"}, "the red box", 0.35)
    by_url = space_app.run(segmenter, {"path": None, "url": "data:image/png;base64," + base64.b64encode(data).decode()},
                           "the red box", 0.35)
    assert np.array_equal(by_path[0], by_url[0]) and by_path[0].shape[1] >= 83 and by_path[0].shape[2] == 3
    text_file = tmp_path / "upload_1234"
    text_file.write_text("hello")
    with pytest.raises(space_app.DemoError, match="'notes.txt' is not an image this demo can read"):
        space_app.run(segmenter, {"path": str(text_file), "orig_name": "notes.txt"}, "the dog", 0.35)
    with pytest.raises(space_app.DemoError, match="No image"):
        space_app.run(segmenter, {"path": None, "url": None}, "the dog", 0.35)


def test_images_of_any_mode_become_rgb(segmenter, tmp_path):
    """Uploads are decoded by the model's image processor module (on the Space: the exported file)."""
    assert segmenter.image_processing.__name__ == type(segmenter.processor.image_processor).__module__
    grey16 = Image.fromarray(np.array([[0, 256, 65535]], dtype=np.uint16))
    assert segmenter.decode(grey16).tolist() == [[[0, 0, 0], [1, 1, 1], [255, 255, 255]]]
    rgba = Image.new("RGBA", (3, 2), (10, 20, 30, 0))
    assert segmenter.decode(rgba).shape == (2, 3, 3) and segmenter.decode(rgba)[0, 0].tolist() == [10, 20, 30]
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(rotated, exif=exif)
    assert space_app.load_image(str(rotated), None, segmenter.decode).shape == (40, 20, 3)


def test_readable_errors(segmenter, tiny, tmp_path, monkeypatch):
    image = str(tiny[3])
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(image).read_bytes()[:200])
    cases = [
        ((None, "the dog", 0.35), "No image: upload a photo"),
        ((image, "", 0.35), "The expression box is empty (''): type at least one referring expression"),
        ((image, " \n\t\n", 0.35), "The expression box is empty"),
        ((image, None, 0.35), "The expression box is empty"),
        ((str(text_file), "the dog", 0.35), "'notes.txt' is not an image this demo can read; expected a PNG, JPEG"),
        ((str(truncated), "the dog", 0.35), "'truncated.png' could not be decoded"),
        ((image, "\n".join(f"thing {k}" for k in range(17)), 0.35), "17 expressions given; this demo segments at most 16"),
        ((image, "the dog", 1.5), "The threshold is 1.5; expected a probability strictly between 0 and 1"),
    ]
    for arguments, message in cases:
        with pytest.raises(space_app.DemoError) as raised:
            space_app.run(segmenter, *arguments)
        assert message in str(raised.value), (arguments, str(raised.value))
    monkeypatch.setattr(segmenter, "max_image_pixels", 5000)
    with pytest.raises(space_app.DemoError, match=r"83 x 61 = 5,063 pixels, more than this demo's limit of 5,000 pixels"):
        space_app.run(segmenter, image, "the dog", 0.35)


def test_device_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert space_app.default_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert space_app.default_device() == "cuda"


def test_detris_app_serves_the_same_page(tiny, tmp_path, monkeypatch, capsys):
    from gradio_client import Client, handle_file

    from hub_card.space import build_app

    assert cli(["app", "--model", str(tmp_path / "missing")]) == 2
    assert "is neither a folder nor a Hub repo id" in capsys.readouterr().err
    assert cli(["app", "--model", str(tiny[1]), "--port", "70000"]) == 2
    assert "--port 70000 is outside [1, 65535]" in capsys.readouterr().err

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo, segmenter = build_app(str(tiny[2]), examples_dir=tmp_path / "examples", scenes=1, photos=False)
    assert segmenter.device.type == "cpu"
    # without --trust-remote-code the export's own code does not run: detris-hf's classes are used
    assert type(segmenter.model).__module__ == "modeling_detris.modeling_detris"
    port = free_port()
    space_app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "downloads"),
                        analytics_enabled=False)
        overlay, legend, masks, _ = client.predict(handle_file(str(tiny[3])), "the red box\nthe noise", 0.35,
                                                   api_name="/segment")
        assert len(masks) == 2 and legend.count("detris-legend-item") == 2
        drawn = segmenter.processor.draw_referring_overlay(
            np.asarray(Image.open(tiny[3]).convert("RGB")), [np.asarray(Image.open(m)) > 127 for m in masks],
            ["the red box", "the noise"])
        assert np.array_equal(np.asarray(Image.open(overlay).convert("RGB")), np.asarray(drawn))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config") as response:
            config = json.loads(response.read())
        assert "shapes_00.png" in json.dumps(config)  # the examples gallery
    finally:
        demo.close()


def test_detris_app_runs_a_folders_code_only_when_asked(tiny, tmp_path, capsys):
    """A folder whose model type detris-hf does not know, with its own code: `detris app` runs that code only with
    --trust-remote-code; without it, one line says so."""
    from hub_card.space import build_app

    trap = tmp_path / "trap"
    trap.mkdir()
    for path in tiny[2].iterdir():
        (trap / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "ran.txt"
    config = json.loads((trap / "config.json").read_text())
    config["model_type"] = "detris-unknown"
    (trap / "config.json").write_text(json.dumps(config))
    source = (trap / "configuration_detris.py").read_text()
    (trap / "configuration_detris.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + source)
    assert cli(["app", "--model", str(trap), "--no-examples"]) == 2
    err = capsys.readouterr().err
    assert "pass --trust-remote-code" in err and err.count("\n") == 1
    assert not marker.exists()
    # with the flag the folder's code runs (in a child process: that code may register things process-wide; the
    # renamed model type need not satisfy the folder's own model code, only that its code ran matters here)
    import subprocess

    code = (f"from hub_card.space import build_app\ntry:\n    build_app({str(trap)!r}, photos=False, trust_remote_code=True)\n"
            "except ValueError as error:\n    print(error)\n")
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert marker.read_text() == "ran"
