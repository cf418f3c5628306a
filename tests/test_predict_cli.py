"""``ferkit predict``: folders searched recursively, bad inputs reported without stopping the batch,
table/JSON lines/CSV output, annotated images and videos (ferkit.cli, ferkit.media)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import read_only_filesystem
from helpers_inference import ASSETS, ASTRONAUT, CANVAS, iou, make_checkpoint, make_video, placed_boxes, read_rgb
from PIL import Image

from ferkit.cli import main
from ferkit.data import CLASSES
from ferkit.inference import ImageError, load_image
from ferkit.media import _fps, _mpeg4_fps, expand_paths


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["predict", *map(str, argv), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def jsonl(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """Good images only, in nested folders: 1 face, 3 faces and no face."""
    root = tmp_path_factory.mktemp("good")
    shutil.copy(ASTRONAUT, root / "astronaut.jpg")
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.open(CANVAS).save(root / "sub" / "deeper" / "canvas.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "sub" / "noise.bmp")
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, good) -> Path:
    """The good images plus a truncated JPEG, a text file named .png, an empty .JPG and a .txt file."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(good, root, dirs_exist_ok=True)
    (root / "bad").mkdir()
    data = ASTRONAUT.read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "bad" / "fake.png").write_text("not a picture")
    (root / "sub" / "empty.JPG").write_bytes(b"")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4", n_frames=12, fps=10.0)


def test_the_python_api_reads_folders_and_videos_through_predict_paths(good, video):
    """predict() on a folder or a video said only 'not an image'; predict_paths given one string took each of its
    characters for a path (and '.', the current folder, whole)."""
    from ferkit import EmotionRecognizer, ImageError, predict_paths

    rec = EmotionRecognizer(threads=1)
    for path in (good, str(video)):
        with pytest.raises(ImageError, match="for folders and videos: ferkit.predict_paths, or `ferkit predict`"):
            rec.predict(path)
    with pytest.raises(ImageError) as e:  # a missing video: not the hint
        rec.predict(good / "missing.mp4")
    assert "no such file" in str(e.value) and "predict_paths" not in str(e.value)
    with pytest.raises(ImageError, match="not a file path"):  # a long string: not OSError's "File name too long"
        rec.predict("a" * 5000)
    records = list(predict_paths(rec, str(good / "astronaut.jpg"), progress=False))
    assert [(r.source, len(r.faces), r.error) for r in records] == [(str(good / "astronaut.jpg"), 1, None)]
    frames = list(predict_paths(rec, video, every=5, progress=False))
    assert [r.frame for r in frames] == [0, 5, 10] and all(r.error is None for r in frames)


def test_nothing_is_written_to_the_home_folder(tmp_path):
    """ONNX Runtime wrote a device id and queued usage events in ~/.cache/Microsoft (and looked up its telemetry
    server from a process that lived a while): ferkit turns its telemetry off unless the user set it."""
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / ".cache")}  # ORT reads either
    env.pop("ORT_DISABLE_TELEMETRY", None)
    argv = [sys.executable, "-m", "ferkit", "predict", str(ASTRONAUT), "--format", "jsonl"]
    done = subprocess.run(argv, env=env, capture_output=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and len(jsonl(done.stdout.decode())[0]["faces"]) == 1, done.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_an_image_on_standard_input(tmp_path, video):
    """`cat photo.jpg | ferkit predict -` said "-: no such file"; a video there is told apart from other data."""
    argv = [sys.executable, "-m", "ferkit", "predict", "-", "--format", "jsonl", "--annotate", str(tmp_path)]
    done = subprocess.run(argv, input=ASTRONAUT.read_bytes(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = jsonl(done.stdout.decode())
    assert record["source"] == "-" and len(record["faces"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["stdin_annotated.png"]
    done = subprocess.run(argv, input=video.read_bytes(), capture_output=True, timeout=300)
    assert done.returncode == 1 and jsonl(done.stdout.decode())[0]["error"].startswith("a video (MP4/MOV), not an")


def test_expand_paths(mixed):
    files = [p.relative_to(mixed).as_posix() for p in expand_paths([mixed])]
    assert files == sorted(files)
    assert set(files) == {
        "astronaut.jpg",
        "sub/deeper/canvas.png",
        "sub/noise.bmp",
        "sub/empty.JPG",
        "bad/truncated.jpg",
        "bad/fake.png",
    }
    assert expand_paths([mixed / "notes.txt"]) == [mixed / "notes.txt"]  # named files are kept as given


def test_expand_paths_skips_hidden_files_and_reports_links_to_nothing(tmp_path):
    """A notebook's .ipynb_checkpoints/ copy was predicted twice, macOS's ._a.jpg failed the run; a link to
    nothing was skipped in silence (prepare reports it)."""
    shutil.copy(ASTRONAUT, tmp_path / "a.jpg")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    shutil.copy(ASTRONAUT, tmp_path / ".ipynb_checkpoints" / "a-checkpoint.jpg")
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble metadata
    (tmp_path / "dead.jpg").symlink_to(tmp_path / "gone.jpg")
    assert expand_paths([tmp_path]) == [tmp_path / "a.jpg", tmp_path / "dead.jpg"]
    assert expand_paths([tmp_path / ".ipynb_checkpoints"]) == [tmp_path / ".ipynb_checkpoints" / "a-checkpoint.jpg"]
    with pytest.raises(ImageError, match=re.escape(f"dead.jpg: a link to nothing ({tmp_path / 'gone.jpg'})")):
        load_image(tmp_path / "dead.jpg")


def test_expand_paths_follows_linked_folders_once_and_reports_link_loops(capsys, tmp_path):
    """A linked folder was skipped in silence; a link to itself was called "a link to nothing", and with
    --annotate below the folder it stopped the batch (RuntimeError: Symlink loop)."""
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(ASTRONAUT, tmp_path / "elsewhere" / "b.jfif")
    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(ASTRONAUT, root / "a.jpg")
    (root / "trip").symlink_to(tmp_path / "elsewhere")
    (root / "trip2").symlink_to(tmp_path / "elsewhere")  # the same folder again: read once
    (root / "up").symlink_to(tmp_path)  # a cycle: photos/up/photos/...
    (root / "loop.jpg").symlink_to("loop.jpg")
    files = [p.relative_to(root).as_posix() for p in expand_paths([root], skip=root / "annotated")]
    assert files == ["a.jpg", "loop.jpg", "trip/b.jfif"]
    code, out, _ = run(capsys, root, "--annotate", root / "annotated", "--format", "jsonl")
    records = jsonl(out)
    assert code == 1 and [len(r.get("faces", [])) for r in records] == [1, 0, 1]
    assert records[1]["error"] == f"{root / 'loop.jpg'}: a loop of links (loop.jpg)"


def test_annotated_outputs_in_the_folder_read_are_not_inputs(capsys, good, tmp_path):
    """`predict photos --annotate photos` took the last run's outputs as inputs (and annotated them again)."""
    root = shutil.copytree(good, tmp_path / "photos")
    (root / "me_annotated.jpg").write_bytes((root / "astronaut.jpg").read_bytes())  # not a name ferkit writes
    for _ in range(2):
        code, out, _ = run(capsys, root, "--annotate", root, "--format", "jsonl")
        assert code == 0 and len(jsonl(out)) == 4
    written = sorted(p.name for p in root.iterdir() if p.suffix == ".png")
    assert written == [f"{n}_annotated.png" for n in ("astronaut", "canvas", "me_annotated", "noise")]
    assert root / written[0] in expand_paths([root])  # without --annotate, an image like any other


def test_all_good_folder_exits_0(capsys, good):
    code, out, _ = run(capsys, good, "--format", "jsonl")
    assert code == 0
    records = {Path(r["source"]).name: r for r in jsonl(out)}
    assert set(records) == {"astronaut.jpg", "canvas.png", "noise.bmp"}
    assert all("error" not in r for r in records.values())
    assert len(records["astronaut.jpg"]["faces"]) == 1
    assert len(records["canvas.png"]["faces"]) == 3
    assert records["noise.bmp"]["faces"] == []
    for name, photo in [("astronaut.jpg", ASTRONAUT), ("canvas.png", CANVAS)]:
        for placed, face in zip(placed_boxes(photo), records[name]["faces"], strict=True):
            assert iou(face["box"], placed) > 0.5
            assert list(face["scores"]) == list(CLASSES)
            assert sum(face["scores"].values()) == pytest.approx(1, abs=1e-3)
            assert face["emotion"] == max(face["scores"], key=face["scores"].get)


def test_bad_inputs_are_reported_and_the_rest_processed(capsys, mixed):
    code, out, _ = run(capsys, mixed, mixed / "missing.jpg", "--format", "jsonl")
    assert code == 1
    records = {Path(r["source"]).name: r for r in jsonl(out)}
    assert set(records) == {
        "astronaut.jpg",
        "canvas.png",
        "noise.bmp",
        "truncated.jpg",
        "fake.png",
        "empty.JPG",
        "missing.jpg",
    }
    assert len(records["astronaut.jpg"]["faces"]) == 1 and len(records["canvas.png"]["faces"]) == 3
    reasons = {
        "truncated.jpg": "corrupt or truncated",
        "fake.png": "not an image file",
        "empty.JPG": "empty file (0 bytes), not an image",
        "missing.jpg": "no such file",
    }
    for name, reason in reasons.items():
        error = records[name]["error"]
        assert records[name]["source"] in error and reason in error, error
        assert "faces" not in records[name]


def test_table_output(capsys, mixed):
    """The table on stdout, each input's error on stderr (they were rows of the table)."""
    code, out, err = run(capsys, mixed)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["source", "frame", "face"]
    assert "error" not in out.lower()
    errors = err.splitlines()
    assert len(errors) == 3 and all(line.startswith("ferkit predict: error: ") for line in errors)
    assert any("truncated.jpg" in line and "corrupt" in line for line in errors)
    assert any("noise.bmp" in line and "no face found" in line for line in lines)
    assert sum("canvas.png" in line for line in lines) == 3


def test_csv_output(capsys, mixed):
    code, out, _ = run(capsys, mixed, "--format", "csv")
    assert code == 1
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == [
        *("source", "frame", "time_s", "face", "x", "y", "w", "h", "emotion", "confidence", "whole_image"),
        *CLASSES,
        "error",
    ]
    faces = [r for r in rows if not r["error"] and r["face"]]
    errors = [r for r in rows if r["error"]]
    no_face = [r for r in rows if not r["error"] and not r["face"]]
    assert sorted(Path(r["source"]).name for r in faces) == ["astronaut.jpg"] + ["canvas.png"] * 3
    assert [Path(r["source"]).name for r in no_face] == ["noise.bmp"]  # a row says it was processed
    assert sorted(Path(r["source"]).name for r in errors) == ["empty.JPG", "fake.png", "truncated.jpg"]
    canvas = [r for r in faces if r["source"].endswith("canvas.png")]
    assert [r["face"] for r in canvas] == ["0", "1", "2"]
    for row, placed in zip(canvas, placed_boxes(CANVAS), strict=True):
        assert iou([int(row[k]) for k in "xywh"], placed) > 0.5
    for r in faces:
        scores = {c: float(r[c]) for c in CLASSES}
        assert sum(scores.values()) == pytest.approx(1, abs=1e-3)
        assert r["emotion"] == max(scores, key=scores.get)
        assert float(r["confidence"]) == pytest.approx(scores[r["emotion"]], abs=1e-4)
        assert r["frame"] == ""
    for r in errors:
        assert r["source"] in r["error"] and r["emotion"] == ""


def test_annotate_writes_images(capsys, good, tmp_path):
    out_dir = tmp_path / "annotated"
    code, _, _ = run(capsys, good, "--annotate", out_dir)
    assert code == 0
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == ["astronaut_annotated.png", "canvas_annotated.png", "noise_annotated.png"]
    annotated, original = read_rgb(out_dir / "canvas_annotated.png"), read_rgb(CANVAS)
    assert annotated.shape == original.shape
    green = annotated[..., 1].astype(int) - annotated[..., 0] > 100  # the canvas itself is grey
    for x, y, w, h in placed_boxes(CANVAS):
        assert green[y - 10 : y + h + 10, x - 10 : x + w + 10].any()
    assert not green[440:, :200].any()  # far from every face


def test_annotated_outputs_inside_the_input_folder_are_not_inputs(capsys, good, tmp_path):
    """With --annotate inside the folder read, each run took the last run's outputs as inputs."""
    root = shutil.copytree(good, tmp_path / "photos")
    for _ in range(2):
        code, out, _ = run(capsys, root, "--annotate", root / "annotated", "--format", "jsonl")
        assert code == 0 and len(jsonl(out)) == 3  # one record a photo, none an annotated output
    assert sorted(p.name for p in (root / "annotated").iterdir()) == [
        "astronaut_annotated.png",
        "canvas_annotated.png",
        "noise_annotated.png",
    ]
    assert expand_paths([root / "annotated" / "canvas_annotated.png"], skip=root / "annotated") == [
        root / "annotated" / "canvas_annotated.png"  # a file named is read
    ]
    for above in (root, tmp_path):  # --annotate at or above the folder read skipped every input
        assert len(expand_paths([root / "sub"], skip=above)) == 2


def test_annotate_into_a_file_fails_before_any_work(capsys, good, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for target, fmt in [(afile, "jsonl"), (afile / "sub", "jsonl"), (afile, "csv"), (afile, "table")]:
        code, out, err = run(capsys, good, "--annotate", target, "--format", fmt)
        assert code == 2 and out == ""  # not even the CSV or table header
        assert f"error: {target}: cannot be the folder for annotated outputs" in err


def test_annotated_image_that_cannot_be_written_is_reported(capsys, good, tmp_path, monkeypatch):
    import ferkit.media

    def fail(path, write):
        raise OSError(f"{path}: disk full")

    monkeypatch.setattr(ferkit.media, "atomic_write", fail)
    code, out, _ = run(capsys, good / "astronaut.jpg", "--annotate", tmp_path / "ann", "--format", "jsonl")
    assert code == 1
    prediction, error = jsonl(out)  # the faces are still reported, then what went wrong
    assert prediction["source"] == str(good / "astronaut.jpg") and len(prediction["faces"]) == 1
    assert error["error"] == f"annotated image not written: {tmp_path / 'ann' / 'astronaut_annotated.png'}: disk full"


def test_a_folder_without_images_is_reported(capsys, good, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code, out, _ = run(capsys, empty, good / "astronaut.jpg", "--format", "jsonl")
    assert code == 1
    records = jsonl(out)
    assert records[0] == {"source": str(empty), "error": f"{empty}: no images or videos in this folder"}
    assert len(records[1]["faces"]) == 1


def test_fallback_classifies_faceless_images(capsys, good):
    code, out, _ = run(capsys, good / "sub" / "noise.bmp", "--fallback", "--format", "jsonl")
    assert code == 0
    (record,) = jsonl(out)
    assert [f["box"] for f in record["faces"]] == [[0, 0, 64, 64]] and record["faces"][0]["whole_image"]
    code, out, _ = run(capsys, good / "sub" / "noise.bmp", "--fallback", "--format", "csv")
    assert [r["whole_image"] for r in csv.DictReader(io.StringIO(out))] == ["1"]  # and 0 for a detected face
    code, out, _ = run(capsys, good / "sub" / "noise.bmp", "--fallback")
    assert "whole image" in out


def test_min_face_option(capsys, tmp_path):
    small = tmp_path / "small.png"  # the astronaut at 35%: a 39 px face, under the default 48 px minimum
    Image.fromarray(cv2.resize(read_rgb(ASTRONAUT), None, fx=0.35, fy=0.35, interpolation=cv2.INTER_AREA)).save(small)
    code, out, _ = run(capsys, small, "--format", "jsonl")
    assert code == 0 and jsonl(out)[0]["faces"] == []
    code, out, _ = run(capsys, small, "--min-face", "32", "--format", "jsonl")
    assert code == 0 and len(jsonl(out)[0]["faces"]) == 1


def test_max_pixels_option(capsys, good):
    """The astronaut is 512x512 = 262,144 pixels: refused under a smaller limit, read at exactly hers."""
    code, out, _ = run(capsys, good / "astronaut.jpg", "--max-pixels", "262143", "--format", "jsonl")
    assert code == 1 and "over the limit of 262,143" in jsonl(out)[0]["error"]
    code, out, _ = run(capsys, good / "astronaut.jpg", "--max-pixels", "262144", "--format", "jsonl")
    assert code == 0 and len(jsonl(out)[0]["faces"]) == 1


def test_max_pixels_over_pillow_s_own_limit(capsys, tmp_path, monkeypatch):
    """Pillow refused a 200 M-pixel image as a decompression bomb (its limit: 179 M) whatever --max-pixels said,
    and warned from 89 M. A PNG header of 14142x14142 with no pixel data: ferkit's limit decides, then its
    decoding fails."""
    import struct
    import warnings
    import zlib

    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1024 * 1024 * 1024 // 4 // 3)  # Pillow's default, restored after

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 14142, 14142, 8, 0, 0, 0, 0))
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(100))))
    code, out, _ = run(capsys, tmp_path / "big.png", "--format", "jsonl")  # the default limit, 40 M: refused
    # Pillow's own limit met first, said in ferkit's words (it quoted Pillow's 178,956,970 pixels)
    assert code == 1 and "big.png: image is 199,996,164 pixels, over the limit of 40,000,000" in jsonl(out)[0]["error"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        code, out, _ = run(capsys, tmp_path / "big.png", "--max-pixels", "250000000", "--format", "jsonl")
    assert code == 1 and "corrupt or truncated" in jsonl(out)[0]["error"]


def test_video_every_nth_frame(capsys, video, tmp_path):
    out_dir = tmp_path / "annotated"
    code, out, _ = run(capsys, video, "--every", "4", "--format", "jsonl", "--annotate", out_dir)
    assert code == 0
    records = jsonl(out)
    assert [r["frame"] for r in records] == [0, 4, 8]
    assert [r["time_s"] for r in records] == pytest.approx([0.0, 0.4, 0.8])
    for r in records:
        assert r["source"] == str(video) and len(r["faces"]) == 1
        assert sum(r["faces"][0]["scores"].values()) == pytest.approx(1, abs=1e-3)
    assert sorted(p.name for p in out_dir.iterdir()) == ["clip_annotated.mp4"]  # the partial file was renamed
    cap = cv2.VideoCapture(str(out_dir / "clip_annotated.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10 / 4)  # the source's 10 fps: it lasts as long
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (256, 256)
    cap.release()


def test_an_annotated_video_cut_short_by_a_full_disk_is_reported_not_kept(video, tmp_path):
    """cv2.VideoWriter.write reports nothing: at a full disk (a file-size limit here; Python ignores SIGXFSZ) the
    run exited 0 and left a clip_annotated.mp4 without its index, which nothing could play."""
    out_dir = tmp_path / "annotated"
    predict = [sys.executable, "-m", "ferkit", "predict", str(video), "--every", "1", "--format", "jsonl"]
    command = f"ulimit -f 8 && exec {shlex.join([*predict, '--annotate', str(out_dir)])}"  # 8 KiB: some frames
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    *frames, error = jsonl(proc.stdout)
    assert proc.returncode == 1 and len(frames) == 12, proc.stderr
    assert re.fullmatch(r"annotated video not written: .*clip_annotated\.mp4: the video writer stored \d+ of 12 "
                        r"frames \(disk full\?\)", error["error"])  # fmt: skip
    assert not list(out_dir.iterdir())


def test_mpeg4_takes_the_frame_rate_of_any_sampling(tmp_path):
    """A 1000 fps clip's every third frame (333.33... fps) could not be written: MPEG-4's time base holds at most
    65535 in its denominator (OpenCV's is fps x 1000)."""
    for fps in (1000 / 3, 960 / 7, 480 / 7, 30000 / 1001, 240, 0.5, 5000 / 3):
        writer = cv2.VideoWriter(str(tmp_path / "v.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), _mpeg4_fps(fps), (64, 48))
        assert writer.isOpened() and _mpeg4_fps(fps) == pytest.approx(fps, rel=1e-3), fps
        writer.release()


def test_annotated_video_that_cannot_be_written_keeps_its_frames(capsys, video, tmp_path, monkeypatch):
    class Closed:  # a VideoWriter whose codec is missing
        def __init__(self, *args) -> None:
            pass

        def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
            return False

        def release(self) -> None:
            pass

    out_dir = tmp_path / "annotated"
    with monkeypatch.context() as m:
        m.setattr(cv2, "VideoWriter", Closed)
        code, out, _ = run(capsys, video, "--every", "4", "--format", "jsonl", "--annotate", out_dir)
    assert code == 1
    error, *frames = jsonl(out)
    assert error["error"] == f"{out_dir / 'clip_annotated.mp4'}: cannot write the annotated video"
    assert [r["frame"] for r in frames] == [0, 4, 8] and all(len(r["faces"]) == 1 for r in frames)
    assert not list(out_dir.iterdir())

    def full(src, dst):
        raise OSError(f"{dst}: disk full")

    monkeypatch.setattr("ferkit.media.os.replace", full)
    code, out, _ = run(capsys, video, "--every", "4", "--format", "jsonl", "--annotate", out_dir)
    *frames, error = jsonl(out)
    assert code == 1 and [r["frame"] for r in frames] == [0, 4, 8]
    assert error["error"] == f"annotated video not written: {out_dir / 'clip_annotated.mp4'}: disk full"
    assert not list(out_dir.iterdir())  # nor its partial file
    _, _, err = run(capsys, video, "--every", "4", "--annotate", out_dir)  # the table's stderr names the input too
    assert (
        err
        == f"ferkit predict: error: {video}: annotated video not written: {out_dir / 'clip_annotated.mp4'}: disk full\n"
    )


def test_a_camera_that_gives_no_frame_is_reported(capsys, monkeypatch):
    monkeypatch.setattr("ferkit.media.VideoFrames", lambda source, every, live: iter(()))
    code, out, _ = run(capsys, "--webcam", "3", "--format", "jsonl")
    assert code == 1
    assert jsonl(out) == [{"source": "webcam:3", "error": "camera 3: opened, but gave no frame"}]
    url = "rtsp://admin:s3cret@127.0.0.1:9/live"  # a stream's password is printed nowhere
    code, out, _ = run(capsys, "--webcam", url, "--format", "jsonl")
    assert jsonl(out) == [
        {"source": "webcam:rtsp://127.0.0.1:9/live", "error": "rtsp://127.0.0.1:9/live: opened, but gave no frame"}
    ]


def test_webcam_takes_a_device_path_or_a_stream_url(capsys, video):
    """--webcam took a camera number only: no /dev/video2, no rtsp:// or http:// stream. A video file read as a
    live source stands in for a stream: its frames are timed by the clock, under the source as given."""
    code, out, _ = run(capsys, "--webcam", video, "--every", "4", "--format", "jsonl")
    records = jsonl(out)
    assert code == 0 and [r["frame"] for r in records] == [0, 4, 8]
    assert {r["source"] for r in records} == {f"webcam:{video}"} and all(len(r["faces"]) == 1 for r in records)
    assert main(["predict", "--webcam", "rtsp://127.0.0.1:9/none", "--no-progress"]) == 2  # nothing listens
    assert "error: rtsp://127.0.0.1:9/none: cannot open (no such camera or stream" in capsys.readouterr().err


class FakeCapture:
    """A ``cv2.VideoCapture`` whose frames have the timestamps ``stamps_ms`` (a frame rate of ``fps``)."""

    stamps_ms: list[float] = []
    fps = 30.0

    def __init__(self, source: int | str) -> None:
        self.stamps = iter(self.stamps_ms)

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return True

    def get(self, prop: int) -> float:
        return self.fps if prop == cv2.CAP_PROP_FPS else self.stamp

    def grab(self) -> bool:
        self.stamp = next(self.stamps, None)
        return self.stamp is not None

    def retrieve(self) -> tuple[bool, np.ndarray]:
        return True, np.zeros((4, 4, 3), np.uint8)

    def release(self) -> None:
        pass


@pytest.mark.parametrize(
    ("fps", "stamps_ms", "times"),
    [
        (30, [0, 100, 200, 1200], [0, 0.1, 0.2, 1.2]),  # variable frame rate
        (30, [0, 0, 0], [0, 1 / 30, 2 / 30]),  # raw H.264: no timestamps
        (30, [0, 33.3, 66.7, 0], [0, 1 / 30, 2 / 30, 3 / 30]),  # an MPEG stream's last frame
        (30, [66.7, 100, 133.3, 0, 0], [0, 1 / 30, 2 / 30, 3 / 30, 4 / 30]),  # an AVI's B-frames: late, then none
        (1000, [0, 50, 100, 0], [0, 0.05, 0.1, 0.15]),  # a wrong frame rate: the last gap
        (30, [float("nan"), 33.3, 66.7, 100], [0, 1 / 30, 2 / 30, 3 / 30]),  # the first without: 0, 1/30, 1/30, 2/30
    ],
)
def test_video_times_without_timestamps_follow_the_last_ones(monkeypatch, fps, stamps_ms, times):
    """OpenCV gives 0 for a frame without a timestamp: such frames read 0.000 (and an AVI with B-frames started
    two frames late)."""
    from ferkit.media import VideoFrames

    monkeypatch.setattr("cv2.VideoCapture", type("Capture", (FakeCapture,), {"stamps_ms": stamps_ms, "fps": fps}))
    monkeypatch.setattr("ferkit.media.os.access", lambda path, mode: True)
    assert [t for _, t, _ in VideoFrames("clip.mp4")] == pytest.approx(times, abs=1e-3)


def test_camera_times_are_the_clock_since_its_first_frame(monkeypatch):
    """A camera that says 30 fps and gives 4 frames a second: its times are the clock's, not index / 30."""
    from ferkit.media import VideoFrames

    clock = iter([100.0, 100.25, 100.5])
    monkeypatch.setattr("cv2.VideoCapture", type("Camera", (FakeCapture,), {"stamps_ms": [-1.0] * 3}))
    monkeypatch.setattr("ferkit.media.time.monotonic", lambda: next(clock))
    assert [(i, t) for i, t, _ in VideoFrames(0)] == [(0, 0.0), (1, 0.25), (2, 0.5)]


def test_a_camera_that_cannot_open_is_one_line_without_a_table_header(capfd):
    """No table header before the error, and none of OpenCV's warnings ("[ WARN:0@0.372] global cap_v4l.cpp")."""
    assert main(["predict", "--webcam", "63", "--no-progress"]) == 2  # no machine here has 64 cameras
    out, err = capfd.readouterr()
    assert (
        out == ""
        and err == "ferkit predict: error: camera 63: cannot open (no such camera or stream, or no access to it)\n"
    )


@pytest.mark.parametrize("reported, fps", [(15.0, 15.0), (0.0, 30.0), (float("nan"), 30.0)])
def test_video_fps_defaults_to_30_when_the_container_gives_none(reported, fps):
    class Capture:
        def get(self, prop: int) -> float:
            assert prop == cv2.CAP_PROP_FPS
            return reported

    assert _fps(Capture()) == fps


def test_video_in_csv_has_frame_numbers_and_times(capsys, video):
    code, out, _ = run(capsys, video, "--every", "5", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["frame"], r["time_s"]) for r in rows] == [("0", "0.000"), ("5", "0.500"), ("10", "1.000")]  # 10 fps


@pytest.mark.parametrize(
    ("name", "times"),
    [
        ("vfr.mp4", [0.0, 0.1, 0.2, 1.2, 1.3, 3.3]),
        ("vfr.mkv", [0.0, 0.1, 0.2, 1.2, 1.3, 3.3]),
        ("held.mp4", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]),
    ],
)
def test_video_times_are_the_frames_own(capsys, name, times):
    """A variable-frame-rate video (a phone's): each frame's time is its timestamp; index / average frame rate
    (1.76 fps in the MP4) gave 0.567 s for the frame shown at 0.1 s and 2.833 s for the one at 3.3 s. Neither
    is a cut file: the MKV's header's frame count is OpenCV's estimate, 34 (length x 10 fps), and held.mp4's
    last frame is held for 4 s (its length, 4.5 s, is not its last timestamp and gap)."""
    code, out, _ = run(capsys, ASSETS / name, "--every", "1", "--format", "jsonl")
    records = jsonl(out)
    assert code == 0 and not any("error" in r for r in records)
    assert [r["time_s"] for r in records] == pytest.approx(times)


def test_video_progress_counts_every_sampled_frame(capsys, video):
    """12 frames every 5th are frames 0, 5 and 10: the bar's total said 2."""
    assert main(["predict", str(video), "--every", "5", "--format", "jsonl"]) == 0
    assert "3/3" in capsys.readouterr().err


def test_a_video_frame_over_max_pixels_names_the_file_and_frame(capsys, video):
    code, out, _ = run(capsys, video, "--max-pixels", "100", "--format", "jsonl")
    (record,) = jsonl(out)
    assert code == 1 and record["error"].startswith(f"{video}: frame 0: image is ")


def test_a_file_name_that_is_not_utf8_does_not_stop_the_batch(capsys, good, tmp_path):
    """Printing a name with undecodable bytes (kept by Python as surrogates) raised on a UTF-8 stdout."""
    folder = tmp_path / "names"
    folder.mkdir()
    for name in (b"a.jpg", b"b\xff.jpg", b"c.jpg"):
        shutil.copy(good / "astronaut.jpg", os.path.join(os.fsencode(folder), name))
    for fmt in ("csv", "table", "jsonl"):
        code, out, _ = run(capsys, folder, "--format", fmt)
        assert code == 0 and "a.jpg" in out and "c.jpg" in out, fmt
        assert "b\\udcff.jpg" in out, fmt  # escaped, as JSON escapes it


def test_corrupt_video_is_reported(capsys, video, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    half = tmp_path / "half.mp4"
    half.write_bytes(video.read_bytes()[:2000])
    code, out, _ = run(capsys, bad, half, video, "--every", "6", "--format", "jsonl")
    assert code == 1
    records = jsonl(out)
    errors = {Path(r["source"]).name: r["error"] for r in records if "error" in r}
    assert set(errors) == {"broken.mp4", "half.mp4"}
    for name, error in errors.items():
        assert name in error and "video" in error
    assert [r["frame"] for r in records if r["source"] == str(video)] == [0, 6]


def test_torch_checkpoint_model(capsys, good, tmp_path):
    ckpt = make_checkpoint(tmp_path / "best.pt")
    code, out, _ = run(capsys, good / "astronaut.jpg", "--model", ckpt, "--backend", "torch", "--format", "jsonl")
    assert code == 0
    (record,) = jsonl(out)
    assert len(record["faces"]) == 1 and list(record["faces"][0]["scores"]) == list(CLASSES)


def test_repeated_model_is_an_ensemble(capsys, good, tmp_path):
    from ferkit.inference import EmotionRecognizer

    a, b = make_checkpoint(tmp_path / "a.pt", seed=0), make_checkpoint(tmp_path / "b.pt", seed=1)
    code, out, _ = run(capsys, good / "astronaut.jpg", "--model", a, "--model", b, "--format", "jsonl")
    assert code == 0
    (face,) = jsonl(out)[0]["faces"]
    (expected,) = EmotionRecognizer([a, b], threads=1).predict(good / "astronaut.jpg")
    assert face["box"] == list(expected.box)
    np.testing.assert_allclose(list(face["scores"].values()), list(expected.scores.values()), atol=1e-4)


def test_usage_errors_exit_2(capsys, good, tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"junk")
    code, out, err = run(capsys, good, "--model", tmp_path / "broken.onnx")
    assert code == 2 and "broken.onnx" in err and out == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give image/video/folder paths, or --webcam N|PATH|URL"),
        (["a.jpg", "--every", "0"], "argument --every: must be at least 1, got 0"),
        (["a.jpg", "--min-face", "0"], "argument --min-face: must be at least 1, got 0"),
        (["a.jpg", "--max-pixels", "0"], "argument --max-pixels: must be at least 1, got 0"),
        (["--webcam", "-1"], "argument --webcam: must be at least 0, got -1"),  # OpenCV segfaulted on -1
        (["--webcam", "0", "a.jpg"], "--webcam reads the camera only: it takes no paths and no --annotate"),
        (["--webcam", "0", "--annotate", "out"], "--webcam reads the camera only: it takes no paths and no --annotate"),
    ],
)
def test_bad_option_values_are_usage_errors_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", *argv])
    out = capsys.readouterr()
    assert exc.value.code == 2 and out.out == "" and f"ferkit predict: error: {message}" in out.err


def test_csv_columns_follow_the_model_classes(capsys, good, tmp_path):
    from ferkit.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(make_checkpoint(tmp_path / "m.pt"))
    classes = ["calm", "cross", "glad", "other", "shy", "stunned", "uneasy"]
    save_checkpoint(tmp_path / "custom.pt", {**state, "classes": classes})
    code, out, _ = run(capsys, good / "astronaut.jpg", "--model", tmp_path / "custom.pt", "--format", "csv")
    assert code == 0
    (row,) = csv.DictReader(io.StringIO(out))
    assert row["emotion"] in classes and sum(float(row[c]) for c in classes) == pytest.approx(1, abs=1e-3)


def test_truncated_video_reports_its_frames_and_then_the_cut(capsys, tmp_path):
    """An AVI cut in half still opens and announces all its frames; the ones decoded are reported, then an error."""
    full = tmp_path / "full.avi"
    writer = cv2.VideoWriter(str(full), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (128, 128))
    rng = np.random.default_rng(0)
    for _ in range(40):
        writer.write(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    writer.release()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])

    code, out, _ = run(capsys, full, "--every", "1", "--format", "jsonl", "--fallback")
    assert code == 0 and len(jsonl(out)) == 40 and not any("error" in r for r in jsonl(out))
    code, out, _ = run(capsys, cut, "--every", "1", "--format", "jsonl", "--fallback")
    records = jsonl(out)
    assert code == 1 and 5 < len(records) - 1 < 35
    assert all("faces" in r for r in records[:-1])
    end = (records[-2]["frame"] + 1) / 10  # 10 fps
    assert records[-1]["error"].startswith(
        f"{cut}: decoding stopped at {end:.2f} s (after frame {records[-2]['frame']}) of the 4.00 s (40 frames)"
    )
    stop = records[-1]["error"]
    for every in (3, 20):  # sampled 0, 20: a cut after frame 20 was taken for the gap to the next sample
        code, out, _ = run(capsys, cut, "--every", str(every), "--format", "jsonl", "--fallback")
        records = jsonl(out)
        assert code == 1 and records[-1]["error"] == stop
        assert [r["frame"] for r in records[:-1]] == list(range(0, len(records[:-1]) * every, every))


def test_broken_video_is_reported_once_without_ffmpeg_lines(capfd, video, tmp_path):
    half = tmp_path / "half.mp4"
    half.write_bytes(video.read_bytes()[:2000])
    assert main(["predict", str(half), "--format", "jsonl", "--no-progress"]) == 1
    out, err = capfd.readouterr()
    error = f"{half}: cannot open as a video file (not a video, or an MP4/MOV cut short)"
    assert jsonl(out) == [{"source": str(half), "error": error}]
    assert "moov atom" not in err


def test_a_reader_that_stops_early_gets_no_error(tmp_path):
    """`ferkit predict ... | head -1` printed "error: [Errno 32] Broken pipe" and exited 2."""
    import subprocess
    import sys

    for i in range(40):
        shutil.copy(ASTRONAUT, tmp_path / f"a{i}.jpg")
    code = "import sys; from ferkit.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "predict", str(tmp_path), "--format", "jsonl", "--no-progress", "--tta", "none"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(proc.stdout.readline())["faces"]
    proc.stdout.close()  # as `head -1` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.decode() == ""


def test_annotating_never_replaces_an_input(capsys, tmp_path):
    """a.jpg's picture, a_annotated.png, replaced the user's own a_annotated.png before it was read: the next row
    reported the astronaut again, and the user's file was gone."""
    shutil.copy(ASTRONAUT, tmp_path / "a.jpg")
    Image.open(CANVAS).save(tmp_path / "a_annotated.png")
    before = (tmp_path / "a_annotated.png").read_bytes()
    code, out, _ = run(
        capsys, tmp_path / "a.jpg", tmp_path / "a_annotated.png", "--annotate", tmp_path, "--format", "jsonl"
    )
    assert code == 0 and [len(r["faces"]) for r in jsonl(out)] == [1, 3]
    assert (tmp_path / "a_annotated.png").read_bytes() == before
    assert (tmp_path / "a_annotated_2.png").is_file() and (tmp_path / "a_annotated_annotated.png").is_file()


def test_an_annotate_folder_that_cannot_be_written_fails_before_any_work(capsys, good, tmp_path, monkeypatch):
    """A read-only folder that exists was found out file by file, each row followed by an error."""
    (tmp_path / "ro").mkdir()
    with read_only_filesystem(monkeypatch):
        code, out, err = run(capsys, good, "--annotate", tmp_path / "ro", "--format", "csv")
    assert code == 2 and out == ""
    assert f"error: {tmp_path / 'ro'}: cannot write annotated outputs there (Read-only file system)" in err


def test_a_folder_that_cannot_be_read_is_reported(capsys, good, tmp_path, monkeypatch):
    """A sub-folder os.walk could not list was skipped without a word (exit 0); a named one was 'no images'."""
    root = tmp_path / "root"
    shutil.copytree(good, root)
    closed = root / "sub"
    real_scandir, real_access = os.scandir, os.access

    def scandir(path="."):
        if Path(path) == closed:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != closed and real_access(p, mode))
    code, out, _ = run(capsys, root, "--format", "jsonl")
    records = jsonl(out)
    assert code == 1 and [r["source"] for r in records] == [str(root / "astronaut.jpg"), str(closed)]
    assert records[1]["error"] == f"{closed}: cannot read this folder (permission denied)"
    code, out, _ = run(capsys, closed, "--format", "jsonl")
    assert code == 1 and jsonl(out) == [{"source": str(closed), "error": records[1]["error"]}]


def test_a_video_named_with_another_suffix_is_read_as_a_video(capsys, video, tmp_path):
    """clip.bin was 'not an image file'; AVCHD's .mts files were skipped in folders."""
    clip = shutil.copy(video, tmp_path / "clip.bin")
    code, out, _ = run(capsys, clip, "--every", "6", "--format", "jsonl")
    assert code == 0 and [(r["frame"], len(r["faces"])) for r in jsonl(out)] == [(0, 1), (6, 1)]
    (tmp_path / "notes.bin").write_text("neither")
    Image.open(ASTRONAUT).save(tmp_path / "photo.tga")  # a format ferkit refuses, which FFmpeg would decode whole
    for other in ("notes.bin", "photo.tga"):
        code, out, _ = run(capsys, tmp_path / other, "--format", "jsonl")
        assert code == 1 and "not an image file" in jsonl(out)[0]["error"] and "frame" not in jsonl(out)[0]
    shutil.copy(video, tmp_path / "camcorder.MTS")
    assert tmp_path / "camcorder.MTS" in expand_paths([tmp_path])


def test_a_file_that_is_no_video_is_told_without_opencv_warnings(capfd, tmp_path):
    """Probing a .dat of other bytes as a video printed FFmpeg's '[ WARN:0@0.349] ... Unable to read codec
    parameters' above the table (OpenCV logs to the process's stderr, which capfd sees)."""
    data = tmp_path / "x.dat"
    data.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    code, out, err = run(capfd, data, "--format", "jsonl")
    assert code == 1 and "not an image file" in jsonl(out)[0]["error"] and "WARN" not in err


def test_hidden_files_in_a_model_folder_are_not_models(capsys, good, tmp_path):
    """macOS's ._x.onnx beside x.onnx was loaded, and failed as 'not a loadable ONNX model'."""
    from ferkit.fileio import model_files

    (tmp_path / "m").mkdir()
    model = shutil.copy(Path(__file__).parents[1] / "models/fast/ferkit_vgg_half_distill_int8.onnx", tmp_path / "m")
    (tmp_path / "m" / "._ferkit_vgg_half_distill_int8.onnx").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    assert model_files(tmp_path / "m") == [Path(model)]
    with pytest.raises(ValueError, match="an empty model path"):  # Path("") is ".": every model of the working folder
        model_files("")
    (tmp_path / "m" / "gone.onnx").symlink_to(tmp_path / "nowhere.onnx")  # was left out of the ensemble
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'm' / 'gone.onnx'}: a link to nothing")):
        model_files(tmp_path / "m")
    (tmp_path / "m" / "gone.onnx").unlink()
    code, out, _ = run(capsys, good / "astronaut.jpg", "--model", tmp_path / "m", "--format", "jsonl")
    assert code == 0 and len(jsonl(out)[0]["faces"]) == 1
