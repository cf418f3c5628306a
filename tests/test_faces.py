"""Face detection on real photos and square grayscale face crops (ferkit.faces)."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers_inference import ASTRONAUT, CANVAS, iou, placed_boxes, read_rgb

import ferkit
from ferkit.faces import CENTERFACE, CenterFaceDetector, HaarDetector, YuNetDetector, crop_faces, make_detector
from ferkit.inference import DEFAULT_MODEL

DETECTORS = {"centerface": CenterFaceDetector, "haar": HaarDetector}
GROUP = Path(ferkit.__file__).parent / "assets" / "faces_group.jpg"  # the app's example: four faces


@pytest.fixture(scope="module")
def haar() -> HaarDetector:
    return HaarDetector()


@pytest.fixture(scope="module", params=list(DETECTORS))
def detector(request):
    return make_detector(request.param)


@pytest.mark.parametrize("photo", [CANVAS, ASTRONAUT], ids=["fer_canvas", "astronaut"])
def test_detectors_find_the_faces_where_they_are(detector, photo):
    boxes = detector.detect(read_rgb(photo))
    expected = placed_boxes(photo)
    assert len(boxes) == len(expected)
    for box, placed in zip(boxes, expected, strict=True):  # both left to right
        assert iou(box, placed) > 0.5, (box, placed)
        assert all(isinstance(v, int) for v in box)


def test_detectors_accept_grayscale_2d(detector):
    gray = cv2.cvtColor(read_rgb(CANVAS), cv2.COLOR_RGB2GRAY)
    boxes = detector.detect(gray)
    assert len(boxes) == 3 and all(iou(b, p) > 0.5 for b, p in zip(boxes, placed_boxes(CANVAS), strict=True))


def test_detectors_and_crops_take_one_channel_images(detector):
    """(H, W, 1) arrays, which CenterFace took, failed Haar and crop_faces in OpenCV ("'scn' is 1")."""
    gray = cv2.cvtColor(read_rgb(CANVAS), cv2.COLOR_RGB2GRAY)
    boxes = detector.detect(gray[:, :, None])
    assert boxes == detector.detect(gray) and len(boxes) == 3
    assert np.array_equal(crop_faces(gray[:, :, None], boxes), crop_faces(gray, boxes))


def test_haar_sees_only_the_gray_image(haar):
    gray = cv2.cvtColor(read_rgb(CANVAS), cv2.COLOR_RGB2GRAY)
    assert haar.detect(gray) == haar.detect(read_rgb(CANVAS))


def test_the_default_detector_is_the_shipped_centerface():
    detector = make_detector()
    assert isinstance(detector, CenterFaceDetector) and isinstance(make_detector("centerface"), CenterFaceDetector)
    assert (detector.score_threshold, detector.min_size, detector.reliable) == (0.3, 48, 32)  # README's table


@pytest.mark.parametrize("name", list(DETECTORS))
def test_large_image_boxes_are_in_original_pixels(name):
    """Images over max_side are downscaled for detection; the boxes come back in original pixels."""
    big = cv2.resize(read_rgb(ASTRONAUT), (1536, 1536), interpolation=cv2.INTER_CUBIC)
    boxes = DETECTORS[name](max_side=512, min_size=150).detect(big)  # detects at the photo's own 512 px
    (x, y, w, h) = placed_boxes(ASTRONAUT)[0]
    assert len(boxes) == 1
    assert iou(boxes[0], (3 * x, 3 * y, 3 * w, 3 * h)) > 0.5


def test_centerface_finds_a_50_px_face_at_low_resolution():
    """CenterFace shrinks a photo towards max_side (320 px), but never so far that a min_size face falls under
    32 px: the astronaut at 40% (a 49 px box) is found, and at 35% (39 px) only with min_size 32."""
    astronaut = read_rgb(ASTRONAUT)
    at_40, at_35 = (cv2.resize(astronaut, None, fx=f, fy=f, interpolation=cv2.INTER_AREA) for f in (0.4, 0.35))
    (x, y, w, h) = placed_boxes(ASTRONAUT)[0]
    boxes = CenterFaceDetector().detect(at_40)
    assert len(boxes) == 1 and iou(boxes[0], (0.4 * x, 0.4 * y, 0.4 * w, 0.4 * h)) > 0.5
    assert CenterFaceDetector().detect(at_35) == []
    assert len(make_detector("centerface", min_size=32).detect(at_35)) == 1


def test_centerface_model_file_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx: CenterFace model file not found"):
        CenterFaceDetector(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a network")
    with pytest.raises(ValueError, match=r"bad\.onnx: not a loadable CenterFace model"):
        CenterFaceDetector(bad)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_small_faces_in_a_large_photo_are_found(name):
    """Shrinking a 2560 px photo to 1024 px (Haar) or 320 px (CenterFace) for detection would take its
    48-88 px faces under what the detector finds: faces from the default 48 px minimum up must all be found."""
    tile = cv2.resize(read_rgb(CANVAS), None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)
    big = np.tile(tile, (2, 10, 1))  # 384x2560: 60 faces of 48, 64 and 88 px
    expected = [
        (x + 256 * i, y + 192 * j, w, h)
        for i in range(10)
        for j in range(2)
        for x, y, w, h in [[0.4 * v for v in b] for b in placed_boxes(CANVAS)]
    ]
    boxes = DETECTORS[name]().detect(big)
    assert len(boxes) == len(expected)
    assert all(any(iou(b, e) > 0.5 for b in boxes) for e in expected)


def test_faces_below_min_size_are_skipped():
    """The astronaut at 40% size: her face is 43 px, under the default 48 px minimum, over 32 px."""
    small = cv2.resize(read_rgb(ASTRONAUT), None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)
    assert HaarDetector().detect(small) == []
    boxes = HaarDetector(min_size=32).detect(small)
    (x, y, w, h) = placed_boxes(ASTRONAUT)[0]
    assert len(boxes) == 1 and iou(boxes[0], (0.4 * x, 0.4 * y, 0.4 * w, 0.4 * h)) > 0.5
    assert make_detector("haar", min_size=32).detect(small) == boxes


def test_no_face_in_noise_or_flat_images(detector):
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert detector.detect(noise) == []
    assert detector.detect(np.full((100, 100, 3), 128, np.uint8)) == []
    assert detector.detect(np.zeros((10, 10, 3), np.uint8)) == []  # smaller than the smallest face
    assert detector.detect(np.zeros((1, 5000, 3), np.uint8)) == []


def test_make_detector():
    assert isinstance(make_detector(None), CenterFaceDetector)
    assert isinstance(make_detector("haar"), HaarDetector)
    cascade = Path(cv2.data.haarcascades) / "haarcascade_frontalface_alt.xml"
    assert isinstance(make_detector(cascade), HaarDetector)

    class Fixed:
        def detect(self, rgb):
            return [(0, 0, 5, 5)]

    fixed = Fixed()
    assert make_detector(fixed) is fixed
    with pytest.raises(ValueError, match="unknown face detector"):
        make_detector("mtcnn")
    with pytest.raises(ValueError, match="min_size must be a whole number of at least 1, got 0"):
        make_detector("haar", min_size=0)
    with pytest.raises(FileNotFoundError, match="yunet.onnx"):
        make_detector("missing/yunet.onnx")
    with pytest.raises(FileNotFoundError):
        YuNetDetector("missing.onnx")


def test_bad_cascade_file_is_named(tmp_path):
    bad = tmp_path / "broken.xml"
    bad.write_text("<opencv_storage>not a cascade</opencv_storage>")
    with pytest.raises(RuntimeError, match="broken.xml"):
        HaarDetector(bad)


def test_crop_shape_dtype_and_size():
    rgb = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    crops = crop_faces(rgb, [(10, 20, 30, 30), (50, 40, 60, 40), (0, 0, 160, 120)])
    assert crops.shape == (3, 48, 48) and crops.dtype == np.uint8
    assert crop_faces(rgb, [(10, 20, 30, 30)], size=64).shape == (1, 64, 64)
    empty = crop_faces(rgb, [])
    assert empty.shape == (0, 48, 48) and empty.dtype == np.uint8


def test_crop_is_the_grayscale_box():
    """With no margin, a 48x48 box is cut out exactly, in ITU-R 601 grayscale."""
    rgb = np.random.default_rng(1).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    crop = crop_faces(rgb, [(20, 30, 48, 48)], margin=0.0)[0]
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(crop, gray[30:78, 20:68])
    np.testing.assert_array_equal(crop_faces(gray, [(20, 30, 48, 48)], margin=0.0)[0], crop)  # 2-D input


def test_margin_widens_the_crop():
    """A white 40x40 box on black: no margin gives all white; a 25% margin shows black all round."""
    rgb = np.zeros((200, 200, 3), np.uint8)
    rgb[80:120, 60:100] = 255
    box = (60, 80, 40, 40)
    assert crop_faces(rgb, [box], margin=0.0)[0].min() == 255
    wide = crop_faces(rgb, [box], margin=0.25)[0]  # 60 px around the box: 10 px (8 px at 48) black each side
    assert wide[:, :6].max() == 0 and wide[:, -6:].max() == 0
    assert wide[:6].max() == 0 and wide[-6:].max() == 0
    assert wide[12:36, 12:36].min() == 255


def test_non_square_box_gives_a_centred_square_crop():
    rgb = np.zeros((200, 200, 3), np.uint8)
    rgb[50:150, 90:110] = 255  # a tall 20x100 box
    crop = crop_faces(rgb, [(90, 50, 20, 100)], margin=0.0)[0]  # 100x100 square centred on it
    assert crop[:, 24].min() == 255 and crop[:, :18].max() == 0 and crop[:, 30:].max() == 0


@pytest.mark.parametrize(
    "box",
    [(0, 0, 30, 30), (130, 90, 30, 30), (-5, -5, 20, 20), (150, 110, 40, 40), (0, 0, 160, 120)],
    ids=["top_left", "bottom_right", "outside_top_left", "past_bottom_right", "whole_image"],
)
def test_boxes_at_the_edge_replicate_the_border(box):
    """Columns hold their x coordinate: where the crop goes past the left edge it repeats column 0
    (value 0), past the right edge the last column (value 159)."""
    gray = np.tile(np.arange(160, dtype=np.uint8), (120, 1))
    crop = crop_faces(gray, [box], margin=0.5)[0]
    assert crop.shape == (48, 48)
    x, _, w, _ = box
    if x - 0.5 * w < 0:
        assert (crop[:, 0] == 0).all()
    if x + 1.5 * w > 160:
        assert (crop[:, -1] == 159).all()
    assert (np.diff(crop.astype(int), axis=1) >= 0).all()  # still a left-to-right ramp: no wrap-around


def test_a_whole_image_crop_of_a_long_thin_image_stays_small(tmp_path):
    """`predict --fallback` on a 100000x10 PNG (3 KB, 1 MP) padded the whole image to a 120000-pixel square
    (20 GB) and the server was killed; the crop now needs a few MB (checked under a 1.5 GB address limit)."""
    import subprocess
    import sys

    code = (
        "import resource, numpy as np\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000, 1_500_000_000))\n"
        "from ferkit.faces import crop_faces\n"
        "img = np.zeros((10, 100_000, 3), np.uint8); img[:, 50_000:] = 200\n"
        "(crop,) = crop_faces(img, [(0, 0, 100_000, 10)])\n"
        "print(crop.shape, crop[24, :24].mean(), crop[24, 24:].mean())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shape, left, right = proc.stdout.rsplit(" ", 2)
    assert shape == "(48, 48)" and float(left) < 5 and float(right) > 195  # left half dark, right half light


@pytest.mark.parametrize(("min_size", "side"), [(48, 4000), (24, 2000)])
def test_centerface_finds_a_close_up_face_once(min_size, side):
    """A phone photo's close-up: the network splits or misses faces over ~400 px at the scale that keeps small
    faces findable; a coarser level of the pyramid boxes it once, and parts of it are not faces of their own."""
    (x, y, w, h) = placed_boxes(ASTRONAUT)[0]
    crop = read_rgb(ASTRONAUT)[8:225, 130:320]  # the face with a margin, 190x217
    f = side / 217
    close_up = cv2.resize(crop, (round(190 * f), side), interpolation=cv2.INTER_CUBIC)
    boxes = make_detector("centerface", min_size=min_size).detect(close_up)
    assert len(boxes) == 1 and iou(boxes[0], ((x - 130) * f, (y - 8) * f, w * f, h * f)) > 0.5, boxes


@pytest.mark.parametrize(("face", "at"), [(48, (100, 100)), (56, (1500, 1200)), (56, (2900, 400))])
def test_centerface_finds_a_small_face_in_a_large_photo_once(face, at):
    """A coarser level of the pyramid boxed a small face's whole head again (hair to neck, IoU 0.26 with the
    face's box: under NMS's threshold): a 56 px face in a 4000x3000 photo was two faces."""
    (x, y, w, h) = placed_boxes(ASTRONAUT)[0]
    f = face / w
    photo = np.full((3000, 4000, 3), 128, np.uint8)
    small = cv2.resize(read_rgb(ASTRONAUT), None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    photo[at[1] : at[1] + small.shape[0], at[0] : at[0] + small.shape[1]] = small
    boxes = CenterFaceDetector().detect(photo)
    assert len(boxes) == 1 and iou(boxes[0], (at[0] + x * f, at[1] + y * f, w * f, h * f)) > 0.5, boxes


def test_centerface_takes_what_the_api_may_pass_and_names_what_it_cannot():
    astronaut = read_rgb(ASTRONAUT)
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    detector = CenterFaceDetector()
    assert detector.detect(rgba) == detector.detect(astronaut)
    assert len(detector.detect(astronaut[..., :1])) == 1  # one channel: grayscale
    assert CenterFaceDetector(min_size=100).detect(np.zeros((1, 2000, 3), np.uint8)) == []  # shrunk to 0 rows
    with pytest.raises(ValueError, match="expected an 8-bit image"):
        detector.detect(astronaut.astype(np.uint16) * 257)
    with pytest.raises(ValueError, match=r"grayscale image, got an array of shape \(512, 512, 2\)"):
        detector.detect(astronaut[..., :2])


def test_centerface_keeps_a_face_in_front_of_another():
    """A face partly in front of a larger one is a face: only parts of a face too large for the pyramid level
    that saw them are dropped (a first version dropped any box mostly inside a larger one)."""
    astronaut = read_rgb(ASTRONAUT)[8:225, 130:320]
    child = read_rgb(GROUP)[150:360, 45:225]  # the happy face on the left of the app's example
    photo = np.full((800, 800, 3), 128, np.uint8)
    photo[50:484, 100:480] = cv2.resize(astronaut, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    photo[270:438, 250:394] = cv2.resize(child, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    boxes = CenterFaceDetector().detect(photo)
    assert len(boxes) == 2 and any(iou(b, (250, 270, 144, 168)) > 0.5 for b in boxes), boxes


def test_centerface_refuses_another_network():
    from ferkit.inference import DEFAULT_MODEL

    with pytest.raises(ValueError, match=r"not a CenterFace model \(one input 'input.1' and four outputs"):
        CenterFaceDetector(DEFAULT_MODEL)


def test_an_onnx_detector_file_is_told_by_its_network(tmp_path):
    """A CenterFace file under another name is CenterFace; an ONNX network that is neither CenterFace nor
    YuNet (here the emotion model) is refused by name."""
    copy = tmp_path / "my_centerface.onnx"
    shutil.copy(CENTERFACE, copy)
    detector = make_detector(copy, min_size=32, threads=1)
    assert isinstance(detector, CenterFaceDetector) and detector.min_size == 32
    with pytest.raises(ValueError, match=r"emotion\.onnx: neither a CenterFace nor a YuNet face detector model"):
        make_detector(shutil.copy(DEFAULT_MODEL, tmp_path / "emotion.onnx"))
    with pytest.raises(FileNotFoundError, match=r"gone\.onnx: face detector model file not found"):
        make_detector(tmp_path / "gone.onnx")
    (tmp_path / "gone.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(FileNotFoundError, match=r"gone\.onnx: a link to nothing \(.*elsewhere\.onnx\)"):
        make_detector(tmp_path / "gone.onnx")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(FileNotFoundError, match=r"folder\.onnx: is a folder, not a face detector model file"):
        make_detector(tmp_path / "folder.onnx")


def test_boxes_of_no_area_inside_the_image_are_dropped():
    from ferkit.faces import fit_boxes

    assert fit_boxes([(160, 10, 20, 20), (10, 10, 0, 5), (10, 120, 5, 5)], (120, 160)) == []


def test_a_detector_that_gives_other_than_boxes_of_four_is_refused():
    """Boxes of five numbers (with a score) were reshaped into other boxes, four of them into five nonsense boxes;
    None was "cannot reshape array of size 1 into shape (4)"."""
    from ferkit.faces import fit_boxes

    scored = [(10, 10, 50, 60, 0.9)] * 4
    with pytest.raises(ValueError, match=r"expected \(x, y, w, h\) boxes, an \(N, 4\) array; got shape \(4, 5\)"):
        fit_boxes(scored, (120, 160))
    with pytest.raises(ValueError, match="expected \\(x, y, w, h\\) boxes"):
        fit_boxes([(1, 2, 3, 4), (1, 2)], (120, 160))  # ragged
    assert fit_boxes(None, (120, 160)) == fit_boxes(np.zeros((0, 4)), (120, 160)) == fit_boxes([], (120, 160)) == []
    assert fit_boxes((10, 10, 50, 60), (120, 160)) == [(10, 10, 50, 60)]  # one box, unnested: was taken


def test_detector_files_are_known_by_their_suffix_in_any_case(tmp_path):
    """'--detector CF.ONNX' was an unknown face detector."""
    import shutil

    from ferkit.faces import make_detector

    upper = shutil.copy(Path(__file__).parents[1] / "src/ferkit/weights/centerface.onnx", tmp_path / "CF.ONNX")
    assert make_detector(upper).detect(np.zeros((64, 64, 3), np.uint8)) is not None


@pytest.mark.parametrize("box", [(50, -5, 20, 20), (50, 0, 30, 30), (50, 90, 30, 30), (50, 110, 40, 40)])
def test_crops_past_the_top_or_bottom_are_padded_on_that_side(box):
    """A vertical ramp: the crop's centre is the box's (clipped), and the rows never run backwards."""
    gray = np.tile(np.arange(120, dtype=np.uint8)[:, None], (1, 160))
    crop = crop_faces(gray, [box], margin=0.5)[0].astype(int)
    assert abs(crop[24, 24] - min(max(box[1] + box[3] / 2, 0), 119)) <= 2
    assert (np.diff(crop, axis=0) >= 0).all()


def test_centerface_takes_its_thresholds():
    rgb = read_rgb(ASTRONAUT)
    assert len(make_detector("centerface", threads=1, nms_threshold=0.9).detect(rgb)) > 1
    assert len(make_detector("centerface", threads=1, score_threshold=0.5, nms_threshold=0.05).detect(rgb)) == 1


def test_centerface_boxes_the_astronaut_where_it_did():
    """The decoder's half-pixel offsets: without them boxes move by about 3 px."""
    (box,) = make_detector("centerface", threads=1).detect(read_rgb(ASTRONAUT))
    assert np.abs(np.subtract(box, (183, 61, 85, 113))).max() <= 1
