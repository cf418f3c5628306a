"""ferkit's web app: a JSON API and a Gradio UI in one FastAPI app, both running the same recognizers.

    ferkit serve                       # http://127.0.0.1:7860: UI at /, POST /api/v1/predict, /docs, /healthz
    curl -F file=@photo.jpg http://127.0.0.1:7860/api/v1/predict

:func:`create_app` builds the whole app; :func:`build_demo` the UI alone (the Hugging Face Space entry
point, see ``app.py`` at the project root). Inference runs in worker threads, at most
``max_concurrency`` at a time, each on its own :class:`~ferkit.inference.EmotionRecognizer` with its share of
the CPU threads (a shared one would detect faces one image at a time with OpenCV's detectors, which are not
thread-safe). Every error is answered as
``{"error": "..."}``: 400 corrupt image, 408 upload not received in time, 413 upload or image too large,
415 not an image, 422 no file part (or several), 500 unexpected, 503 busy, 504 timed out.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .config import HOST, MIB, PORT, AppSettings
from .images import let_pillow_open
from .inference import (
    EmotionRecognizer,
    FaceResult,
    ImageError,
    ImageTooLargeError,
    NotAnImageError,
    annotate,
    load_image,
)

log = logging.getLogger("ferkit.app")

ASSETS_DIR = Path(__file__).parent / "assets"
EXAMPLES = {"four faces": ASSETS_DIR / "faces_group.jpg", "astronaut": ASSETS_DIR / "astronaut.jpg"}  # label: photo
MAX_FACE_PANELS = 6  # score panels shown in the UI; the summary table lists every face
STREAM_SECONDS = 300  # a webcam stream's longest session (Gradio's time_limit)
T = TypeVar("T")


class ServiceError(Exception):
    """A request the app refuses or cannot serve: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _mb(n: float) -> str:
    return f"{n / MIB:.3g} MiB"


def decode_image(src: bytes | np.ndarray, max_pixels: int) -> np.ndarray:
    """:func:`~ferkit.inference.load_image` with HTTP statuses: 413 over ``max_pixels`` (checked from the
    header, before decoding), 415 not an image, 400 empty, corrupt or truncated."""
    if isinstance(src, bytes) and not src:
        raise ServiceError(400, "empty upload: no image data")
    try:
        return load_image(src, max_pixels)
    except ImageTooLargeError as e:
        raise ServiceError(413, str(e)) from None
    except NotAnImageError as e:
        raise ServiceError(415, str(e)) from None
    except ImageError as e:
        raise ServiceError(400, str(e)) from None


@dataclass
class Analysis:
    """The result of one image: faces, image size, server time and (for the UI) the annotated image."""

    faces: list[FaceResult]
    width: int
    height: int
    elapsed_ms: float
    annotated: np.ndarray | None = None


class RecognizerService:
    """The recognizers behind the API and the UI: bounded concurrency, a bounded queue and timeouts.

    Each recognizer serves one image at a time. Work runs in worker threads; a request that waits longer
    than ``queue_timeout_s`` for a recognizer gets 503, one whose inference takes longer than
    ``timeout_s`` gets 504 (the thread cannot be stopped: its recognizer returns to the pool when it ends,
    so a timed-out request never lets more than ``max_concurrency`` inferences run)."""

    def __init__(self, recognizers: Sequence[EmotionRecognizer], settings: AppSettings | None = None) -> None:
        if not recognizers:
            raise ValueError("RecognizerService needs at least one recognizer")
        self.recognizers = list(recognizers)
        self.settings = settings or AppSettings()
        let_pillow_open(self.settings.max_pixels)  # Gradio decodes the UI's uploads with Pillow, before ferkit does
        self._free = list(self.recognizers)
        self._slots: anyio.Semaphore | None = None  # created in the event loop on first use
        self._waiting = 0

    @classmethod
    def from_settings(
        cls,
        settings: AppSettings | None = None,
        recognizer: EmotionRecognizer | Sequence[EmotionRecognizer] | None = None,
    ) -> RecognizerService:
        """``max_concurrency`` recognizers of ``settings.model``, or the given recognizer(s) (one slot each),
        whose own TTA, detector, margin, smallest face and pixel limit then replace those of ``settings``."""
        settings = settings or AppSettings()
        if recognizer is not None:
            recs = list(recognizer) if isinstance(recognizer, (list, tuple)) else [recognizer]
            r = recs[0]
            own = {
                "tta": r.tta,
                "detector": r.detector_name,
                "margin": r.margin,
                "min_face": r.min_face,
                "max_pixels": r.max_pixels,
            }
            return cls(recs, dataclasses.replace(settings, **own))
        threads = settings.threads or max(1, (os.cpu_count() or 1) // settings.max_concurrency)
        recs = [
            EmotionRecognizer(
                settings.model,
                detector=settings.detector,
                margin=settings.margin,
                max_pixels=settings.max_pixels,
                threads=threads,
                tta=settings.tta,
                min_face=settings.min_face,
            )
            for _ in range(settings.max_concurrency)
        ]
        return cls(recs, settings)

    @property
    def model_info(self) -> dict[str, Any]:
        """Name, classes, accuracy (and the TTA it was measured with), backend and the TTA this server runs (not
        the model's file path)."""
        info = self.recognizers[0].model_info
        keys = ("name", "classes", "accuracy", "accuracy_tta", "backend")
        return {k: info.get(k) for k in keys} | {"tta": self.settings.tta}

    def _release(self, rec: EmotionRecognizer) -> None:
        self._free.append(rec)
        assert self._slots is not None
        self._slots.release()

    async def run(self, job: Callable[[EmotionRecognizer], T]) -> T:
        """Run ``job(recognizer)`` in a worker thread once a recognizer is free."""
        s = self.settings
        if self._slots is None:
            self._slots = anyio.Semaphore(len(self.recognizers))
        if self._slots.value == 0 and self._waiting >= s.max_queue:
            waiting = f"{self._waiting} request{'s' * (self._waiting != 1)}"
            raise ServiceError(503, f"server busy: {waiting} already waiting", {"Retry-After": "1"})
        self._waiting += 1
        try:
            with anyio.move_on_after(s.queue_timeout_s) as scope:
                await self._slots.acquire()
        finally:
            self._waiting -= 1
        if scope.cancelled_caught:
            raise ServiceError(503, f"server busy: no free worker within {s.queue_timeout_s:g} s", {"Retry-After": "2"})
        rec = self._free.pop()
        token = anyio.lowlevel.current_token()
        lock, state = threading.Lock(), {"started": False, "given_up": False}

        def work() -> T:
            with lock:
                if state["given_up"]:  # timed out before this thread started: the caller released the slot
                    raise RuntimeError("abandoned")
                state["started"] = True
            try:
                return job(rec)
            finally:
                with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop has stopped (shutdown)
                    anyio.from_thread.run_sync(self._release, rec, token=token)

        try:
            with anyio.fail_after(s.timeout_s):
                return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except TimeoutError:
            raise ServiceError(504, f"inference took longer than {s.timeout_s:g} s") from None
        finally:
            with lock:
                if not state["started"]:  # cancelled or timed out before the thread began
                    state["given_up"] = True
                    self._release(rec)

    async def analyse(
        self, image: bytes | np.ndarray | str | Path, fallback: bool = False, annotated: bool = False
    ) -> Analysis:
        """Decode ``image`` (bytes, an RGB/gray array, or a file path), find and classify every face;
        ``fallback`` classifies the whole image when no face is found; ``annotated`` also draws them."""
        t0 = time.perf_counter()
        limit = self.settings.max_upload_bytes

        def job(rec: EmotionRecognizer) -> tuple[tuple[int, ...], list[FaceResult], np.ndarray | None]:
            data = image
            if isinstance(data, (str, Path)):  # an upload of the UI's: deleted after settings.keep_files_s
                try:
                    size = os.path.getsize(data)
                    if size > limit:
                        raise ServiceError(413, f"file is {_mb(size)}, over the upload limit of {_mb(limit)}")
                    data = Path(data).read_bytes()
                except OSError:
                    raise ServiceError(400, "that upload is no longer on the server: upload the image again") from None
            elif isinstance(data, bytes) and len(data) > limit:
                raise ServiceError(413, f"image is {_mb(len(data))}, over the upload limit of {_mb(limit)}")
            rgb = decode_image(data, self.settings.max_pixels)
            faces = rec.predict(rgb, whole_image_fallback=fallback)
            return rgb.shape, faces, annotate(rgb, faces, numbered=True) if annotated else None

        shape, faces, picture = await self.run(job)
        return Analysis(faces, shape[1], shape[0], (time.perf_counter() - t0) * 1000, picture)


# --------------------------------------------------------------------------------------------- the API


class Face(BaseModel):
    box: list[int] = Field(
        description="x, y, width, height in the original image's pixels", examples=[[177, 66, 95, 95]]
    )
    emotion: str = Field(description="the most probable class", examples=["happy"])
    confidence: float = Field(description="probability of that class", examples=[0.96])
    scores: dict[str, float] = Field(description="probability of each of the 7 classes (they sum to 1)")
    whole_image: bool = Field(
        description="true when no face was found and the whole image was classified as one (fallback=true)"
    )


class Prediction(BaseModel):
    faces: list[Face] = Field(description="every face found, left to right; empty when none is found")
    width: int = Field(description="image width in pixels (after EXIF rotation)")
    height: int = Field(description="image height in pixels (after EXIF rotation)")
    model: str = Field(description="name of the model that scored the faces")
    elapsed_ms: float = Field(description="server time from the upload received to the answer")


class ErrorBody(BaseModel):
    error: str


class Health(BaseModel):
    status: str
    version: str
    model: str


class ModelInfo(BaseModel):
    name: str
    classes: list[str]
    accuracy: float | None = Field(description="PrivateTest accuracy recorded with the model, if any")
    accuracy_tta: str | None = Field(description="the test-time augmentation that accuracy was measured with")
    backend: str
    tta: str = Field(description="the test-time augmentation this server runs: none, flip or crops (ten-crop)")


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "empty, corrupt or truncated image"},
    408: {"model": ErrorBody, "description": "upload not received within the upload timeout"},
    413: {"model": ErrorBody, "description": "upload too large, or image has too many pixels"},
    415: {"model": ErrorBody, "description": "not an image file"},
    422: {"model": ErrorBody, "description": "no `file` part in the form, several, or a bad query parameter"},
    500: {"model": ErrorBody, "description": "unexpected server error"},
    503: {"model": ErrorBody, "description": "server busy: retry later"},
    504: {"model": ErrorBody, "description": "inference timed out"},
}


class UploadLimits:
    """Refuse request bodies over ``limit`` bytes with 413 (at once when Content-Length says so, else
    while reading: chunked uploads or a wrong Content-Length), and bodies still incomplete after
    ``timeout_s`` seconds with 408, so that slow clients cannot hold connections open."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float, shown_limit: int | None = None) -> None:
        self.app, self.limit, self.timeout_s, self.shown_limit = app, limit, timeout_s, shown_limit or limit

    def _too_large(self) -> _UploadRefused:
        return _UploadRefused(413, f"upload too large: over the limit of {_mb(self.shown_limit)}")

    async def _refuse(self, send: Send, e: _UploadRefused) -> None:
        response = JSONResponse({"error": e.detail}, status_code=e.status_code, headers={"Connection": "close"})
        await response({"type": "http"}, _no_receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._refuse(send, self._too_large())
        received, complete, started = 0, False, False
        deadline = anyio.current_time() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body: waiting for a disconnect is not an upload
                return await receive()
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    message = await receive()
            except TimeoutError:
                raise _UploadRefused(408, f"upload too slow: not received within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._too_large()
                complete = not message.get("more_body", False)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _UploadRefused as e:
            if not started:
                await self._refuse(send, e)


class _UploadRefused(StarletteHTTPException):
    """Raised while reading an over-long or too slow body; an HTTPException so that form parsing passes
    it through."""


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _upload_limits(settings: AppSettings) -> dict[str, Any]:
    """:class:`UploadLimits`' options for ``settings``: bodies may exceed the image by multipart headers, or by
    base64 in the UI's JSON (webcam frames); predict() checks the uploaded file itself against max_upload_bytes."""
    limit = settings.max_upload_bytes * 4 // 3 + 64 * 1024
    return {"limit": limit, "timeout_s": settings.upload_timeout_s, "shown_limit": settings.max_upload_bytes}


def create_app(
    recognizer: EmotionRecognizer | Sequence[EmotionRecognizer] | None = None,
    settings: AppSettings | None = None,
    **options: Any,
) -> FastAPI:
    """The web app: ``POST /api/v1/predict``, ``GET /api/v1/model``, ``GET /healthz``, ``/docs`` and (unless
    ``ui=False``) the Gradio UI at ``/``.

    ``recognizer``: one recognizer (then one inference at a time) or several; by default
    ``max_concurrency`` recognizers of ``model``. ``options`` override fields of ``settings``
    (:class:`AppSettings`), e.g. ``create_app(max_upload_mb=5, max_pixels=10_000_000)``."""
    settings = dataclasses.replace(settings or AppSettings(), **options)
    service = RecognizerService.from_settings(settings, recognizer)
    info = service.model_info
    app = FastAPI(
        title="ferkit",
        version=__version__,
        description="Facial expression recognition: find every face in a photo and score 7 emotions "
        f"({', '.join(info['classes'])}). Model: {info['name']}.",
    )
    app.state.service, app.state.settings = service, service.settings
    app.add_middleware(UploadLimits, **_upload_limits(settings))

    _handle_errors(app)
    _add_api(app, service)
    return _mount_ui(app, service) if settings.ui else app


def _handle_errors(app: FastAPI) -> None:
    """Every error answered in the API's JSON body (:class:`ErrorBody`)."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError) -> JSONResponse:
        return _error(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if isinstance(e, _UploadRefused):
            return _error(e.status_code, str(e.detail), {"Connection": "close"})
        return _error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'request'}: {err['msg']}" for err in errors)
        file_errors = [err for err in errors if tuple(err["loc"][:2]) == ("body", "file")]
        if any("UploadFile" in err["msg"] for err in file_errors):  # curl -F 'file=<photo.jpg', -d file=...
            return _error(422, "invalid request: file: a text field, not a file (send it as curl -F file=@photo.jpg)")
        hint = " (send the image as multipart field 'file')" if file_errors else ""
        return _error(422, f"invalid request: {problems}{hint}")

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, f"internal server error ({type(e).__name__})")


def _add_api(app: FastAPI, service: RecognizerService) -> None:
    """The REST API's routes, and its JSON answer to unknown paths and methods."""
    settings, info = service.settings, service.model_info

    @app.post(
        "/api/v1/predict",
        response_model=Prediction,
        responses=ERRORS,
        tags=["api"],
        summary="Find every face in an image and score its emotions",
    )
    async def predict(
        request: Request,
        file: UploadFile = File(description="the image: JPEG, PNG, WebP, BMP, GIF or TIFF"),
        fallback: bool = Query(False, description="when no face is found, classify the whole image as one face"),
    ) -> dict[str, Any]:
        if (parts := len((await request.form()).getlist("file"))) > 1:  # the form FastAPI has already parsed
            raise ServiceError(422, f"send one image per request: got {parts} 'file' parts")
        data = await file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ServiceError(413, f"upload too large: over the limit of {_mb(settings.max_upload_bytes)}")
        a = await service.analyse(data, fallback=fallback)
        return {
            "faces": [f.to_dict() for f in a.faces],
            "width": a.width,
            "height": a.height,
            "model": info["name"],
            "elapsed_ms": round(a.elapsed_ms, 2),
        }

    @app.get("/api/v1/model", response_model=ModelInfo, tags=["api"], summary="The model behind the API")
    @app.head("/api/v1/model", include_in_schema=False)
    async def model() -> dict[str, Any]:
        return info

    @app.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness check")
    @app.head("/healthz", include_in_schema=False)  # one route for both gave the schema one operationId twice
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "model": info["name"]}

    @app.api_route("/api/{rest:path}", methods=list(METHODS), include_in_schema=False)
    @app.api_route("/healthz", methods=sorted(set(METHODS) - {"GET", "HEAD"}), include_in_schema=False)
    @app.api_route("/healthz/", methods=list(METHODS), include_in_schema=False)
    async def no_route(request: Request, rest: str = "") -> Response:
        """The API's answer to an unknown path or method, in its JSON (the UI mounted at / would answer 404
        with its own body)."""
        routes = [r for r in request.app.routes if isinstance(r, APIRoute) and r.endpoint is not no_route]
        if allowed := sorted({m for r in routes if r.matches(request.scope)[0] == Match.PARTIAL for m in r.methods}):
            return _error(405, "Method Not Allowed", {"Allow": ", ".join(allowed)})
        path = request.url.path
        bare = {**request.scope, "path": request.scope["path"].rstrip("/")}
        if path.endswith("/") and any(r.matches(bare)[0] != Match.NONE for r in routes):
            return RedirectResponse(str(request.url.replace(path=path.rstrip("/"))), status_code=307)  # query kept
        return _error(404, "Not Found")


def _mount_ui(app: FastAPI, service: RecognizerService) -> FastAPI:
    """The app with the Gradio UI mounted at ``/``."""
    import gradio as gr

    demo = build_ui(service)
    app = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        allowed_paths=[str(ASSETS_DIR)],
        show_error=True,
        max_file_size=service.settings.max_upload_bytes,
        footer_links=["gradio", "settings"],  # not Gradio's "Use via API": the API tab documents ferkit's own
    )
    # Gradio refuses a client's file path that it did not receive as an upload only once the demo has
    # "launched", which a mounted demo never does: without this, a request naming /etc/passwd had it copied
    demo.has_launched = True
    return app


def banner(app: FastAPI, host: str, port: int) -> str:
    """What ``ferkit serve`` prints: the model and the addresses it answers on (the UI's only when mounted)."""
    where = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    ui = f"UI {where}/  " if app.state.service.settings.ui else ""
    return (
        f"ferkit {__version__}: model {app.state.service.model_info['name']}; "
        f"{ui}API {where}/api/v1/predict  docs {where}/docs"
    )


def serve(settings: AppSettings | None = None, host: str = HOST, port: int = PORT, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted (``ferkit serve``), on a socket bound before the banner
    names it (a port in use is an error of ours, not a banner and then uvicorn's)."""
    import uvicorn

    app = create_app(settings=settings)
    with _listen(host, port) as sock:
        print(banner(app, host, port), flush=True)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
        uvicorn.Server(config).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host``:``port``, or an OSError that names them and why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as e:
        raise OSError(f"cannot serve on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    return sock


# ---------------------------------------------------------------------------------------------- the UI


def _accuracy_text(info: dict[str, Any]) -> str:
    """The model's recorded accuracy, with the TTA it was measured with where this server runs another."""
    if info["accuracy"] is None:
        return "**not recorded**"
    text = f"**{info['accuracy']:.1%}**"
    if info["accuracy_tta"] and info["accuracy_tta"] != info["tta"]:
        text += f" (measured with TTA {info['accuracy_tta']}; this server runs TTA {info['tta']})"
    return text


def _detector_text(detector: str) -> str:
    """The face detector in the UI's words: the shipped CenterFace, OpenCV's frontal Haar cascade, another
    cascade, or an ONNX file (CenterFace or YuNet)."""
    if detector == "centerface":
        return "the CenterFace detector"
    if detector == "haar":
        return "OpenCV's frontal Haar cascade"
    name, suffix = Path(detector).name, Path(detector).suffix
    return {".onnx": f"the ONNX face detector {name}", ".xml": f"the Haar cascade {name}"}.get(
        suffix, f"the face detector {detector}"
    )


NO_PHOTO = "Upload a photo, take one with the webcam, paste one, or click an example."


def _face_name(face: FaceResult, i: int) -> str:
    """How the UI names a face: by its number, as drawn on its box; a fallback's is the whole image."""
    return "Whole image" if face.whole_image else f"Face {i}"


def _summary(a: Analysis, rest_api: bool = True) -> str:
    if not a.faces:
        return (
            f"**No face found** in this {a.width}×{a.height} image ({a.elapsed_ms:.0f} ms). Try a larger, "
            "frontal face, or tick *classify the whole image*."
        )
    n = len(a.faces)
    head = f"**{n} face{'s' * (n != 1)}** in this {a.width}×{a.height} image ({a.elapsed_ms:.0f} ms)"
    if a.faces[0].whole_image:
        head = f"No face found: **the whole {a.width}×{a.height} image** classified as one face ({a.elapsed_ms:.0f} ms)"
    rows = ["| face | emotion | confidence | box (x, y, w, h) |", "|---:|---|---:|---|"]
    rows += [
        f"| {i} | {f.emotion} | {f.confidence:.0%} | {', '.join(map(str, f.box))} |" for i, f in enumerate(a.faces, 1)
    ]
    if n > MAX_FACE_PANELS:  # said before the table, whose length hid it
        rest = f"face {n}" if n == MAX_FACE_PANELS + 1 else f"faces {MAX_FACE_PANELS + 1}–{n}"
        api = "the API tab" if rest_api else "the JSON API of `ferkit serve`"
        head += f". Below: the 7 scores of faces 1–{MAX_FACE_PANELS}; {rest}: the top emotion in the table (all: {api})"
    return head + "\n\n" + "\n".join(rows)


def _data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URL (``data:image/png;base64,...``)."""
    head, _, body = url.partition(",")
    if not head.endswith(";base64"):
        raise ValueError("an image sent as a data: URL must be base64")
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error:
        raise ValueError("an image sent as a data: URL whose base64 is broken") from None


@functools.cache
def _photo_input_class() -> type:
    """A ``gr.Image`` that hands ferkit the uploaded file, or the bytes of a ``data:`` URL (a webcam frame, a
    pasted image), undecoded: Gradio's own decoding failed first on a non-image, a corrupt or a huge file, and
    showed its internal error (with server paths) where the REST API names the problem, and it decoded a
    ``data:`` image whole before ferkit's pixel limit was checked from its header. A subclass, as Gradio
    rebuilds components from their class; made with Gradio's stub writer switched off, or it would write a
    .pyi file beside this module."""
    import gradio as gr
    import gradio.component_meta
    from gradio.utils import get_upload_folder, is_in_or_equal

    def preprocess(self: Any, payload: Any) -> str | bytes | None:
        if payload is None:
            return None
        if (payload.url or "").startswith("data:"):  # a webcam frame or a pasted image: Gradio decoded it whole
            try:
                return _data_url_bytes(payload.url)
            except ValueError as e:
                raise gr.Error(str(e)) from None
        if not payload.path or not is_in_or_equal(payload.path, get_upload_folder()):  # a client names the path
            raise gr.Error("that file was not uploaded to this server")
        return payload.path

    async def async_move_resource_to_block_cache(self: Any, url_or_file_path: Any) -> str | None:
        # Gradio downloads a client's http(s) URL here, before preprocess, whatever its size, and keeps it an
        # hour: the server fetching what any client names
        if isinstance(url_or_file_path, str) and url_or_file_path.lower().startswith(("http://", "https://")):
            raise gr.Error("images are uploaded to this server, not fetched from URLs")
        return await gr.Image.async_move_resource_to_block_cache(self, url_or_file_path)

    meta = gradio.component_meta
    write_stub = getattr(meta, "create_or_modify_pyi", None)
    meta.create_or_modify_pyi = lambda *args: None
    try:
        own = {"preprocess": preprocess, "async_move_resource_to_block_cache": async_move_resource_to_block_cache}
        return type("PhotoInput", (gr.Image,), {"is_template": True, **own})  # drawn as gr.Image
    finally:
        if write_stub is None:
            del meta.create_or_modify_pyi
        else:
            meta.create_or_modify_pyi = write_stub


def build_ui(service: RecognizerService, rest_api: bool = True) -> Any:
    """The Gradio UI (a ``gr.Blocks``) on ``service``: photo upload, webcam snapshot or live stream,
    examples; the annotated image and the 7 scores of each face; ``rest_api``: served beside the JSON API
    (``ferkit serve``), which its API tab then documents."""
    import gradio as gr

    with gr.Blocks(
        title="ferkit: facial expression recognition",
        analytics_enabled=False,
        delete_cache=_delete_cache(service.settings.keep_files_s),
    ) as demo:
        gr.Markdown(_header(service), elem_id="ferkit-header")
        with gr.Tab("Photo"):
            _photo_tab(gr, service, rest_api)
        with gr.Tab("Webcam (live)"):
            _webcam_tab(gr, service)
        with gr.Tab("API"):
            gr.Markdown(_api_help(service.settings, rest_api))
    # Gradio's queue has no bound of its own: photos past the recognizers waited there, out of --queue's reach
    # (120 queued 13 MiB data: URLs held 3.4 GB). It counts the jobs not yet started: --queue of them (at least
    # one, the moment between a job's arrival and its start)
    demo.queue(max_size=max(1, service.settings.max_queue))
    return demo


def _delete_cache(keep_s: float) -> tuple[int, int]:
    """Gradio's ``delete_cache``: every (at most) half of ``keep_s``, delete the UI's files older than ``keep_s``
    (ferkit kept them an hour)."""
    keep = max(1, math.ceil(keep_s))
    return max(1, keep // 2), keep


def _header(service: RecognizerService) -> str:
    """The page's title and what it runs: the model, its accuracy, the face detector."""
    info, s = service.model_info, service.settings
    return (
        "# ferkit: facial expression recognition\n"
        f"Finds every face in a photo and scores 7 emotions ({', '.join(info['classes'])}). "
        f"Model **{info['name']}** ({info['backend']}), FER-2013 PrivateTest accuracy "
        f"{_accuracy_text(info)}. Faces are found by {_detector_text(s.detector)}: faces "
        f"of {s.min_face} px or more."
    )


def _api_help(s: AppSettings, rest_api: bool) -> str:
    """The API tab: how to call the JSON API served beside the UI, or where to get one."""
    if not rest_api:
        return (
            "This page serves the UI alone. `ferkit serve` serves it together with a JSON API "
            "(`POST /api/v1/predict` with the image as multipart field `file`) and its documentation at `/docs`."
        )
    return (
        "The same model answers HTTP requests:\n\n"
        "```bash\nSERVER=http://127.0.0.1:7860  # this page's address, as the browser shows it\n"
        'curl -F file=@photo.jpg "${SERVER%/}/api/v1/predict"\n'
        'curl -F file=@photo.jpg "${SERVER%/}/api/v1/predict?fallback=true"  # no face: the whole image\n```\n\n'
        "Answer: `{faces: [{box, emotion, confidence, scores, whole_image}], width, height, model, elapsed_ms}`. "
        f"Limits: uploads up to {s.max_upload_mb:g} MiB, images up to {s.max_pixels:,} pixels. "
        "Interactive documentation: [/docs](/docs) (its page loads Swagger UI from a CDN)."
    )


def _photo_tab(gr: Any, service: RecognizerService, rest_api: bool) -> None:
    """A photo (upload, webcam snapshot, clipboard or an example) in; the annotated image, a summary and a
    panel of scores per face out."""
    n_classes = len(service.model_info["classes"])
    examples = {label: path for label, path in EXAMPLES.items() if path.is_file()}
    panels_off = [gr.update(visible=False, value=None) for _ in range(MAX_FACE_PANELS)]

    async def on_photo(path: str | bytes | None, fallback: bool) -> list[Any]:
        if not path:  # the photo removed, or the button clicked without one
            return [None, NO_PHOTO, *panels_off]
        try:
            a = await service.analyse(path, fallback=fallback, annotated=True)
        except ServiceError as e:  # said where the result goes, and kept there (a toast vanishes)
            return [None, f"⚠️ **{e.message[:1].upper() + e.message[1:]}**", *panels_off]
        shown = [
            gr.update(visible=True, value=dict(f.scores), label=f"{_face_name(f, i)}: {f.emotion} {f.confidence:.0%}")
            for i, f in enumerate(a.faces[:MAX_FACE_PANELS], 1)
        ]
        return [a.annotated, _summary(a, rest_api), *shown, *panels_off[len(shown) :]]

    with gr.Row():
        with gr.Column():
            photo = _photo_input_class()(
                label="Photo",
                type="filepath",
                image_mode=None,
                height=420,
                sources=["upload", "webcam", "clipboard"],
                elem_id="ferkit-photo",
            )
            fallback = gr.Checkbox(label="If no face is found, classify the whole image", value=False)
            button = gr.Button("Detect emotions", variant="primary")
            gr.Examples(
                [[str(p)] for p in examples.values()],
                inputs=photo,
                label="Examples: click one",
                example_labels=list(examples),
            )
        with gr.Column():
            result = gr.Image(
                label="Faces found",
                type="numpy",
                interactive=False,
                height=420,
                format="jpeg",
                buttons=["download", "fullscreen"],  # not "share": it works on Hugging Face Spaces only
                elem_id="ferkit-result",
            )
            summary = gr.Markdown(elem_id="ferkit-summary")
    with gr.Row(equal_height=True):
        panels = [
            gr.Label(
                num_top_classes=n_classes,
                visible=False,
                label=f"Face {i}",
                elem_id=f"ferkit-face-{i}",
                min_width=160,  # six in a row at 1280 px (200: five, then one stretched across)
            )
            for i in range(1, MAX_FACE_PANELS + 1)
        ]
    gr.on(
        [photo.change, fallback.change, button.click],
        on_photo,
        inputs=[photo, fallback],
        outputs=[result, summary, *panels],
        api_name="predict",
        scroll_to_output=True,  # on a phone the result is below the photo, out of sight
        concurrency_limit=service.settings.max_concurrency,
        concurrency_id="ferkit",
    )


def _webcam_tab(gr: Any, service: RecognizerService) -> None:
    """The camera streamed, about two frames a second: each annotated, and the largest face's scores."""

    async def on_frame(frame: str | bytes | None) -> tuple[Any, Any]:
        if frame is None:
            return None, None
        try:
            a = await service.analyse(frame, annotated=True)
        except ServiceError:
            return gr.skip(), gr.skip()  # busy or a bad frame: keep showing the last result
        if not a.faces:
            return a.annotated, None
        face = max(a.faces, key=lambda f: f.box[2] * f.box[3])
        return a.annotated, gr.update(value=dict(face.scores), label=f"Largest face: {face.emotion}")

    gr.Markdown(
        "Allow the browser to use your camera; frames are analysed about twice a second, for up to "
        f"{STREAM_SECONDS // 60} minutes a stream (start it again to go on)."
    )
    with gr.Row():
        cam = _photo_input_class()(label="Webcam", sources=["webcam"], streaming=True, height=360, elem_id="ferkit-cam")
        cam_result = gr.Image(
            label="Live result", interactive=False, format="jpeg", height=360, elem_id="ferkit-cam-result"
        )
        cam_scores = gr.Label(
            num_top_classes=len(service.model_info["classes"]), label="Largest face", elem_id="ferkit-cam-scores"
        )
    cam.stream(
        on_frame,
        inputs=[cam],
        outputs=[cam_result, cam_scores],
        stream_every=0.5,
        time_limit=STREAM_SECONDS,
        # a stream holds a Gradio slot for its whole session (up to time_limit), idle or abandoned: sharing
        # the photos' slots, two open webcams left photos waiting, and as many slots as recognizers, two
        # clients gone left every webcam waiting 5 minutes. Not counted: the service bounds the inference
        concurrency_limit=None,
        concurrency_id="ferkit-webcam",
        api_name="predict_frame",
        show_progress="hidden",
    )


def build_demo(settings: AppSettings | None = None, **options: Any) -> Any:
    """The UI alone (a ``gr.Blocks``), for ``demo.launch(**launch_options())``: the Hugging Face Space."""
    settings = dataclasses.replace(settings or AppSettings(), **options)
    return build_ui(RecognizerService.from_settings(settings), rest_api=False)


def launch_options(settings: AppSettings | None = None) -> dict[str, Any]:
    """Keyword arguments for ``demo.launch()`` matching ``settings``: examples served, the upload limit on files
    and, as ``ferkit serve`` has, on every request's body and its time (Gradio's own limit is on files only: one
    JSON body of a 1 GB ``data:`` URL took the Space's process to 6 GB)."""
    from starlette.middleware import Middleware

    settings = settings or AppSettings()
    return {
        "allowed_paths": [str(ASSETS_DIR)],
        "max_file_size": settings.max_upload_bytes,
        "show_error": True,
        "app_kwargs": {"middleware": [Middleware(UploadLimits, **_upload_limits(settings))]},
    }
