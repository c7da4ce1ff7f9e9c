#!/usr/bin/env bash
# Download the wheels the GPU check needs on a machine without network (Python 3.12, x86-64
# manylinux, torch/transformers/peft/accelerate/safetensors/huggingface-hub already installed there)
# into the ignored folder .whl/ (or $1), and check that they fit the size that may travel with the
# source tree (64 MiB for everything; this folder gets at most WHEEL_LIMIT_MIB, default 48).
#
#   bash scripts/gpu_wheels.sh            # -> .whl/
#   bash scripts/gpu_wheels.sh /tmp/whl   # elsewhere
#
# Install there (README "GPU check"):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#
# The list is what the trainer imports that the GPU image lacks (diffusers, pinned like
# pyproject.toml, and its importlib_metadata); every other import of the training path is on that
# image. Wheels are fetched without dependencies (--no-deps) so nothing already there is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
LIMIT_MIB="${WHEEL_LIMIT_MIB:-48}"
PY="${PYTHON:-python3}"
DIFFUSERS="$(grep -oE '"diffusers==[^"]+"' pyproject.toml | tr -d '"')"
PKGS=("${DIFFUSERS:-diffusers==0.42.1}" "importlib_metadata==8.7.0")

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${PKGS[@]}"

n=$(ls "$DEST"/*.whl | wc -l)
if [ "$n" -ne "${#PKGS[@]}" ]; then
  echo "error: expected ${#PKGS[@]} wheels in $DEST, found $n (one version of each, or pip install stops)" >&2
  exit 1
fi
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f MiB  %s\n", $5/1048576, $9}'
echo "total ${mib} MiB in $DEST (limit ${LIMIT_MIB} MiB)"
if [ "$mib" -gt "$LIMIT_MIB" ]; then
  echo "error: wheels in $DEST are ${mib} MiB, over the ${LIMIT_MIB} MiB that may travel" >&2
  exit 1
fi
