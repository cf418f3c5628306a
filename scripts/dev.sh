#!/usr/bin/env bash
# The two commands of the README, on a fresh machine (Python 3.10+; Debian/Ubuntu for the browser test):
#   bash scripts/dev.sh serve   # set up and start the web app + REST API on the shipped model
#   bash scripts/dev.sh test    # set up and run the linters and the whole test suite
# Everything goes into ./.venv. FERKIT_DATA points the real-data tests at FER-2013's image folder
# (default: ../shared/datasets/fer2013 when it exists; those tests skip without it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "${1:-}" in
  serve | test) ;;
  *)
    echo "usage: bash scripts/dev.sh serve [ferkit serve options] | test [pytest options]" >&2
    exit 2
    ;;
esac
if ! .venv/bin/python -c "" >/dev/null 2>&1; then
  "$PY" -m venv --clear .venv # none yet, or its Python gone
elif ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  .venv/bin/python -m ensurepip >/dev/null # made without pip (uv venv, --without-pip), or stopped while made
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

case "$1" in
  serve)
    "${PIP[@]}" -e '.[app]'
    shift
    exec .venv/bin/ferkit serve "$@"
    ;;
  test)
    # torch==2.13.0 is a CPU build; a newer unpinned torch would pull a multi-GB CUDA build.
    "${PIP[@]}" torch==2.13.0 -e '.[train,app,dev]' playwright
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "chromium not installed: the browser test will be skipped"
    fi
    if [ -z "${FERKIT_DATA:-}" ] && [ -d ../shared/datasets/fer2013 ]; then
      export FERKIT_DATA="$PWD/../shared/datasets/fer2013"
    fi
    .venv/bin/ruff check src tests benchmarks app.py scripts
    .venv/bin/ruff format --check src tests benchmarks app.py scripts
    shift
    exec .venv/bin/pytest -q -p no:cacheprovider "$@"
    ;;
esac
