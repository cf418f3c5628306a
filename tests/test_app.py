"""The web app: its JSON API against a real ``ferkit serve`` process on loopback (real model, real
photos), then the concurrency limits (busy, timeout) in-process with a deliberately slow stand-in."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import anyio
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

from appserver import running_server  # noqa: E402

import ferkit.app  # noqa: E402
from ferkit.app import ASSETS_DIR, AppSettings, create_app  # noqa: E402
from ferkit.data import CLASSES  # noqa: E402
from ferkit.inference import EmotionRecognizer, FaceResult  # noqa: E402

pytestmark = pytest.mark.slow

MAX_UPLOAD_MB = 1  # small limits for the test server, so that "too large" inputs stay small
MAX_PIXELS = 4_000_000
PREDICT = "/api/v1/predict"


@pytest.fixture(scope="module")
def server() -> str:
    with running_server(
        "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-pixels", str(MAX_PIXELS), "--log-level", "warning"
    ) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def post_file(client, data: bytes, name: str = "photo.jpg", mime: str = "image/jpeg", **params):
    return client.post(PREDICT, files={"file": (name, data, mime)}, params=params)


def encode(img: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, fmt)
    return buf.getvalue()


def no_face_image(w: int = 400, h: int = 300) -> bytes:
    """A smooth colour gradient: nothing a face detector should fire on."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    return encode(rgb)


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's header):
    IHDR, one short IDAT chunk, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1000))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def iou(a, b) -> float:
    iw = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def check_face(face: dict) -> None:
    assert set(face) == {"box", "emotion", "confidence", "scores", "whole_image"}
    assert len(face["box"]) == 4 and all(isinstance(v, int) for v in face["box"])
    assert list(face["scores"]) == list(CLASSES)
    assert sum(face["scores"].values()) == pytest.approx(1.0, abs=1e-3)
    assert face["emotion"] == max(face["scores"], key=face["scores"].get)
    assert face["confidence"] == pytest.approx(face["scores"][face["emotion"]])


def check_error(r, *statuses: int) -> str:
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"], body
    return body["error"]


# ------------------------------------------------------------------------------------ good inputs


def test_health_model_docs_and_ui(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"]
    model = client.get("/api/v1/model").json()
    assert model["name"] == health["model"] and model["classes"] == list(CLASSES)
    assert "path" not in model  # no server file paths in public answers
    assert (model["accuracy_tta"], model["tta"]) == ("flip", "flip")  # the shipped model's accuracy is what it runs
    assert client.get("/docs").status_code == 200
    documented = client.get("/openapi.json").json()["paths"][PREDICT]["post"]["responses"]
    assert {"200", "400", "408", "413", "415", "422", "503", "504"} <= set(documented)  # every status it answers
    ui = client.get("/")
    assert ui.status_code == 200 and "gradio" in ui.text.lower()


def test_one_face(client):
    r = post_file(client, (ASSETS_DIR / "astronaut.jpg").read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"faces", "width", "height", "model", "elapsed_ms"}
    assert (body["width"], body["height"]) == (512, 512)
    assert body["model"] == client.get("/healthz").json()["model"]
    assert body["elapsed_ms"] > 0
    assert len(body["faces"]) == 1
    check_face(body["faces"][0])
    assert iou(body["faces"][0]["box"], (180, 68, 90, 97)) > 0.6  # hand-drawn box around her face


def test_several_faces(client):
    r = post_file(client, (ASSETS_DIR / "faces_group.jpg").read_bytes())
    assert r.status_code == 200, r.text
    faces = r.json()["faces"]
    assert len(faces) == 4
    for face in faces:
        check_face(face)
    pasted = [(30, 150, 190, 190), (255, 40, 150, 150), (300, 320, 110, 110), (470, 80, 130, 130)]
    assert [f["box"][0] for f in faces] == sorted(f["box"][0] for f in faces)  # left to right
    for face, box in zip(faces, pasted, strict=True):
        assert iou(face["box"], box) > 0.6


def test_png_upload_with_any_mime_type(client):
    rgb = np.asarray(Image.open(ASSETS_DIR / "astronaut.jpg").convert("RGB"))
    r = post_file(client, encode(rgb, "PNG"), name="upload.bin", mime="application/octet-stream")
    assert r.status_code == 200 and len(r.json()["faces"]) == 1


def test_no_face(client):
    r = post_file(client, no_face_image(), name="gradient.png", mime="image/png")
    assert r.status_code == 200, r.text
    assert r.json()["faces"] == []
    assert (r.json()["width"], r.json()["height"]) == (400, 300)


def test_no_face_with_fallback(client):
    r = post_file(client, no_face_image(), name="gradient.png", mime="image/png", fallback="true")
    assert r.status_code == 200, r.text
    faces = r.json()["faces"]
    assert len(faces) == 1 and faces[0]["box"] == [0, 0, 400, 300] and faces[0]["whole_image"] is True
    check_face(faces[0])


def test_concurrent_requests(client, server):
    """18 requests from 6 clients at once (the server runs 2, the others wait) get the answer of one alone."""
    data = (ASSETS_DIR / "astronaut.jpg").read_bytes()
    alone = post_file(client, data).json()
    results: list[tuple[int, dict]] = []

    def worker():
        with httpx.Client(base_url=server, timeout=60) as c:
            for _ in range(3):
                r = post_file(c, data)
                results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [code for code, _ in results] == [200] * 18
    assert all(body["faces"] == alone["faces"] for _, body in results)


# ------------------------------------------------------------------------------------- bad inputs


def test_too_large_by_content_length(client):
    error = check_error(post_file(client, b"\xff\xd8" + b"0" * 2 * MAX_UPLOAD_MB * 2**20), 413)
    assert "too large" in error and "over the limit of 1 MiB" in error


def test_too_large_file_just_over_the_limit(client):
    # the body fits the middleware's allowance for multipart headers; the file itself is over the limit
    error = check_error(post_file(client, b"0" * (MAX_UPLOAD_MB * 2**20 + 10)), 413)
    assert "too large" in error


def test_too_large_chunked_without_content_length(client):
    boundary = "ferkitboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    def body():  # a generator: httpx sends it chunked, with no Content-Length
        yield head
        for _ in range(3 * MAX_UPLOAD_MB * 16):
            yield b"0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post(PREDICT, content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in r.request.headers
    check_error(r, 413)


@pytest.mark.parametrize(
    "data,name",
    [
        (b"hello, this is plain text and no image", "notes.txt"),
        (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n", "doc.pdf"),
        (bytes(range(256)) * 20, "random.bin"),
    ],
)
def test_not_an_image(client, data, name):
    error = check_error(post_file(client, data, name=name, mime="application/octet-stream"), 415, 400)
    assert "not an image" in error


def test_a_video_upload_is_told_apart(client):
    """A video was 'not an image file (unknown or unsupported format)', as a PDF is; an HEIC photo (an ftyp box
    too) is no video."""
    mp4 = b"\x00\x00\x00\x1cftypisom" + bytes(200)
    error = check_error(post_file(client, mp4, name="clip.mp4", mime="video/mp4"), 415)
    assert error == "a video (MP4/MOV), not an image: videos are read from files, by `ferkit predict VIDEO` or " \
                    "ferkit.predict_paths"  # fmt: skip
    heic = b"\x00\x00\x00\x18ftypheic" + bytes(200)
    assert check_error(post_file(client, heic, name="photo.heic", mime="image/heic"), 415).startswith("not an image")


def test_corrupt_images(client):
    """An image's header, then bytes no decoder reads, is a corrupt image (400): a JPEG's was answered 415."""
    jpeg = (ASSETS_DIR / "astronaut.jpg").read_bytes()
    error = check_error(post_file(client, jpeg[: len(jpeg) // 2]), 400)  # truncated JPEG
    assert "truncated" in error or "corrupt" in error
    assert "a JPEG header" in check_error(post_file(client, jpeg[:20] + bytes(2000)), 400)
    png = encode(np.zeros((64, 64, 3), np.uint8))
    broken = png[:40] + bytes(len(png) - 40)  # valid header, zeroed chunks
    check_error(post_file(client, broken, name="broken.png", mime="image/png"), 400)
    check_error(post_file(client, b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, name="sig.png", mime="image/png"), 400)


def test_oversized_dimensions(client):
    big = Image.new("L", (2100, 2000), 128)  # 4.2 M pixels > 4 M; a few kB as PNG
    error = check_error(post_file(client, encode(big), name="big.png", mime="image/png"), 413)
    assert "2100x2000" in error and "limit" in error


def test_a_pixel_limit_over_the_default_holds_past_decoding():
    import anyio

    from ferkit.app import RecognizerService
    from ferkit.inference import MAX_PIXELS

    service = RecognizerService.from_settings(AppSettings(max_pixels=MAX_PIXELS + 10**6, max_concurrency=1))
    big = np.full((MAX_PIXELS // 6000 + 10, 6000), 128, np.uint8)  # over the default limit, under this one
    analysis = anyio.run(service.analyse, big)
    assert (analysis.width, analysis.height, analysis.faces) == (6000, big.shape[0], [])


@pytest.mark.parametrize("side", [3000, 10000, 30000])  # 9 M, 100 M (PIL warns), 900 M pixels (PIL refuses)
def test_decompression_bomb(client, side):
    error = check_error(post_file(client, png_bomb(side, side), name="bomb.png", mime="image/png"), 413)
    limit = MAX_PIXELS  # the test server's --max-pixels
    assert error.endswith(f"image is {side}x{side} = {side * side:,} pixels, over the limit of {limit:,}") or (
        error.endswith(f"image is {side * side:,} pixels, over the limit of {limit:,}")  # Pillow's limit met first
    )


def test_empty_file_and_missing_field(client):
    check_error(post_file(client, b""), 400)
    error = check_error(client.post(PREDICT, data={"other": "x"}), 422)
    assert "file" in error and "(send the image as multipart field 'file')" in error
    check_error(client.post(PREDICT, content=b"raw bytes", headers={"Content-Type": "image/jpeg"}), 422)
    jpeg = (ASSETS_DIR / "astronaut.jpg").read_bytes()
    error = check_error(client.post(PREDICT + "?fallback=maybe", files={"file": ("a.jpg", jpeg, "image/jpeg")}), 422)
    assert "fallback" in error and "multipart" not in error  # the file was there: no hint about sending it


def test_two_images_in_one_request_are_refused(client):
    jpeg = (ASSETS_DIR / "astronaut.jpg").read_bytes()
    two = [("file", ("a.jpg", jpeg, "image/jpeg")), ("file", ("b.jpg", jpeg, "image/jpeg"))]
    assert "one image per request: got 2 'file' parts" in check_error(client.post(PREDICT, files=two), 422)


def test_server_survived_bad_inputs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert post_file(client, (ASSETS_DIR / "astronaut.jpg").read_bytes()).status_code == 200


def test_every_setting_is_a_serve_flag_with_its_default(monkeypatch):
    """Each AppSettings field (but the model and the UI switch) is the dest of a serve flag, which reaches it."""
    import dataclasses

    from ferkit.cli import build_parser, main

    args = vars(build_parser().parse_args(["serve"]))
    assert (args["host"], args["port"]) == ("127.0.0.1", 7860)
    for name, default in dataclasses.asdict(AppSettings()).items():
        assert name in ("model", "ui") or args[name] == default, name
    got = {}
    monkeypatch.setattr("ferkit.app.serve", lambda settings, **where: got.update(settings=settings, **where))
    argv = ["serve", "--concurrency", "3", "--queue", "5", "--queue-timeout", "2", "--timeout", "7", "--no-ui"]
    argv += ["--keep-files", "120"]
    assert main(argv + ["--upload-timeout", "9", "--threads", "1", "--max-upload-mb", "4", "--model", "a.onnx"]) == 0
    expected = dict(max_concurrency=3, max_queue=5, queue_timeout_s=2, timeout_s=7, upload_timeout_s=9, threads=1)
    expected |= dict(keep_files_s=120)
    assert got["settings"] == AppSettings(model="a.onnx", ui=False, max_upload_mb=4, **expected)


# ---------------------------------------------- busy and timeout, in-process with a slow stand-in model


class SlowRecognizer:
    """Stands in for EmotionRecognizer: no faces, after waiting ``delay`` seconds."""

    model_info = {"name": "slow-stand-in", "classes": list(CLASSES), "accuracy": None, "accuracy_tta": None}
    model_info |= {"backend": "none"}
    tta, detector_name, margin, min_face, max_pixels = "none", "centerface", 0.1, 48, 40_000_000

    def __init__(self, delay: float) -> None:
        self.delay, self.started, self.finished = delay, threading.Event(), threading.Event()

    def predict(self, image, whole_image_fallback=False):
        self.started.set()
        time.sleep(self.delay)
        self.finished.set()
        return []


class HeldRecognizer(SlowRecognizer):
    """A :class:`SlowRecognizer` busy until its ``release`` is set (or 30 s)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.release = threading.Event()

    def predict(self, image, whole_image_fallback=False):
        self.started.set()
        self.release.wait(30)
        self.finished.set()
        return []


@pytest.fixture
def tiny_png() -> bytes:
    return encode(np.full((32, 32, 3), 200, np.uint8))


def test_timeout_is_504_and_frees_the_worker(tiny_png):
    from fastapi.testclient import TestClient

    slow = SlowRecognizer(delay=5.0)
    with TestClient(create_app(slow, ui=False, timeout_s=0.2)) as c:
        t0 = time.monotonic()
        error = check_error(c.post(PREDICT, files={"file": ("a.png", tiny_png)}), 504)
        assert "longer than" in error and time.monotonic() - t0 < 4  # not after the job: at its timeout
        assert slow.finished.wait(10)
        slow.delay = 0.0
        deadline = time.monotonic() + 10  # the finished thread hands its recognizer back to the event loop
        while (status := c.post(PREDICT, files={"file": ("a.png", tiny_png)}).status_code) != 200:
            assert status == 503 and time.monotonic() < deadline, status
            time.sleep(0.05)


@pytest.mark.parametrize("max_queue,queue_timeout_s", [(0, 10.0), (4, 0.2)])
def test_busy_is_503(tiny_png, max_queue, queue_timeout_s):
    from fastapi.testclient import TestClient

    slow = SlowRecognizer(delay=1.0)
    app = create_app(slow, ui=False, max_queue=max_queue, queue_timeout_s=queue_timeout_s, timeout_s=10)
    with TestClient(app) as c:
        first: list[int] = []
        t = threading.Thread(
            target=lambda: first.append(c.post(PREDICT, files={"file": ("a.png", tiny_png)}).status_code)
        )
        t.start()
        assert slow.started.wait(5)
        r = c.post(PREDICT, files={"file": ("b.png", tiny_png)})
        error = check_error(r, 503)
        assert "busy" in error and "retry-after" in r.headers
        t.join()
        assert first == [200]


def _post_in_chunks(app, chunks: list[bytes], stall_s: float) -> tuple[int, dict, float]:
    """POST ``chunks`` as a multipart body straight to the ASGI ``app``, the client stalling ``stall_s``
    seconds before the last chunk; returns the status, the JSON body and the seconds it took."""
    boundary = "ferkitboundary"
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        if len(messages) == 1:
            await anyio.sleep(stall_s)
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PREDICT,
        "raw_path": PREDICT.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    t0 = time.monotonic()
    anyio.run(app, scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), time.monotonic() - t0


def test_slow_upload_is_408(tiny_png):
    head = b'--ferkitboundary\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    chunks = [head, tiny_png, b"\r\n--ferkitboundary--\r\n"]
    app = create_app(SlowRecognizer(0), ui=False, upload_timeout_s=0.3)
    status, body, seconds = _post_in_chunks(app, chunks, stall_s=5)
    assert status == 408 and body["error"] == "upload too slow: not received within 0.3 s" and seconds < 3
    app = create_app(SlowRecognizer(0), ui=False, upload_timeout_s=3)
    status, body, _ = _post_in_chunks(app, chunks, stall_s=0.05)  # a little slow but in time, however busy the CPU
    assert status == 200 and body["faces"] == []


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_concurrency"):
        AppSettings(max_concurrency=0)
    with pytest.raises(ValueError, match="upload_timeout_s"):
        AppSettings(upload_timeout_s=0)
    with pytest.raises(ValueError, match="max_upload_mb must be a finite number of MiB, got inf"):
        AppSettings(max_upload_mb=float("inf"))  # was an OverflowError traceback from `serve --max-upload-mb inf`
    for keep in (float("inf"), 59.0):  # too short: an upload waiting in the queue, a result not yet fetched, gone
        with pytest.raises(ValueError, match=f"keep_files_s must be at least 60 seconds and finite, got {keep}"):
            AppSettings(keep_files_s=keep)
    with pytest.raises(ValueError, match="max_upload_mb 1e-30 is under one byte"):
        AppSettings(max_upload_mb=1e-30)  # a limit of 0 bytes: every upload refused
    with pytest.raises(TypeError):
        create_app(SlowRecognizer(0), no_such_option=1)


def test_an_ensemble_serves_its_mean(tmp_path):
    from fastapi.testclient import TestClient
    from helpers_inference import make_checkpoint

    from ferkit.export import export_onnx

    a = export_onnx(make_checkpoint(tmp_path / "a.pt", seed=0), tmp_path / "a.onnx")
    b = export_onnx(make_checkpoint(tmp_path / "b.pt", seed=1), tmp_path / "b.onnx")
    photo = ASSETS_DIR / "astronaut.jpg"
    with TestClient(create_app(model=[str(a), str(b)], ui=False, max_concurrency=1, threads=1)) as c:
        assert c.get("/api/v1/model").json()["name"] == "ensemble(a, b)"
        r = c.post(PREDICT, files={"file": ("astronaut.jpg", photo.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    (face,) = r.json()["faces"]
    (expected,) = EmotionRecognizer([a, b], threads=1).predict(photo)
    assert face["emotion"] == expected.emotion
    np.testing.assert_allclose(list(face["scores"].values()), list(expected.scores.values()), atol=1e-4)


def test_the_server_takes_predict_s_recognizer_options(tmp_path):
    """--tta, --margin and --min-face reach the server's recognizers: its answers equal the API's."""
    from fastapi.testclient import TestClient

    photo = ASSETS_DIR / "astronaut.jpg"
    options = dict(tta="none", margin=0.25, min_face=100)
    with TestClient(create_app(ui=False, max_concurrency=1, threads=1, **options)) as c:
        r = c.post(PREDICT, files={"file": ("astronaut.jpg", photo.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    (face,) = r.json()["faces"]
    (expected,) = EmotionRecognizer(threads=1, **options).predict(photo)
    (default,) = EmotionRecognizer(threads=1).predict(photo)
    np.testing.assert_allclose(list(face["scores"].values()), list(expected.scores.values()), atol=1e-4)
    assert np.abs(np.subtract(list(face["scores"].values()), list(default.scores.values()))).max() > 1e-3


def test_examples_are_shipped_and_small():
    files = sorted(Path(ASSETS_DIR).glob("*.jpg"))
    assert [f.name for f in files] == ["astronaut.jpg", "faces_group.jpg"]
    assert all(f.stat().st_size < 100_000 for f in files)


def test_unexpected_error_is_json_500(tiny_png):
    from fastapi.testclient import TestClient

    class Broken(SlowRecognizer):
        def predict(self, image, whole_image_fallback=False):
            raise RuntimeError("model exploded")

    with TestClient(create_app(Broken(0), ui=False), raise_server_exceptions=False) as c:
        r = c.post(PREDICT, files={"file": ("a.png", tiny_png)})
        assert "RuntimeError" in check_error(r, 500) and "exploded" not in r.text  # no internals leaked
        assert check_error(c.get("/no/such/page"), 404) == "Not Found"
        assert c.get("/healthz").status_code == 200


def test_the_api_answers_wrong_methods_and_paths_in_json_beside_the_ui():
    """With the UI mounted at /, Gradio answered GET /api/v1/predict, unknown API paths and POST /healthz with its
    own 404."""
    from fastapi.testclient import TestClient

    with TestClient(create_app(SlowRecognizer(0))) as c:
        r = c.get(PREDICT)
        assert check_error(r, 405) == "Method Not Allowed" and r.headers["allow"] == "POST"
        assert check_error(c.put("/api/v1/model"), 405) and c.put("/api/v1/model").headers["allow"] == "GET, HEAD"
        assert c.head("/api/v1/model").status_code == 200  # was 405
        assert check_error(c.get("/api/v1/nothing"), 404) == "Not Found"
        r = c.post(PREDICT + "/?fallback=true", files={"file": ("a.png", b"x")}, follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"].endswith(PREDICT + "?fallback=true")
        assert c.head("/healthz").status_code == 200
        r = c.get("/healthz/", follow_redirects=False)  # was Gradio's 404 body
        assert r.status_code == 307 and r.headers["location"].endswith("/healthz")
        r = c.post("/healthz")  # Gradio's {"detail": "Not Found"}
        assert check_error(r, 405) == "Method Not Allowed" and r.headers["allow"] == "GET, HEAD"
        assert c.get("/").status_code == 200  # the UI still answers the rest
        responses = c.get("/openapi.json").json()["paths"][PREDICT]["post"]["responses"]
    assert {"200", "400", "408", "413", "415", "422", "500", "503", "504"} <= set(responses)


def test_webcam_streams_do_not_take_the_photos_slots():
    """A stream holds its Gradio slot for its whole session (up to its 300 s time limit), idle or gone: two open
    webcams left photo requests waiting; with as many stream slots as recognizers, two clients that joined and
    left locked every webcam out for 5 minutes. Streams are not counted; the recognizers bound their work."""
    from ferkit.app import RecognizerService, build_ui

    demo = build_ui(RecognizerService.from_settings(recognizer=[SlowRecognizer(0), SlowRecognizer(0)]))
    fns = {f.api_name: f for f in demo.fns.values()}
    assert fns["predict"].concurrency_id != fns["predict_frame"].concurrency_id
    assert (fns["predict"].concurrency_limit, fns["predict_frame"].concurrency_limit) == (2, None)


def test_the_ui_keeps_uploaded_photos_only_as_long_as_the_settings_say():
    """Gradio's cache of the UI's uploads and results (photos of faces) was emptied of files an hour old."""
    from ferkit.app import RecognizerService, build_ui

    for keep, expected in ((None, (300, 600)), (90.5, (45, 91))):
        settings = AppSettings() if keep is None else AppSettings(keep_files_s=keep)
        demo = build_ui(RecognizerService.from_settings(settings, recognizer=SlowRecognizer(0)))
        assert demo.delete_cache == expected


def test_upload_limits_are_shown_without_rounding_to_zero():
    from ferkit.app import _mb

    assert [_mb(n * 2**20) for n in (0.01, 1, 2.5, 10)] == ["0.01 MiB", "1 MiB", "2.5 MiB", "10 MiB"]


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_recognizer_defaults_agree_in_the_cli_the_app_and_the_python_api(command):
    """One set of defaults: `ferkit predict/serve` flags, AppSettings and EmotionRecognizer's arguments."""
    import inspect

    from ferkit.cli import build_parser

    args = build_parser().parse_args([command])
    api = inspect.signature(EmotionRecognizer).parameters
    for name in ("detector", "margin", "tta", "min_face", "max_pixels"):
        assert getattr(args, name) == getattr(AppSettings(), name) == api[name].default, name


def test_the_ui_names_the_detector_it_runs():
    """The page said "OpenCV's Haar cascade" whatever --detector was given (a YuNet file, another cascade)."""
    import cv2
    from fastapi.testclient import TestClient

    from ferkit.app import _detector_text

    xml = cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml"
    with TestClient(create_app(detector=xml, max_concurrency=1, threads=1)) as c:
        page = c.get("/config").text
    assert "Faces are found by the Haar cascade haarcascade_frontalface_alt2.xml: faces of" in page
    assert not Path(ferkit.app.__file__).with_suffix(".pyi").exists()  # building the UI writes nothing beside it
    assert "frontal Haar" not in page
    assert _detector_text("MyDetector") == "the face detector MyDetector"  # a detector object's class
    assert _detector_text("haar") == "OpenCV's frontal Haar cascade"
    assert _detector_text("centerface") == "the CenterFace detector"
    assert (
        _detector_text("/models/face_detection_yunet_2023mar.onnx")
        == "the ONNX face detector face_detection_yunet_2023mar.onnx"
    )


def test_the_serve_banner_names_the_ui_only_when_it_is_served():
    """`serve --no-ui` printed the UI's address, where GET / answers 404."""
    from ferkit.app import banner

    for ui in (True, False):
        text = banner(create_app(ui=ui, max_concurrency=1, threads=1), "0.0.0.0", 7861)
        assert "API http://127.0.0.1:7861/api/v1/predict" in text
        assert ("UI http://127.0.0.1:7861/ " in text) == ui


def test_serve_on_a_port_in_use_is_one_error_without_a_banner(capsys):
    """The banner named the addresses, then uvicorn logged "[Errno 98] error while attempting to bind"."""
    import socket

    from ferkit.cli import main

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--no-ui", "--concurrency", "1", "--threads", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"error: cannot serve on 127.0.0.1:{port}: Address already in use" in err


def test_the_ui_reads_only_files_uploaded_to_it(tmp_path):
    """A client names the path of its image in Gradio's API: the photo input read any file on the server
    (and sent it back annotated), as a mounted Gradio app skipped Gradio's check that the file was uploaded."""
    import gradio as gr
    from fastapi.testclient import TestClient
    from gradio.data_classes import FileData

    from ferkit.app import _photo_input_class

    private = tmp_path / "private.jpg"  # outside Gradio's upload folder
    private.write_bytes((ASSETS_DIR / "faces_group.jpg").read_bytes())

    def call(c, api: str, data: list) -> str:
        event = c.post(f"/gradio_api/call/{api}", json={"data": data}).json()["event_id"]
        return c.get(f"/gradio_api/call/{api}/{event}").text

    with TestClient(create_app(max_concurrency=1, threads=1)) as c:
        for api, data in {"predict": [False], "predict_frame": []}.items():
            answer = call(c, api, [{"path": str(private), "meta": {"_type": "gradio.FileData"}}, *data])
            assert answer.startswith("event: error") and "not uploaded" in answer and "faces" not in answer
        with private.open("rb") as f:
            (uploaded,) = c.post("/gradio_api/upload", files={"files": ("p.jpg", f, "image/jpeg")}).json()
        summary = json.loads(call(c, "predict", [{"path": uploaded}, False]).split("data: ", 1)[1])[1]
        assert summary.startswith("**4 faces** in this 640×480 image")
    with pytest.raises(gr.Error, match="not uploaded to this server"):  # also where Gradio's check is off
        _photo_input_class()().preprocess(FileData(path=str(private)))
    assert not [p for p in Path(gr.utils.get_upload_folder()).rglob("private.jpg")]


def test_a_given_recognizer_is_described_by_its_own_settings():
    """create_app(recognizer) reported AppSettings' TTA, detector and smallest face, not the recognizer's."""
    from fastapi.testclient import TestClient

    rec = EmotionRecognizer(tta="none", detector="haar", min_face=100, threads=1)
    with TestClient(create_app(rec)) as c:
        assert c.get("/api/v1/model").json()["tta"] == "none"
        page = c.get("/config").text
    assert "Faces are found by OpenCV's frontal Haar cascade: faces of 100 px or more" in page
    assert "this server runs TTA none" in page


def test_a_given_recognizers_pixel_limit_is_the_servers():
    """create_app(EmotionRecognizer(max_pixels=...)) answered an image between the two limits with a 500."""
    from fastapi.testclient import TestClient

    rec = EmotionRecognizer(tta="none", max_pixels=10_000, threads=1)
    png = io.BytesIO()
    Image.new("RGB", (200, 200)).save(png, "PNG")
    with TestClient(create_app(rec)) as c:
        r = c.post("/api/v1/predict", files={"file": ("big.png", png.getvalue(), "image/png")})
    assert r.status_code == 413 and "over the limit of 10,000" in r.json()["error"]


def test_an_app_made_from_python_lets_pillow_open_what_its_limit_allows(monkeypatch):
    """Only `ferkit serve` raised Pillow's own limit (179 M pixels): the UI of create_app or build_demo given a higher
    max_pixels had Gradio refuse the uploads in between as decompression bombs."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the process-wide limit, restored
    create_app(max_pixels=300_000_000, max_concurrency=1, threads=1, ui=False)
    assert Image.MAX_IMAGE_PIXELS == 300_000_000
    create_app(EmotionRecognizer(max_pixels=400_000_000, threads=1), ui=False)  # a recognizer's own limit
    assert Image.MAX_IMAGE_PIXELS == 400_000_000


def test_the_ui_says_when_the_recorded_accuracy_was_measured_with_another_tta():
    """`serve --tta none` showed the accuracy measured with flip as the one it serves."""
    from ferkit.app import _accuracy_text

    info = {"accuracy": 0.7256, "accuracy_tta": "flip", "tta": "none"}
    assert _accuracy_text(info) == "**72.6%** (measured with TTA flip; this server runs TTA none)"
    assert _accuracy_text({**info, "tta": "flip"}) == "**72.6%**"
    assert _accuracy_text({**info, "accuracy": None}) == "**not recorded**"


def test_a_file_exactly_at_the_upload_limit_is_taken(tmp_path):
    from ferkit.app import RecognizerService, ServiceError

    s = AppSettings(max_upload_mb=0.01, max_concurrency=1)
    service = RecognizerService.from_settings(s, recognizer=SlowRecognizer(0))
    f = tmp_path / "x.jpg"
    f.write_bytes(b"0" * s.max_upload_bytes)
    with pytest.raises(ServiceError) as e:
        anyio.run(service.analyse, f)
    assert e.value.status == 415  # not an image, but not refused for its size
    f.write_bytes(b"0" * (s.max_upload_bytes + 1))
    with pytest.raises(ServiceError) as e:
        anyio.run(service.analyse, f)
    assert e.value.status == 413


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read():
    from ferkit.app import UploadLimits

    called, sent = [], []

    async def app(scope, receive, send):
        called.append(1)

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    anyio.run(UploadLimits(app, limit=10, timeout_s=5), {"type": "http", "headers": [(b"content-length", b"11")]},
              receive, send)  # fmt: skip
    assert sent[0]["status"] == 413 and not called


def test_text_is_415_not_400():
    from ferkit.app import ServiceError, decode_image

    with pytest.raises(ServiceError) as e:
        decode_image(b"hello, this is plain text and no image", 10**6)
    assert e.value.status == 415


def _gradio_call(c, api: str, data: list) -> str:
    event = c.post(f"/gradio_api/call/{api}", json={"data": data}).json()["event_id"]
    return c.get(f"/gradio_api/call/{api}/{event}").text


def test_the_ui_checks_a_data_url_image_against_the_limits_before_decoding_it(monkeypatch):
    """A webcam frame or a pasted image comes as a base64 data: URL, which Gradio decoded whole (a 180 KB PNG of
    144 M pixels took 1.5 GB and 9 s) before ferkit refused it; now the UI's photo and webcam inputs hand over
    its bytes, checked as an upload's are."""
    import base64

    import gradio as gr
    from fastapi.testclient import TestClient
    from gradio.data_classes import ImageData

    from ferkit.app import _photo_input_class

    def data_url(png: bytes) -> dict:
        return {"url": "data:image/png;base64," + base64.b64encode(png).decode(), "meta": {"_type": "gradio.FileData"}}

    bomb = png_bomb(12000, 12000)
    photo = _photo_input_class()()
    assert photo.preprocess(ImageData(**data_url(bomb))) == bomb  # not decoded
    for url, problem in (("data:image/png;base64,@@@@", "whose base64 is broken"), ("data:,x", "must be base64")):
        with pytest.raises(gr.Error, match=problem):
            photo.preprocess(ImageData(url=url))
    with pytest.raises(gr.Error, match="not uploaded to this server"):
        photo.preprocess(ImageData(url="https://example.com/a.jpg"))  # no path, and not a data: URL

    def gradio_decodes(*args):
        raise RuntimeError("Gradio decoded the image")

    monkeypatch.setattr(gr.image_utils, "preprocess_image", gradio_decodes)
    with TestClient(create_app(max_concurrency=1, threads=1, max_pixels=10**6)) as c:
        answer = _gradio_call(c, "predict", [data_url(bomb), False])
        assert "144,000,000 pixels, over the limit of 1,000,000" in answer
    blocks = ferkit.app.build_demo(max_concurrency=1, threads=1).blocks.values()
    cam = next(b for b in blocks if b.elem_id == "ferkit-cam")
    assert type(cam) is _photo_input_class() and cam.streaming  # the webcam's frames too


def test_the_ui_queue_is_bounded_as_the_apis_is():
    """Gradio's queue had no bound: photos past the recognizers waited there, out of --queue's reach (120 queued
    13 MiB data: URLs took a server from 1.3 to 4.6 GB). At most --queue jobs wait there, as in the API's."""
    import base64

    from fastapi.testclient import TestClient

    url = "data:image/png;base64," + base64.b64encode(encode(np.full((32, 32, 3), 200, np.uint8))).decode()
    photo = [{"url": url, "path": None, "meta": {"_type": "gradio.FileData"}}, False]
    held = HeldRecognizer()  # busy until all six are sent (a 0.5 s job ended first on a loaded CPU: a third ran)
    with TestClient(create_app([held], AppSettings(max_queue=1, max_concurrency=1))) as c:
        answers = [c.post("/gradio_api/call/predict", json={"data": photo}) for _ in range(6)]
        held.release.set()
    assert [r.status_code for r in answers].count(503) >= 4  # one runs, one waits
    assert all("Queue is full" in r.text for r in answers if r.status_code == 503)


def test_the_ui_fetches_no_url_a_client_names():
    """A photo given as an http(s) URL was downloaded by Gradio, whatever its size, before ferkit saw it, and
    kept an hour: the server fetched what any client named."""
    from fastapi.testclient import TestClient

    with TestClient(create_app(max_concurrency=1, threads=1)) as c:
        url = {"path": "http://example.com/huge.png", "meta": {"_type": "gradio.FileData"}}
        answer = _gradio_call(c, "predict", [url, False])
    assert "images are uploaded to this server, not fetched from URLs" in answer


def test_the_space_limits_request_bodies_as_serve_does():
    """`python app.py` (the Hugging Face Space) had Gradio's limit on uploaded files only: one JSON body of a
    1 GB data: URL took its process to 6 GB. launch_options gives it serve's body limit and upload timeout."""
    import gradio as gr
    from fastapi.testclient import TestClient

    from ferkit.app import build_demo, launch_options

    settings = AppSettings(max_upload_mb=1, max_concurrency=1, threads=1)
    options = launch_options(settings)
    app = gr.routes.App.create_app(build_demo(settings), app_kwargs=options["app_kwargs"])
    with TestClient(app) as c:
        r = c.post("/gradio_api/call/predict", content=b"{" + b" " * (2 * 2**20) + b"}",
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 413 and "over the limit of 1 MiB" in r.text


def test_the_ui_says_when_an_upload_is_gone(tmp_path):
    """Gradio deletes uploads (after --keep-files): a page left open answered "[Errno 2] No such file or directory:
    '/tmp/gradio/...'" (a server path) when its checkbox was ticked."""
    from fastapi.testclient import TestClient

    with TestClient(create_app(max_concurrency=1, threads=1)) as c:
        with (ASSETS_DIR / "faces_group.jpg").open("rb") as f:
            (uploaded,) = c.post("/gradio_api/upload", files={"files": ("p.jpg", f, "image/jpeg")}).json()
        Path(uploaded).unlink()
        for path in (uploaded, str(Path(uploaded).parent)):  # gone, or a folder
            summary = json.loads(_gradio_call(c, "predict", [{"path": path}, True]).split("data: ", 1)[1])[1]
            assert summary == "⚠️ **That upload is no longer on the server: upload the image again**"
        answer = json.loads(_gradio_call(c, "predict", [None, False]).split("data: ", 1)[1])  # the button, no photo
        assert answer[:2] == [None, "Upload a photo, take one with the webcam, paste one, or click an example."]


def test_openapi_operation_ids_are_unique_and_a_text_field_is_not_a_file(client):
    """GET and HEAD /healthz shared one operationId (an invalid schema, a warning at each fetch); a text field
    named file was "Value error, Expected UploadFile, received: <class 'str'>"."""
    ids = [op["operationId"] for ops in client.get("/openapi.json").json()["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert client.head("/healthz").status_code == 200
    for form in ({"data": {"file": "abc"}}, {"files": {"file": (None, "photo bytes as text")}}):
        error = check_error(client.post(PREDICT, **form), 422)
        assert error == "invalid request: file: a text field, not a file (send it as curl -F file=@photo.jpg)"


def test_the_space_alone_does_not_point_to_an_api_it_does_not_serve():
    from ferkit.app import build_demo

    demo = build_demo(max_concurrency=1, threads=1)
    text = " ".join(str(b.value) for b in demo.blocks.values() if type(b).__name__ == "Markdown")
    assert "This page serves the UI alone. `ferkit serve` serves it together with a JSON API" in text
    assert "[/docs](/docs)" not in text


def test_the_summary_says_first_what_the_face_panels_leave_out():
    """ "Scores are shown for the first 6 faces." came after a table of every face, out of sight; the whole image
    of a fallback was a panel titled "Face 1"."""
    from ferkit.app import MAX_FACE_PANELS, Analysis, _face_name, _summary

    faces = [FaceResult((i * 60, 0, 50, 50), "happy", 0.9, {}) for i in range(MAX_FACE_PANELS + 2)]
    text = _summary(Analysis(faces=faces, width=600, height=50, elapsed_ms=12.0, annotated=None))
    head, table = text.split("\n\n", 1)
    assert f"faces {MAX_FACE_PANELS + 1}–{MAX_FACE_PANELS + 2}: the top emotion in the table (all: the API tab)" in head
    assert table.count("| happy |") == MAX_FACE_PANELS + 2
    whole = FaceResult((0, 0, 600, 50), "neutral", 0.4, {}, whole_image=True)
    assert (_face_name(whole, 1), _face_name(faces[0], 1)) == ("Whole image", "Face 1")


def test_the_summary_of_seven_faces_names_the_seventh_and_the_space_s_api():
    from ferkit.app import MAX_FACE_PANELS, Analysis, _summary

    faces = [FaceResult((i * 60, 0, 50, 50), "happy", 0.9, {}) for i in range(MAX_FACE_PANELS + 1)]
    text = _summary(Analysis(faces=faces, width=600, height=50, elapsed_ms=12.0), rest_api=False)
    assert f"; face {MAX_FACE_PANELS + 1}: the top emotion" in text and "the JSON API of `ferkit serve`" in text
