"""Load benchmark of the web app's JSON API: N concurrent clients send a 640x480 one-face photo to
``POST /api/v1/predict`` of a real ``ferkit serve`` process on loopback.

    .venv/bin/python benchmarks/load_app.py                      # 8 clients, 1,000 requests
    .venv/bin/python benchmarks/load_app.py --url http://host:7860 --requests 200

First ferkit's default face detector alone on the photo (in this process), then ``--alone`` requests one at a time
(the service time, with no queueing), then the load. Prints
latency percentiles, throughput and errors; writes reports/load_app.json (--quick: 40 requests,
reports/load_app_quick.json). The clients run on the same machine as the server and share its CPU, so on
a small machine they slow the server down a little; compare numbers only between runs on the same machine.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from _common import base_parser, latencies_ms, machine_info, summarize_ms, write_report
from _photos import ASTRONAUT
from PIL import Image

from ferkit.config import AppSettings


def one_face_photo() -> bytes:
    """The astronaut portrait (one face) scaled to 480x480 and centred on a 640x480 grey canvas, JPEG q90."""
    face = Image.open(ASTRONAUT).convert("RGB").resize((480, 480), Image.BICUBIC)
    canvas = Image.new("RGB", (640, 480), (128, 128, 128))
    canvas.paste(face, (80, 0))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def detect_p50_ms(photo: bytes, threads: int, runs: int = 20) -> float:
    """Median ms of ferkit's default face detector (CenterFace, 48 px smallest face) on the decoded photo with
    the server's ``threads``, in this process before the server starts: each request's face detection, alone
    (unless --serve-args picks another detector)."""
    from ferkit.faces import make_detector
    from ferkit.inference import load_image

    rgb, detector = load_image(photo), make_detector(threads=threads)
    return summarize_ms(latencies_ms(lambda i: detector.detect(rgb), runs))["p50_ms"]


def start_server(serve_args: list[str], timeout: float = 120.0) -> tuple[subprocess.Popen, str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(prefix="ferkit-load-", suffix=".log")[1])
    cmd = [
        sys.executable,
        "-m",
        "ferkit",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *serve_args,
    ]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"server not up after {timeout:g} s:\n{log.read_text()}")


def run_load(url: str, photo: bytes, requests: int, clients: int) -> dict:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    faces: Counter[int] = Counter()
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                try:
                    r = c.post("/api/v1/predict", files={"file": ("photo.jpg", photo, "image/jpeg")})
                    status = str(r.status_code)
                    n = len(r.json()["faces"]) if r.status_code == 200 else -1
                except httpx.HTTPError as e:
                    status, n = type(e).__name__, -1
                except Exception as e:  # a 200 that is not the API's JSON: counted, not a dead client
                    status, n = f"bad answer ({type(e).__name__})", -1
                dt = time.perf_counter() - t0
                with lock:
                    if n >= 0:  # answered: an error's time (a fast 503's) is not a latency
                        latencies.append(dt)
                    statuses[status] += 1
                    faces[n] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    sent = sum(statuses.values())
    if sent != requests:
        raise SystemExit(f"{requests - sent} of {requests} requests were never answered or counted")
    ms = np.asarray(latencies or [float("nan")]) * 1000  # of the answered requests only
    ok = len(latencies)
    return {
        "requests": sent,
        "clients": clients,
        "wall_s": round(wall, 2),
        "throughput_rps": round(ok / wall, 2),  # answered requests a second
        "ok": ok,
        "errors": sent - ok,
        "statuses": dict(statuses),
        "faces_per_answer": {str(k): v for k, v in sorted(faces.items())},
        "latency_ms": {
            "p50": round(float(np.percentile(ms, 50)), 1),
            "p95": round(float(np.percentile(ms, 95)), 1),
            "p99": round(float(np.percentile(ms, 99)), 1),
            "mean": round(float(ms.mean()), 1),
            "min": round(float(ms.min()), 1),
            "max": round(float(ms.max()), 1),
        },
    }


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0], data=False)
    parser.add_argument("--requests", type=int, default=1000, help="requests in all")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--warmup", type=int, default=20, help="requests first, not measured")
    parser.add_argument("--alone", type=int, default=30, help="requests sent one at a time first: no queueing")
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--serve-args", default="", help="extra `ferkit serve` flags, e.g. '--concurrency 1'")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.warmup, args.alone = 40, 4, 4
    if args.threads:
        args.serve_args += f" --threads {args.threads}"

    photo = one_face_photo()
    concurrency = AppSettings().max_concurrency
    if "--concurrency" in args.serve_args.split():
        concurrency = int(args.serve_args.split()[args.serve_args.split().index("--concurrency") + 1])
    threads = args.threads or max(1, (os.cpu_count() or 1) // concurrency)  # as the server gives each recognizer
    detect_ms = None if args.url else detect_p50_ms(photo, threads, 5 if args.quick else 20)  # not a remote one
    proc = log = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url, log = start_server(args.serve_args.split())
    try:
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        if args.warmup:
            run_load(url, photo, args.warmup, min(args.clients, args.warmup))
        alone = run_load(url, photo, args.alone, 1) if args.alone else None
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        result = run_load(url, photo, args.requests, args.clients)
        load2 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    report = {
        "what": "POST /api/v1/predict, 640x480 JPEG with one face",
        "quick": args.quick,
        "photo_bytes": len(photo),
        "default_detector_p50_ms": detect_ms and round(detect_ms, 1),
        "server_concurrency_threads": None if args.url else [concurrency, threads],
        "server": url if args.url else f"ferkit serve {args.serve_args}".strip() + " (loopback)",
        "model": health.get("model"),
        "version": health.get("version"),
        "machine": {**machine_info(), "load_avg_1m_before": load1, "load_avg_1m_after": load2},
        **result,
        "one_client": None
        if alone is None
        else {k: alone[k] for k in ("requests", "throughput_rps", "errors", "latency_ms")},
    }
    lat = result["latency_ms"]
    print(f"{report['what']}: {result['requests']} requests, {result['clients']} clients, model {report['model']}")
    print(f"{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'mean ms':>9}{'max ms':>8}{'req/s':>8}{'errors':>8}")
    print(
        f"{lat['p50']:>8.1f}{lat['p95']:>8.1f}{lat['p99']:>8.1f}{lat['mean']:>9.1f}{lat['max']:>8.1f}"
        f"{result['throughput_rps']:>8.2f}{result['errors']:>8}"
    )
    if alone is not None:
        one = alone["latency_ms"]
        print(f"one request at a time ({alone['requests']}): p50 {one['p50']} ms, p95 {one['p95']} ms")
    if detect_ms is not None:
        print(f"the default face detector alone on this photo, in this process: p50 {detect_ms:.1f} ms")
    print(
        f"statuses {result['statuses']}, faces per answer {result['faces_per_answer']}, "
        f"{os.cpu_count()} CPUs, load average {load1} -> {load2}"
    )
    write_report("load_app", report, args.out_dir)
    if log is not None:
        log.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
