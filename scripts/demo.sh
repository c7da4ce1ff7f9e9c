#!/usr/bin/env bash
# `make demo`: the main job on the embedded default (local profile, toy2d backbone).
set -euo pipefail
cd "$(dirname "$0")/.."
BACKBONE="${BACKBONE:-toy2d}"
# Metaflow needs a user name other than root
if [ -z "${METAFLOW_USER:-}" ] && { [ -z "${USER:-}" ] || [ "${USER:-}" = root ]; }; then export METAFLOW_USER=rtdmd; fi
python flows/rtdmd_flow.py run --backbone "$BACKBONE" --max-workers 2
exec python -m rtdmd.pipeline where   # artifact root, MLflow UI command, evaluation table
