"""Hugging Face Space entry point (Gradio SDK, ``app_file: app.py``): the ferkit web UI.

Locally, ``python app.py`` serves the same UI; ``ferkit serve`` serves it together with the JSON API
(``/api/v1/predict``, ``/docs``). Settings come from ``FERKIT_MODEL`` (model file; default: the shipped
model) and ``FERKIT_MAX_UPLOAD_MB``.
"""

import os
import sys
from pathlib import Path

try:
    import ferkit.app  # noqa: F401
except ImportError:  # a Space runs this file from a checkout of the repository without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from ferkit.app import AppSettings, build_demo, launch_options

options = {"model": os.environ.get("FERKIT_MODEL") or None}
if upload_mb := os.environ.get("FERKIT_MAX_UPLOAD_MB"):  # else AppSettings' default
    try:
        options["max_upload_mb"] = float(upload_mb)
    except ValueError:
        sys.exit(f"FERKIT_MAX_UPLOAD_MB={upload_mb!r}: not a number of MiB")
try:
    settings = AppSettings(**options)
except ValueError as e:  # a negative or infinite FERKIT_MAX_UPLOAD_MB
    sys.exit(f"FERKIT_MAX_UPLOAD_MB={upload_mb!r}: {e}")
try:
    demo = build_demo(settings)
except (OSError, ValueError) as e:  # a FERKIT_MODEL that is missing or not a model: said as `ferkit serve` says it
    sys.exit(f"FERKIT_MODEL={options['model']!r}: {e}" if options["model"] else str(e))

if __name__ == "__main__":
    demo.launch(**launch_options(settings))
