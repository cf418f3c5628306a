"""Bad models, detectors and inputs are refused up front with one clear line naming the file or the
problem (ferkit.inference, ferkit.faces, ferkit.checkpoint)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_inference import ASTRONAUT, make_checkpoint

from ferkit.checkpoint import CheckpointError, model_from_checkpoint, save_checkpoint
from ferkit.cli import main
from ferkit.data import CLASSES, scores_shape_problem
from ferkit.evaluate import load_for_evaluation
from ferkit.faces import HaarDetector, YuNetDetector, crop_faces, make_detector
from ferkit.inference import EmotionRecognizer, ImageError, load_image


def onnx_model(path: Path, input_shape: list, n_out: int, softmax: bool = True, weight: float = 0.0) -> Path:
    """A valid ONNX model: flatten the input, multiply by weights all ``weight``, optionally softmax."""
    import onnx
    from onnx import TensorProto, helper

    size = int(np.prod(input_shape[1:]))
    nodes = [
        helper.make_node("Reshape", ["image", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["z"]),
        helper.make_node("Softmax" if softmax else "Identity", ["z"], ["probs"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_out])],
        [
            helper.make_tensor("shape", TensorProto.INT64, [2], [0, -1]),
            helper.make_tensor("w", TensorProto.FLOAT, [size, n_out], np.full(size * n_out, weight, np.float32)),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def rec() -> EmotionRecognizer:
    return EmotionRecognizer(threads=1)


# --- models -----------------------------------------------------------------------------------


def test_a_checkpoint_without_torch_says_what_to_install(tmp_path, monkeypatch, capsys):
    """A bare install (ONNX Runtime, no torch) given a .pt said only "No module named 'torch'" in the Python API."""
    checkpoint = make_checkpoint(tmp_path / "run.pt")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails, as where it is not installed
    with pytest.raises(ImportError, match=r"run\.pt: a \.pt checkpoint needs torch \(pip install 'ferkit\[train\]'; "):
        EmotionRecognizer(checkpoint, threads=1)
    assert main(["predict", str(ASTRONAUT), "--model", str(checkpoint)]) == 2
    assert capsys.readouterr().err.count("ferkit[train]") == 1  # the CLI's own hint not added a second time


def test_onnx_models_that_are_not_emotion_models_are_refused_at_load(tmp_path):
    ok = onnx_model(tmp_path / "ok.onnx", ["N", 1, 48, 48], len(CLASSES))
    renamed = make_checkpoint(tmp_path / "renamed.onnx")  # ONNX Runtime's words: 'Wire format was corrupt'
    with pytest.raises(ValueError, match=r"renamed\.onnx: not a loadable ONNX model \(a zip file: a torch checkpoint"):
        EmotionRecognizer(renamed, threads=1)
    with pytest.warns(UserWarning, match=r"ok\.onnx: no class names in its metadata; read in FER-2013's order") as w:
        assert EmotionRecognizer(ok, threads=1).classes == CLASSES  # the test model itself is fine
    assert w[0].filename == __file__  # the line that loaded it, not ferkit's
    cases = {
        "wrong.onnx": (["N", 3, 224, 224], 7, True, r"input \(N, 3, 224, 224\), expected \(N, 1, 48, 48\)"),
        "fixed_batch.onnx": ([1, 1, 48, 48], 7, True, r"input \(1, 1, 48, 48\), expected \(N, 1, 48, 48\)"),
        "tenclass.onnx": (["N", 1, 48, 48], 10, True, r"output \(N, 10\), expected \(N, 7\)"),
        "logits.onnx": (["N", 1, 48, 48], 7, False, "its outputs are not probabilities"),
        "nan.onnx": (["N", 1, 48, 48], 7, True, "its outputs are NaN or infinite"),
    }
    for name, (shape, n_out, softmax, problem) in cases.items():
        path = onnx_model(tmp_path / name, shape, n_out, softmax, weight=float("nan") if name == "nan.onnx" else 0)
        with pytest.raises(ValueError, match=rf"{name}: not a ferkit emotion model \({problem}"):
            EmotionRecognizer(path, threads=1)
        with pytest.raises(ValueError, match=name):  # evaluation loads ONNX models the same way
            load_for_evaluation(path)


def test_the_output_shape_check_names_what_is_wrong():
    assert scores_shape_problem((2, 7), 2, 7) is None
    assert scores_shape_problem((2, 10), 2, 7) == "output (N, 10), expected (N, 7) for its 7 classes"
    assert scores_shape_problem((2, 7, 1), 2, 7) == "output (N, 7, 1), expected (N, 7) for its 7 classes"
    assert scores_shape_problem((1, 7), 2, 7) == "output (1, 7) for 2 images, expected (2, 7)"
    assert scores_shape_problem((), 2, 7) == "output () for 2 images, expected (2, 7)"


def test_cli_predict_with_a_wrong_model_is_one_error_line(tmp_path, capsys):
    wrong = onnx_model(tmp_path / "wrong.onnx", ["N", 3, 224, 224], 7)
    code = main(["predict", str(ASTRONAUT), "--model", str(wrong), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    problem = "not a ferkit emotion model (input (N, 3, 224, 224), expected (N, 1, 48, 48))"
    assert err.splitlines() == [f"ferkit predict: error: {wrong}: {problem}"]


def test_checkpoints_that_are_not_emotion_models_are_refused(tmp_path, capsys):
    import torch

    from ferkit.models import build_model

    state = torch.load(make_checkpoint(tmp_path / "good.pt"), weights_only=False)
    model = build_model("ferkit_small", width=0.25, in_chans=3)
    rgb = {**state, "model_kwargs": {"width": 0.25, "in_chans": 3}, "state_dict": model.state_dict()}
    save_checkpoint(tmp_path / "rgb.pt", rgb)
    with pytest.raises(CheckpointError, match=r"rgb\.pt: not a ferkit emotion model \(fails on a \(N, 1, 48, 48\)"):
        EmotionRecognizer(tmp_path / "rgb.pt")
    save_checkpoint(tmp_path / "nokwargs.pt", {k: v for k, v in state.items() if k != "model_kwargs"})
    with pytest.raises(CheckpointError, match=r"nokwargs\.pt: checkpoint lacks model_kwargs"):
        model_from_checkpoint(tmp_path / "nokwargs.pt")
    save_checkpoint(tmp_path / "unknown.pt", {**state, "model": "nosuch"})
    with pytest.raises(CheckpointError, match=r"unknown\.pt: unknown model 'nosuch'"):
        model_from_checkpoint(tmp_path / "unknown.pt")
    # damaged fields were a TypeError or AttributeError traceback, in `slim` a KeyError
    damaged = {"model_kwargs": None, "state_dict": [1, 2], "model": 5, "ema_state_dict": {"w": "x"}}
    for key, value in damaged.items():
        save_checkpoint(tmp_path / "damaged.pt", {**state, key: value})
        with pytest.raises(CheckpointError, match=rf"damaged\.pt: a damaged checkpoint \({key} of the wrong type\)"):
            model_from_checkpoint(tmp_path / "damaged.pt")
    # a run that diverged: "angry" at NaN confidence (and NaN in the JSON), exit 0; export wrote it
    weights = {k: v * float("nan") if k.endswith("weight") else v for k, v in state["state_dict"].items()}
    save_checkpoint(tmp_path / "nan.pt", {**state, "state_dict": weights})
    with pytest.raises(CheckpointError, match=r"nan\.pt: its weights give NaN or infinite scores"):
        EmotionRecognizer(tmp_path / "nan.pt")
    assert main(["export", str(tmp_path / "nan.pt"), "-o", str(tmp_path / "nan.onnx")]) == 2
    assert "nan.pt: its weights give NaN or infinite scores" in capsys.readouterr().err
    assert not (tmp_path / "nan.onnx").exists()
    assert main(["models", str(tmp_path / "nan.pt")]) == 0  # its parameters are counted all the same
    save_checkpoint(tmp_path / "nosd.pt", {k: v for k, v in state.items() if k != "state_dict"})
    assert main(["slim", str(tmp_path / "nosd.pt"), "-o", str(tmp_path / "slim.pt")]) == 2
    assert "nosd.pt: checkpoint lacks state_dict" in capsys.readouterr().err


def test_an_empty_model_list_is_no_model():
    with pytest.raises(ValueError, match="no model given"):
        EmotionRecognizer(model=[])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_face": float("nan")}, "min_face must be a whole number of at least 1, got nan"),  # failed in predict
        ({"min_face": 2.5}, "min_face must be a whole number of at least 1, got 2.5"),  # taken
        ({"max_pixels": None}, "max_pixels must be a whole number of at least 1, got None"),  # every predict failed
        ({"max_pixels": 0}, "max_pixels must be a whole number of at least 1, got 0"),
        ({"threads": -1}, "threads must be a whole number of at least 1 (None: all cores), got -1"),
        ({"threads": 0}, "threads must be a whole number of at least 1 (None: all cores), got 0"),  # all cores
        ({"threads": 2.5}, "threads must be a whole number of at least 1 (None: all cores), got 2.5"),  # TypeError
        ({"threads": 99999}, "threads must be at most 1024, got 99999"),  # ONNX Runtime took 16 GB and hung
        ({"margin": "0.1"}, "margin must be between 0 and 1"),  # TypeError '<='
        ({"model": 3}, "model must be a file path or a list of them, got 3"),
        ({"model": ""}, "model must be a file path or a list of them, got ''"),  # loaded the shipped model
    ],
)
def test_recognizer_arguments_are_checked_when_it_is_made(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EmotionRecognizer(**kwargs)


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_every_onnx_session_refuses_a_bad_thread_count(threads):
    """CenterFace and a bare OnnxBackend took 0 (and True) as "all cores" where the recognizer refused them."""
    from ferkit.faces import CenterFaceDetector
    from ferkit.inference import DEFAULT_MODEL, OnnxBackend

    for make in (lambda: CenterFaceDetector(threads=threads), lambda: OnnxBackend(DEFAULT_MODEL, threads)):
        with pytest.raises(
            ValueError,
            match=re.escape(f"threads must be a whole number of at least 1 (None: all cores), got {threads!r}"),
        ):
            make()


def test_counts_are_checked_alike_everywhere():
    """VideoFrames took every=2.5 (and kept every fifth frame); make_detector took min_size=2.5. A numpy
    integer is a whole number."""
    from ferkit.faces import make_detector
    from ferkit.media import VideoFrames

    with pytest.raises(ValueError, match=re.escape("every must be a whole number of at least 1, got 2.5")):
        VideoFrames("clip.mp4", every=2.5)
    with pytest.raises(ValueError, match=re.escape("min_size must be a whole number of at least 1, got 2.5")):
        make_detector("haar", min_size=2.5)
    assert make_detector("haar", min_size=np.int64(30)).min_size == 30


def test_classify_crops_checks_its_crops(rec):
    """A single crop, float crops in 0-1 or other sizes reached ONNX Runtime (raw errors) or were scored as
    near-black; batch_size 0 or -1 gave a range() error or no scores at all."""
    for crops in (np.zeros((48, 48), np.uint8), np.zeros((2, 48, 48), np.float32), np.zeros((2, 64, 64), np.uint8)):
        with pytest.raises(ValueError, match=re.escape("crops must be a uint8 array (N, 48, 48) as crop_faces gives")):
            rec.classify_crops(crops)
    for batch_size in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size must be a whole number of at least 1, got {batch_size}"):
            rec.classify_crops(np.zeros((3, 48, 48), np.uint8), batch_size=batch_size)


# --- inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, 3, [1, 2], memoryview(b"\xff\xd8")], ids=["none", "int", "list", "memoryview"])
def test_unsupported_input_types_say_what_is_accepted(rec, bad):
    with pytest.raises(ImageError, match=rf"from {type(bad).__name__}: pass a path, bytes, a binary file object"):
        rec.predict(bad)


def test_a_folder_is_named_as_a_folder(rec, tmp_path):
    with pytest.raises(ImageError, match=rf"{tmp_path.name}: is a folder, not an image file"):
        rec.predict(tmp_path)
    with pytest.raises(ImageError, match="is a folder"):
        load_image(str(tmp_path))


def test_non_finite_and_non_numeric_arrays_are_refused(rec):
    for value in (np.nan, np.inf, -np.inf):
        a = np.full((64, 64, 3), 0.5, np.float32)
        a[3, 5, 1] = value
        with pytest.raises(ImageError, match="NaN or infinite"):
            rec.predict(a)
    with pytest.raises(ImageError, match="dtype object"):
        load_image(np.zeros((8, 8), object))


def test_a_pil_image_over_the_limit_is_refused_before_it_is_decoded():
    """An image opened lazily (``Image.open``) was decoded whole, then refused: 0.5 s and 300 MB for 81 M pixels."""
    from PIL import Image

    with Image.open(ASTRONAUT) as im:
        im.load = lambda: pytest.fail("decoded")
        with pytest.raises(ImageError, match=r"^image is 512x512 = 262,144 pixels, over the limit of 1,000"):
            load_image(im, max_pixels=1000)


# --- face detection ---------------------------------------------------------------------------


def test_bad_yunet_models_are_named(tmp_path):
    (tmp_path / "text.onnx").write_text("not a model")
    not_yunet = onnx_model(tmp_path / "emotions.onnx", ["N", 1, 48, 48], 7)  # loads, fails on an image
    for path in (tmp_path / "text.onnx", not_yunet):
        with pytest.raises(ValueError, match=rf"{path.name}: not a loadable YuNet face detector model \(.+\)$"):
            YuNetDetector(path)
        with pytest.raises(ValueError, match=path.name):
            EmotionRecognizer(detector=path)


def test_margin_may_be_any_real_number_type():
    """np.float32(0.1) was refused: "margin must be between 0 and 1 ..., got np.float32(0.1)"."""
    for margin in (np.float32(0.1), np.float64(0.1), np.int64(0), 0.1):
        assert EmotionRecognizer(margin=margin).margin == margin


@pytest.mark.parametrize("margin", [-0.7, -0.01, 1.5, float("nan")])
def test_margin_is_validated(margin):
    with pytest.raises(ValueError, match="margin must be between 0 and 1"):
        EmotionRecognizer(margin=margin)
    with pytest.raises(ValueError, match="margin must be between 0 and 1"):
        crop_faces(np.zeros((64, 64), np.uint8), [(10, 10, 20, 20)], margin=margin)


def test_missing_cascade_is_not_found(tmp_path):
    missing = tmp_path / "missing.xml"
    with pytest.raises(FileNotFoundError, match=r"missing\.xml: Haar cascade file not found"):
        HaarDetector(missing)
    with pytest.raises(FileNotFoundError, match=r"missing\.xml"):
        make_detector(missing)


def test_damaged_unusual_and_non_files_are_image_errors(tmp_path, monkeypatch):
    """A damaged file made Pillow raise IndexError, RuntimeError or NotImplementedError, which became a 500
    from the API and stopped a `predict` batch; an EPS was handed to Ghostscript; image data passed as a str
    raised OSError; a pipe was "no such file"."""
    import io
    import os

    from PIL import Image

    import ferkit.images
    from ferkit.images import NotAnImageError

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        return buf.getvalue()

    def fail(*args, **kwargs):
        raise IndexError("list index out of range")

    with monkeypatch.context() as m:
        m.setattr(ferkit.images, "_pil_to_rgb", fail)  # as a damaged file's decoder does
        with pytest.raises(ImageError, match=r"^corrupt or truncated image \(list index out of range\)"):
            load_image(png(np.zeros((4, 4), np.uint8)))
    for fmt in ("EPS", "PPM", "ICO"):  # formats Pillow reads, not ferkit
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, fmt)
        with pytest.raises(NotAnImageError, match="not an image file"):
            load_image(buf.getvalue())
    with pytest.raises(ImageError, match=r"^AAAA.*\.\.\. \(5,000 characters\): not a file path"):
        load_image("A" * 5000)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ImageError, match=r"pipe: not a regular file"):
        load_image(tmp_path / "pipe")
    (tmp_path / "empty.jpg").write_bytes(b"")  # was 'not an image file (unknown or unsupported format)'
    with pytest.raises(NotAnImageError, match=r"empty.jpg: empty file \(0 bytes\), not an image$"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(NotAnImageError, match=r"^empty data \(0 bytes\), not an image$"):
        load_image(b"")
    buf = io.BytesIO()  # a 32-bit TIFF's 16-bit values: 500 / 257 is about 2, not the brightest pixel's 255
    Image.fromarray(np.full((4, 4), 500, np.int32)).save(buf, "TIFF")
    assert load_image(buf.getvalue())[0, 0].tolist() == [2, 2, 2]
    assert load_image(Image.fromarray(np.full((4, 4), 200, np.int32)))[0, 0].tolist() == [200, 200, 200]
    buf = io.BytesIO()  # 8-bit values saved as 32 bits stay 8-bit
    Image.fromarray(np.full((4, 4), 200, np.int32)).save(buf, "TIFF")
    assert load_image(buf.getvalue())[0, 0].tolist() == [200, 200, 200]
