#!/usr/bin/env bash
# Creates .venv-fer: the `fer` PyPI package (mini-Xception Keras model) for benchmarks/compare_fer_package.py.
# It is kept in its own git-ignored virtualenv and is never a dependency of ferkit.
#
# `fer` is installed with --no-deps and its runtime dependencies are added by hand, because its declared ones
#   - facenet-pytorch pulls torch 2.2 with ~3 GB of CUDA libraries, only for the MTCNN detector (not used here);
#   - opencv-contrib-python is the GUI build (needs libGL); the headless build has the same cv2.resize and Haar
#     cascades, and must be < 5 because FER() loads cv2.data.haarcascades, which OpenCV 5 removed;
#   - tensorflow: tensorflow-cpu is the same TensorFlow without the CUDA extras.
# About 2 GB on disk (TensorFlow is most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-fer}
FER_VERSION=${FER_VERSION:-25.10.3}
TF_VERSION=${TF_VERSION:-2.21.0}

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --no-deps "fer==$FER_VERSION"
"$VENV/bin/pip" install "tensorflow-cpu==$TF_VERSION" "opencv-python-headless>=4.8,<5" "setuptools<81" \
    pandas tqdm "moviepy>=1.0.3,<2.0" "ffmpeg-python>=0.2.0" matplotlib requests pillow
# smoke test: both of fer's emotion models load (pkg_resources needs setuptools < 81)
TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/python" -W ignore -c "
from fer.fer import FER
import fer, tensorflow as tf
FER(use_tflite=False); FER()
print('fer', fer.__version__, 'tensorflow', tf.__version__, 'ready in $VENV')
"
