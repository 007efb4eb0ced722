#!/usr/bin/env bash
# Replace Pillow with pillow-simd (SIMD-accelerated resize/convert, same API) in the project's virtual env.
# Needs root for apt-get (Debian/Ubuntu) and a C compiler. Usage: tools/install_pillow_simd.sh [PYTHON]
# Undo: PYTHON -m pip uninstall -y pillow-simd && PYTHON -m pip install pillow
set -euo pipefail

PYTHON="${1:-${PYTHON:-.venv/bin/python}}"
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

# Headers of the image libraries pillow-simd links against (the wheel-less build compiles them in).
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends \
    build-essential python3-dev \
    libjpeg62-turbo-dev zlib1g-dev libpng-dev libtiff-dev libfreetype-dev liblcms2-dev \
    libwebp-dev libopenjp2-7-dev libharfbuzz-dev libfribidi-dev libxcb1-dev

"$PYTHON" -m pip uninstall -y pillow
# -mavx2 turns on the AVX2 code paths (the build otherwise only uses SSE4); --no-binary forces a local build.
CC="cc -mavx2" "$PYTHON" -m pip install --no-cache-dir --no-binary pillow-simd pillow-simd
"$PYTHON" -c "import PIL; print('installed', PIL.__version__, 'from', PIL.__file__)"
