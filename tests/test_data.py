"""Loading FER-2013 from image folders, fer2013.csv and the .npz cache, and the errors for bad input."""

from __future__ import annotations

import codecs
import gzip
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import pixels_str, read_only_filesystem, synthetic_data, synthetic_face, write_csv
from PIL import Image

from ferkit.data import (
    CLASSES,
    SPLITS,
    DataError,
    FERData,
    _split_of,
    load_cache,
    load_csv,
    load_dataset,
    load_folder,
    prepare,
    save_cache,
    stratified_subset,
)


def _by_source(data: FERData) -> dict[str, int]:
    return {str(s): i for i, s in enumerate(data.sources)}


# ---------------------------------------------------------------- image folders


def test_load_folder_with_prefixes(fer_folder):
    data = load_folder(fer_folder.root, progress=False)
    assert len(data) == len(fer_folder.expected) == 49
    assert data.images.shape == (49, 48, 48) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and data.splits.dtype == np.uint8
    index = _by_source(data)
    assert set(index) == set(fer_folder.expected)
    for rel, (label, split, img) in fer_folder.expected.items():
        i = index[rel]
        assert data.labels[i] == label, rel
        assert data.splits[i] == split, rel
        if rel in fer_folder.lossless:
            np.testing.assert_array_equal(data.images[i], img)
        else:  # JPEG: lossy, but close
            assert np.abs(data.images[i].astype(int) - img).mean() < 6, rel
    counts = data.counts()
    assert counts["Training"] == dict.fromkeys(CLASSES, 3)
    assert counts["PublicTest"] == dict.fromkeys(CLASSES, 2)
    assert counts["PrivateTest"] == dict.fromkeys(CLASSES, 2)


def test_load_folder_without_prefixes_follows_documented_split_rule(fer_folder_noprefix):
    data = load_folder(fer_folder_noprefix.root, progress=False)
    index = _by_source(data)
    assert set(index) == set(fer_folder_noprefix.expected)
    for rel, (label, split, img) in fer_folder_noprefix.expected.items():
        i = index[rel]
        assert (data.labels[i], data.splits[i]) == (label, split), rel
        np.testing.assert_array_equal(data.images[i], img)
    counts = data.counts()
    # 5 test files per class, sorted by name: positions 0, 2, 4 PublicTest; 1, 3 PrivateTest
    assert counts["Training"] == dict.fromkeys(CLASSES, 2)
    assert counts["PublicTest"] == dict.fromkeys(CLASSES, 3)
    assert counts["PrivateTest"] == dict.fromkeys(CLASSES, 2)


@pytest.mark.parametrize(
    ("name", "top", "index", "expected"),
    [
        ("Training_1.jpg", "test", 1, "Training"),  # a prefix wins over the folder
        ("PublicTest_7.jpg", "train", 0, "PublicTest"),
        ("PrivateTest_7.jpg", "test", 0, "PrivateTest"),
        ("img.jpg", "train", 5, "Training"),
        ("img.jpg", "test", 0, "PublicTest"),
        ("img.jpg", "test", 1, "PrivateTest"),
        ("img.jpg", "test", 4, "PublicTest"),
        ("img.jpg", "val", 3, "PrivateTest"),
        ("Other_1.jpg", "test", 2, "PublicTest"),  # unknown prefix: folder rule
    ],
)
def test_split_of(name, top, index, expected):
    assert SPLITS[_split_of(name, top, index)] == expected


def test_folder_details(tmp_path):
    """val/ is read like test/; class folders are case-insensitive; other files and hidden ones (macOS's ._x.jpg
    failed the whole prepare) are ignored; RGB and other sizes are converted to 48x48 grayscale."""
    img = synthetic_face(3, 0)
    _tree(tmp_path, ["train"], skip=("happy", "sad"))
    _tree(tmp_path, ["val"], skip=("angry",))
    Image.fromarray(img).save(_mk(tmp_path / "train/Happy/Training_0.png"))
    rgb = np.stack([np.full((64, 64), v, np.uint8) for v in (200, 100, 50)], -1)
    Image.fromarray(rgb).save(_mk(tmp_path / "train/sad/Training_big.PNG"))
    (tmp_path / "train/sad/notes.txt").write_text("not an image")
    (tmp_path / "train/sad/sub").mkdir()
    (tmp_path / "train/sad/._Training_big.PNG").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble metadata
    Image.fromarray(img).save(_mk(tmp_path / "val/angry/x0.png"))
    Image.fromarray(img).save(_mk(tmp_path / "val/angry/x1.png"))
    data = load_dataset(tmp_path, progress=False)
    assert len(data) == 4 + 5 + 6
    index = _by_source(data)
    assert data.labels[index["train/Happy/Training_0.png"]] == CLASSES.index("happy")
    big = data.images[index["train/sad/Training_big.PNG"]]
    assert big.shape == (48, 48)
    expected_gray = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)  # PIL's ITU-R 601-2 luma
    assert np.abs(big.astype(int) - expected_gray).max() <= 1
    assert data.splits[index["val/angry/x0.png"]] == SPLITS.index("PublicTest")
    assert data.splits[index["val/angry/x1.png"]] == SPLITS.index("PrivateTest")


def test_folder_images_decode_as_inference_decodes_photos(tmp_path):
    """16-bit, transparent, EXIF-rotated and WebP images give training the pixels that inference would see
    (folders took only .jpg, .jpeg, .png and .bmp, predict also .gif, .webp and .tif)."""
    _tree(tmp_path, ["train"])
    ramp = np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (48, 1))
    Image.fromarray(ramp).save(tmp_path / "train/happy/sixteen.png")
    clear = np.zeros((48, 48, 4), np.uint8)
    clear[..., :3] = 200  # fully transparent: white, as in the app, not the hidden grey
    Image.fromarray(clear).save(tmp_path / "train/sad/clear.png")
    halves = np.zeros((48, 48), np.uint8)
    halves[:, 24:] = 255
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotate 180 degrees to display
    Image.fromarray(halves).save(tmp_path / "train/fear/rotated.jpg", exif=exif, quality=95)
    Image.fromarray(halves).save(tmp_path / "train/angry/other.webp", lossless=True)  # any type predict reads
    data = load_folder(tmp_path, progress=False)
    index = _by_source(data)
    assert (data.images[index["train/angry/other.webp"]] == halves).all()
    assert abs(data.images[index["train/happy/sixteen.png"]].mean() - 127.5) < 1  # not clipped to 255
    assert (data.images[index["train/sad/clear.png"]] == 255).all()
    rotated = data.images[index["train/fear/rotated.jpg"]].astype(int)
    assert rotated[:, :20].mean() > 240 and rotated[:, 28:].mean() < 15  # displayed as the camera meant


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _tree(root, tops=("train", "test"), skip=()):
    """A minimal valid image tree: one PNG per emotion folder (except ``skip``) under each of ``tops``."""
    for top in tops:
        for label, cls in enumerate(CLASSES):
            if cls not in skip:
                Image.fromarray(synthetic_face(label, 0)).save(_mk(root / top / cls / "filler.png"))


@pytest.mark.parametrize("top", ["train", "test"])
def test_folder_missing_emotion_names_it(tmp_path, top):
    _tree(tmp_path)
    shutil.rmtree(tmp_path / top / "disgust")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / top}: no 'disgust' folder (expected one folder per")):
        load_folder(tmp_path, progress=False)


def test_a_folder_of_kaggles_csv_download_points_to_the_csv(tmp_path):
    """The folder of Kaggle's original download holds fer2013.csv, no train/ or test/: say which to give."""
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: expected a train/ and/or test/ folder with one")):
        load_folder(tmp_path, progress=False)
    (tmp_path / "example_submission.csv").write_text("Id,Emotion\n")  # first by name, not FER-2013's columns
    (tmp_path / "train.csv").write_text("emotion,pixels\n")
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, progress=False)
    assert "give the CSV" not in str(e.value)
    (tmp_path / "fer2013").mkdir()  # unpacked one level down
    (tmp_path / "fer2013" / "fer2013.csv").write_text("emotion,pixels,Usage\n")
    with pytest.raises(DataError, match=re.escape(f"(or give the CSV file: {tmp_path / 'fer2013' / 'fer2013.csv'})")):
        load_folder(tmp_path, progress=False)
    (tmp_path / "icml_face_data.csv").write_text("emotion, Usage, pixels\n")
    with pytest.raises(DataError, match=re.escape(f"(or give the CSV file: {tmp_path / 'icml_face_data.csv'})")):
        load_folder(tmp_path, progress=False)


def test_folder_empty_emotion_names_it(tmp_path):
    _tree(tmp_path)
    (tmp_path / "train/fear/filler.png").unlink()
    (tmp_path / "train/fear/notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train' / 'fear'}: no images")):
        load_folder(tmp_path, progress=False)


def test_folder_with_both_test_and_val_is_refused(tmp_path):
    """A copy of test/ as val/ doubled PublicTest and PrivateTest without a word."""
    _tree(tmp_path, ["train", "test", "val"])
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: both test/ and val/; keep one")):
        load_folder(tmp_path, progress=False)


def test_folder_only_train_is_fine(tmp_path):
    _tree(tmp_path, ["train"])
    assert load_folder(tmp_path, progress=False).counts()["Training"] == dict.fromkeys(CLASSES, 1)


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    """An image too large to decode safely is an unreadable image (a DataError), not PIL's traceback."""
    _tree(tmp_path)
    bomb = tmp_path / "train/happy/huge.png"
    Image.new("L", (100, 100)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 48 * 50)  # PIL refuses images over twice this
    with pytest.raises(DataError, match=re.escape(str(bomb)) + ": unreadable image .*decompression bomb"):
        load_folder(tmp_path, progress=False)


def test_missing_folder_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_folder(missing)
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_dataset(missing)


def test_folder_without_train_or_test(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path)) + ".*train/"):
        load_folder(tmp_path)


def test_folder_without_images(tmp_path):
    (tmp_path / "train/happy").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_folder(tmp_path, progress=False)


def test_unknown_class_folder_names_it(tmp_path):
    Image.fromarray(synthetic_face(0, 0)).save(_mk(tmp_path / "train/angry/Training_0.png"))
    Image.fromarray(synthetic_face(0, 1)).save(_mk(tmp_path / "train/contempt/Training_1.png"))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train" / "contempt")) + ".*'contempt'"):
        load_folder(tmp_path, progress=False)


def test_hidden_folders_are_skipped_as_hidden_files_are(tmp_path):
    """Jupyter's .ipynb_checkpoints/ in a class's parent folder stopped the load as an unknown class."""
    _tree(tmp_path, ["train"])
    Image.fromarray(synthetic_face(0, 0)).save(_mk(tmp_path / "train/.ipynb_checkpoints/x.png"))
    assert load_folder(tmp_path, progress=False).counts()["Training"] == dict.fromkeys(CLASSES, 1)


def test_a_class_given_twice_in_two_cases_is_refused(tmp_path):
    """Angry/ beside angry/ loaded both: that class's images twice."""
    _tree(tmp_path, ["train"])
    shutil.copytree(tmp_path / "train/angry", tmp_path / "train/Angry")
    with pytest.raises(DataError, match=r"train/angry: class 'angry' given twice \(also Angry/\)"):
        load_folder(tmp_path, progress=False)


def test_a_link_to_nothing_is_named(tmp_path):
    """A broken symlinked image was dropped without a word."""
    _tree(tmp_path, ["train"])
    (tmp_path / "train/fear/Training_9.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train/fear/Training_9.jpg'}: a link to nothing")):
        load_folder(tmp_path, progress=False)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_image_names_the_file(tmp_path, kind):
    _tree(tmp_path, ["train"])
    bad = _mk(tmp_path / "train/fear/Training_bad.jpg")
    if kind == "garbage":
        bad.write_bytes(b"this is not a JPEG file" * 20)
    elif kind == "truncated":
        Image.fromarray(synthetic_face(2, 0)).save(bad, quality=95)
        bad.write_bytes(bad.read_bytes()[:300])
    else:
        bad.write_bytes(b"")
    why = r"\(empty file \(0 bytes\)" if kind == "empty" else ""
    with pytest.raises(DataError, match=re.escape(str(bad)) + ": unreadable image " + why):
        load_folder(tmp_path, progress=False)


def test_every_unreadable_image_is_named_in_one_error(tmp_path):
    """One bad file stopped the load, and the next run found the next one: 35,887 images decoded each time."""
    _tree(tmp_path, ["train"])
    bad = [_mk(tmp_path / f"train/{cls}/bad{i}.jpg") for cls in ("fear", "sad") for i in range(4)]
    for p in bad:
        p.write_bytes(b"not a JPEG")
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, progress=False)
    lines = str(e.value).splitlines()
    assert lines[0] == "8 of 15 images are unreadable; remove or replace them:"
    assert lines[1:6] == [
        f"  {p}: unreadable image (not an image file (unknown or unsupported format))" for p in bad[:5]
    ]
    assert lines[6:] == ["  ... and 3 more"]


def test_images_in_sub_folders_of_a_class_folder_are_its_own(tmp_path):
    """train/happy/batch2/*.jpg were skipped without a word; hidden folders stay skipped."""
    _tree(tmp_path, ["train"])
    Image.fromarray(synthetic_face(3, 1)).save(_mk(tmp_path / "train/happy/batch2/a.png"))
    Image.fromarray(synthetic_face(3, 2)).save(_mk(tmp_path / "train/happy/.thumbs/b.png"))
    data = load_folder(tmp_path, progress=False)
    assert data.counts()["Training"]["happy"] == 2
    assert "train/happy/batch2/a.png" in data.sources.tolist()


def test_a_folder_with_the_data_further_down_says_where(tmp_path):
    """An unzipped archive puts train/ and test/ a folder or two down; a split's own folder is one up."""
    _tree(tmp_path / "wrap/archive", ["train", "test"])
    with pytest.raises(DataError, match=re.escape(f"(give the folder that holds them: {tmp_path / 'wrap/archive'})")):
        load_folder(tmp_path, progress=False)
    with pytest.raises(DataError, match=re.escape("(train/ holds emotion folders: give the folder above it, ")):
        load_folder(tmp_path / "wrap/archive/train", progress=False)
    shutil.move(tmp_path / "wrap/archive/test", tmp_path / "mydata")  # emotion folders in a folder of another name
    with pytest.raises(
        DataError, match=re.escape(f"(it holds emotion folders: move them into {tmp_path / 'mydata/train'}/")
    ):
        load_folder(tmp_path / "mydata", progress=False)


def test_linked_sub_folders_of_a_class_folder_are_read_and_unreadable_ones_named(tmp_path, monkeypatch):
    """rglob neither followed a linked folder nor said it skipped one it could not list (predict's search does)."""
    _tree(tmp_path / "data", ["train"])
    Image.fromarray(synthetic_face(0, 3)).save(_mk(tmp_path / "extra/a.png"))
    (tmp_path / "data/train/angry/linked").symlink_to(tmp_path / "extra")
    assert load_folder(tmp_path / "data", progress=False).counts()["Training"]["angry"] == 2
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == tmp_path / "data/train/angry/linked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'data/train/angry/linked'}: cannot read this folder")):
        load_folder(tmp_path / "data", progress=False)


# ---------------------------------------------------------------- fer2013.csv


def test_load_csv(fer_csv):
    path, expected = fer_csv
    data = load_csv(path, progress=False)
    np.testing.assert_array_equal(data.images, expected.images)
    np.testing.assert_array_equal(data.labels, expected.labels)
    np.testing.assert_array_equal(data.splits, expected.splits)
    np.testing.assert_array_equal(data.sources, expected.sources)
    assert set(data.splits.tolist()) == {0, 1, 2}
    # and through the dispatcher
    np.testing.assert_array_equal(load_dataset(path, progress=False).images, expected.images)


def test_csv_tolerates_spaces_and_crlf(tmp_path):
    img = synthetic_face(4, 0)
    path = tmp_path / "f.csv"
    path.write_bytes(f"emotion, pixels, Usage\r\n 4 ,{pixels_str(img)}, PublicTest \r\n".encode())
    data = load_csv(path, progress=False)
    np.testing.assert_array_equal(data.images[0], img)
    assert data.labels.tolist() == [4] and data.splits.tolist() == [1]


def _good_row(label=0, usage="Training"):
    return (str(label), pixels_str(synthetic_face(label, 0)), usage)


def _csv_text(*rows):
    """A fer2013.csv text: the header, then one line per row (an empty row makes a blank line)."""
    return "emotion,pixels,Usage\n" + "".join(f"{','.join(row)}\n" for row in rows)


@pytest.mark.parametrize(
    ("header", "row"),
    [
        ("emotion, Usage, pixels", "5,PrivateTest,{}"),  # icml_face_data.csv, Kaggle's other download: refused before
        (",emotion,pixels,Usage,note,", "0,5,{},PrivateTest,x,"),  # pandas' index, a spreadsheet's empty columns
    ],
)
def test_csv_columns_are_matched_by_name_and_others_ignored(tmp_path, header, row):
    img = synthetic_face(5, 0)
    path = tmp_path / "fer2013.csv"
    path.write_text(f"{header}\n{row.format(pixels_str(img))}\n")
    data = load_csv(path, progress=False)
    np.testing.assert_array_equal(data.images[0], img)
    assert data.labels.tolist() == [5] and data.splits.tolist() == [2]


def test_csv_column_twice_is_refused(tmp_path):
    path = tmp_path / "fer2013.csv"
    path.write_text(f"emotion,pixels,Usage,emotion\n0,{pixels_str(synthetic_face(0, 0))},Training,1\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: the column 'emotion' appears twice")):
        load_csv(path, progress=False)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("emotion,pixels", "no Usage column to tell the splits apart (the challenge's train.csv?): give fer2013.csv"),
        ("pixels", "no emotion column: unlabelled images (the challenge's test.csv?) can be neither trained"),
    ],
)
def test_csv_of_the_challenges_train_or_test_says_what_it_lacks(tmp_path, header, message):
    """Kaggle's challenge page, which the README links, also has train.csv and test.csv: 'expected the columns'."""
    path = tmp_path / "train.csv"
    path.write_text(f"{header}\n" + ("0," if "emotion" in header else "") + pixels_str(synthetic_face(0, 0)) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: {message}")):
        load_csv(path, progress=False)


def test_compressed_or_utf16_data_says_so(tmp_path):
    text = _csv_text(_good_row(1))
    path = tmp_path / "fer2013.csv"
    path.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(DataError, match=re.escape(f"{path}: gzip-compressed: decompress it first")):
        load_csv(path, progress=False)
    path.write_bytes(text.encode("utf-16"))  # with its byte-order mark, as Windows tools save "Unicode"
    with pytest.raises(DataError, match=re.escape(f"{path}: UTF-16 text: save it as UTF-8")):
        load_csv(path, progress=False)
    archive = tmp_path / "fer2013.csv.gz"
    archive.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(DataError, match=re.escape(f"{archive}: an archive: unpack it first")):
        load_dataset(archive, progress=False)


def test_csv_utf8_bom(tmp_path):
    """As Excel saves it: a UTF-8 byte-order mark before the header."""
    path = tmp_path / "f.csv"
    path.write_bytes(b"\xef\xbb\xbf" + _csv_text(_good_row(1)).encode())
    assert load_csv(path, progress=False).labels.tolist() == [1]


def test_csv_ignores_blank_lines(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text(_csv_text(_good_row(1), (), _good_row(2), ("  ",), ()))  # a line of spaces is blank too
    data = load_csv(path, progress=False)
    assert data.labels.tolist() == [1, 2]
    assert data.sources.tolist() == ["f.csv:2", "f.csv:4"]


def test_csv_unmatched_quote_names_file_and_line(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text(_csv_text(_good_row(), ("0", '"1 2 3', "Training"), *[_good_row()] * 20))
    with pytest.raises(DataError, match=re.escape(f"{path}:3: malformed CSV row")):
        load_csv(path, progress=False)


def test_csv_unclosed_quote_in_a_short_file_names_its_line(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text(_csv_text(_good_row(), ("0", '"1 2 3', "Training"), _good_row()))
    with pytest.raises(DataError, match=re.escape(f"{path}:3: expected 3 fields, as the header has, got 2 (a quote")):
        load_csv(path, progress=False)


def test_csv_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "f.csv"
    path.write_bytes(b"\xff\xd8\xff\xe0 a JPEG renamed to .csv")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: not a UTF-8 text CSV")):
        load_csv(path, progress=False)
    good = _csv_text(*[_good_row()] * 5).encode()  # more than one block of the text reader
    path.write_bytes(codecs.BOM_UTF8 + good + b"0,caf\xe9,Training\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:7: not a UTF-8 text CSV")):
        load_csv(path, progress=False)


def test_load_dataset_suffix_is_case_insensitive(tmp_path):
    path = tmp_path / "FER2013.CSV"
    path.write_text(_csv_text(_good_row(3)))
    data = load_dataset(path, progress=False)
    assert data.labels.tolist() == [3]
    assert len(load_dataset(save_cache(data, tmp_path / "fer.NPZ"))) == 1


def test_csv_wrong_header(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [_good_row()], header="label,pixels,Usage")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: expected the columns emotion, pixels and Usage (in any")):
        load_csv(path, progress=False)
    headless = tmp_path / "headless.csv"  # its first row was echoed whole: 2,304 numbers
    headless.write_text("\n".join(",".join(_good_row()) for _ in range(2)) + "\n")
    with pytest.raises(DataError) as e:
        load_csv(headless, progress=False)
    message = str(e.value)
    assert message.startswith(f"{headless}:1: expected the columns emotion, pixels and Usage") and len(message) < 250


def test_csv_empty_file(tmp_path):
    path = tmp_path / "fer2013.csv"
    path.write_text("")
    with pytest.raises(DataError, match=re.escape(f"{path}: an empty file")):
        load_csv(path, progress=False)
    path.write_text("\n\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: an empty file")):
        load_csv(path, progress=False)


def test_csv_no_rows(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [])
    with pytest.raises(DataError, match=re.escape(f"{path}: no data rows")):
        load_csv(path, progress=False)


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "x.csv"))):
        load_csv(tmp_path / "x.csv")


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (" ".join(["7"] * 2303), "expected 2304 pixel values, got 2303"),
        (" ".join(["7"] * 2305), "expected 2304 pixel values, got 2305"),
        ("", "expected 2304 pixel values, got 0"),
        (" ".join(["7"] * 2303 + ["x"]), "pixels are not integers"),
        (" ".join(["7"] * 2303 + ["1.5"]), "pixels are not integers"),
        (" ".join(["7"] * 2303 + ["256"]), "pixel values must be in 0..255, got 256 (value 2304)"),
        (" ".join(["7", "-1"] + ["7"] * 2302), "pixel values must be in 0..255, got -1 (value 2)"),
        (" ".join(["7"] * 2303 + ["9" * 25]), f"pixel values must be in 0..255, got {'9' * 20} (value 2304)"),
        (" ".join(["7", "0300"] + ["7"] * 2302), "pixel values must be in 0..255, got 0300 (value 2)"),
        (" ".join(["7"] * 2303 + ["1_0"]), "pixels are not integers separated by spaces ('1_0')"),  # int() took these
        (" ".join(["7"] * 2303 + ["+7"]), "pixels are not integers separated by spaces ('+7')"),
        (" ".join(["7"] * 2303 + ["\u0667"]), "pixels are not integers separated by spaces ('\u0667')"),
    ],
)
def test_csv_bad_pixels_name_file_and_line(tmp_path, pixels, message):
    path = write_csv(tmp_path / "fer2013.csv", [_good_row(), _good_row(1), ("2", pixels, "Training"), _good_row(3)])
    with pytest.raises(DataError, match=re.escape(f"{path}:4: {message}")):
        load_csv(path, progress=False)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (("7", "0 " * 2304, "Training"), "emotion must be 0..6, got '7'"),
        (("-1", "0 " * 2304, "Training"), "emotion must be 0..6"),
        (("happy", "0 " * 2304, "Training"), "emotion must be 0..6"),
        (("\u00b2", "0 " * 2304, "Training"), "emotion must be 0..6, got '\u00b2'"),  # a digit to str.isdigit
        (("1", "0 " * 2304, "Validation"), "Usage must be one of Training, PublicTest, PrivateTest"),
        (("1", "0 " * 2304), "expected 3 fields, as the header has, got 2"),
    ],
)
def test_csv_bad_fields_name_file_and_line(tmp_path, row, message):
    path = write_csv(tmp_path / "fer2013.csv", [_good_row(), row])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: {message}")):
        load_csv(path, progress=False)


# ---------------------------------------------------------------- cache


def test_cache_round_trip_and_no_temp_file(tmp_path, fer_csv):
    data = load_csv(fer_csv[0], progress=False)
    out = tmp_path / "sub" / "fer.npz"
    assert save_cache(data, out) == out
    assert [p.name for p in out.parent.iterdir()] == ["fer.npz"]
    back = load_cache(out)
    for name in ("images", "labels", "splits", "sources"):
        a, b = getattr(data, name), getattr(back, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    back2 = load_dataset(out)
    np.testing.assert_array_equal(back2.images, data.images)


def test_save_cache_overwrites_atomically(tmp_path):
    out = tmp_path / "fer.npz"
    save_cache(synthetic_data({"Training": 1, "PublicTest": 0, "PrivateTest": 0}), out)
    save_cache(synthetic_data({"Training": 2, "PublicTest": 1, "PrivateTest": 1}), out)
    assert len(load_cache(out)) == 7 * 4
    assert [p.name for p in tmp_path.iterdir()] == ["fer.npz"]


def test_prepare_folder_writes_cache(tmp_path, fer_folder):
    out = tmp_path / "prepared.npz"
    data = prepare(fer_folder.root, out, progress=False)
    back = load_cache(out)
    np.testing.assert_array_equal(back.images, data.images)
    assert back.counts() == data.counts()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "npy", "missing_key", "wrong_classes"])
def test_corrupt_cache_names_the_file(tmp_path, kind):
    good = save_cache(synthetic_data({"Training": 1, "PublicTest": 1, "PrivateTest": 1}), tmp_path / "good.npz")
    bad = tmp_path / "bad.npz"
    if kind == "garbage":
        bad.write_bytes(b"\x00garbage" * 100)
    elif kind == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "npy":  # a single array, not an archive
        with open(bad, "wb") as f:
            np.save(f, np.zeros((2, 48, 48), np.uint8))
    elif kind == "missing_key":
        np.savez(bad, images=np.zeros((1, 48, 48), np.uint8), classes=np.asarray(CLASSES))
    else:
        np.savez(
            bad,
            images=np.zeros((1, 48, 48), np.uint8),
            labels=np.zeros(1, np.int64),
            splits=np.zeros(1, np.uint8),
            sources=np.asarray(["a"]),
            classes=np.asarray(sorted(CLASSES)),
        )
    with pytest.raises(DataError, match=re.escape(str(bad))) as e:
        load_cache(bad)
    if kind == "wrong_classes":  # it printed numpy's reprs: (np.str_('angry'), ...)
        assert f"classes {', '.join(sorted(CLASSES))}, not FER-2013's {', '.join(CLASSES)}" in str(e.value)
    with pytest.raises(DataError, match=re.escape(str(bad))):
        load_dataset(bad)


def test_copies_of_training_images_are_found_pixel_for_pixel():
    """FER-2013's PublicTest and PrivateTest hold copies of Training images (288 of PrivateTest's 3,589)."""
    data = synthetic_data({"Training": 2, "PublicTest": 2, "PrivateTest": 2})
    training, test = data.split("Training")[0], data.split("PrivateTest")[0].copy()
    test[0], test[5] = training[3], training[0]
    test[6] = training[1]
    test[6, 0, 0] ^= 1  # one pixel off: not a copy
    assert data.seen_in_training(test).tolist() == [i in (0, 5) for i in range(len(test))]
    assert data.seen_in_training(training).all()


def test_cache_with_bad_crc_is_an_error(tmp_path):
    good = save_cache(synthetic_data({"Training": 1, "PublicTest": 1, "PrivateTest": 1}), tmp_path / "c.npz")
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("images.npy")
    raw = bytearray(good.read_bytes())
    raw[info.header_offset + 200] ^= 0xFF  # flip bits inside the stored images array
    good.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=re.escape(str(good))):
        load_cache(good)


def test_missing_cache(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "no.npz")) + ": no such file"):
        load_cache(tmp_path / "no.npz")


def test_load_dataset_rejects_other_files(tmp_path):
    other = tmp_path / "fer.txt"
    other.write_text("x")
    with pytest.raises(DataError, match=re.escape(str(other)) + ": expected a folder"):
        load_dataset(other)


# ---------------------------------------------------------------- FERData


def test_split_subset_counts():
    data = synthetic_data({"Training": 4, "PublicTest": 2, "PrivateTest": 1})
    x, y = data.split("PublicTest")
    assert x.shape == (14, 48, 48) and np.bincount(y).tolist() == [2] * 7
    with pytest.raises(ValueError, match="unknown split 'Validation'"):
        data.split("Validation")
    xs, ys = stratified_subset(*data.split("Training"), n=10, seed=3)
    assert len(xs) == len(ys) == 10
    xs2, ys2 = stratified_subset(*data.split("Training"), n=10, seed=3)
    np.testing.assert_array_equal(xs, xs2)
    np.testing.assert_array_equal(ys, ys2)
    xs3, _ = stratified_subset(*data.split("Training"), n=10, seed=4)
    assert not np.array_equal(xs, xs3)
    # each chosen image is one of the split's, with its own label
    xt, yt = data.split("Training")
    for img, label in zip(xs, ys, strict=True):
        (match,) = np.flatnonzero((xt == img).all(axis=(1, 2)))
        assert yt[match] == label
    full, _ = stratified_subset(xt, yt, n=0)
    assert full is xt
    assert stratified_subset(xt, yt, n=1000)[0] is xt
    assert sum(data.counts()["Training"].values()) == 28


def test_no_fer2013_image_is_tracked_by_git():
    """The data set stays out of the repository: no tracked image has FER-2013's 48x48 size (the few
    photos that paste upscaled crops onto a canvas, e.g. src/ferkit/assets/faces_group.jpg, are 640x480)."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    images = [f for f in files if f.lower().endswith((".jpg", ".jpeg", ".png", ".bmp"))]
    assert images  # the report plots and example photos are tracked
    small = [f for f in images if max(Image.open(root / f).size) <= 64]
    assert small == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": np.zeros((4, 48, 48), np.float32)}, "images of float32 (48, 48), not uint8 48x48"),
        ({"images": np.zeros((4, 48, 48, 3), np.uint8)}, "images of uint8 (48, 48, 3), not uint8 48x48"),
        ({"labels": np.zeros(3, np.int64)}, "4 images, 3 labels, 4 splits, 4 sources"),
        ({"labels": np.array([0, 1, 7, 2])}, "labels outside 0..6"),
        ({"splits": np.array([0, 1, 3, 2], np.uint8)}, "split codes outside 0..2"),
    ],
)
def test_a_cache_with_wrong_arrays_is_refused(tmp_path, change, message):
    """Float images (divided by 255 twice) and a fourth split code trained without a word; short labels
    gave a raw IndexError."""
    arrays = dict(
        images=np.zeros((4, 48, 48), np.uint8),
        labels=np.array([0, 1, 2, 3]),
        splits=np.array([0, 1, 2, 0], np.uint8),
        sources=np.array(["a", "b", "c", "d"]),
        classes=np.asarray(CLASSES),
    )
    np.savez(tmp_path / "c.npz", **{**arrays, **change})
    with pytest.raises(DataError, match=re.escape(f"c.npz: not a ferkit data cache ({message}); rebuild it")):
        load_cache(tmp_path / "c.npz")
    np.savez(tmp_path / "ok.npz", **arrays)
    assert len(load_cache(tmp_path / "ok.npz")) == 4


def test_atomic_writes_follow_the_umask(tmp_path):
    """Every checkpoint, cache and report was world-readable (0644) whatever the umask."""
    from ferkit.fileio import atomic_write

    before = os.umask(0o022)
    try:
        for umask, mode in ((0o077, 0o600), (0o022, 0o644), (0o002, 0o664)):
            os.umask(umask)  # the one in force when the file is written, not at import
            path = atomic_write(tmp_path / f"{umask:o}.bin", lambda f: f.write(b"x"))
            assert path.stat().st_mode & 0o777 == mode
    finally:
        os.umask(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2.bin", "22.bin", "77.bin"]  # no temporary file left


def test_write_errors_name_the_file_to_write_not_its_temp_file(tmp_path, monkeypatch):
    """A read-only folder's error named '.out.npz.<hex>.tmp'; a file where a folder should be gave
    '[Errno 17] File exists: face.png'. prepare checks before decoding the data (once it exists)."""
    from ferkit.fileio import atomic_write, check_writable

    (tmp_path / "face.png").write_bytes(b"x")
    for write in (check_writable, lambda p: atomic_write(p, lambda f: f.write(b"x"))):
        with pytest.raises(NotADirectoryError, match=re.escape(f"{tmp_path / 'face.png'} is a file, not a folder")):
            write(tmp_path / "face.png" / "sub" / "out.npz")
        with read_only_filesystem(monkeypatch), pytest.raises(OSError, match=re.escape(f"'{tmp_path / 'out.npz'}'")):
            write(tmp_path / "out.npz")
    with read_only_filesystem(monkeypatch), pytest.raises(OSError, match="Read-only file system"):
        prepare(tmp_path / "face.png", tmp_path / "ro.npz")  # not "expected a folder": the data is not read first
    with pytest.raises(DataError, match="no_such_data: no such file or folder"):
        prepare(tmp_path / "no_such_data", tmp_path / "new" / "out.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face.png"]  # nothing left behind, no folder made
