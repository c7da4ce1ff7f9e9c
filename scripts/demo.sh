#!/usr/bin/env bash
# `make demo`: the main job on the embedded default (local profile, toy2d backbone).
set -euo pipefail
cd "$(dirname "$0")/.."
BACKBONE="${BACKBONE:-toy2d}"
if [ -f flows/rtdmd_flow.py ]; then
  # Metaflow needs a user name other than root
  if [ -z "${METAFLOW_USER:-}" ] && { [ -z "${USER:-}" ] || [ "${USER:-}" = root ]; }; then export METAFLOW_USER=rtdmd; fi
  python flows/rtdmd_flow.py run --backbone "$BACKBONE" --max-workers 2
  exec python -m rtdmd.pipeline where   # artifact root, MLflow UI command, evaluation table
fi
echo "demo: the Metaflow flow is not implemented yet (issue 7); running the toy2d stages that exist."
python -m rtdmd.backbones.toy2d_teacher --out data/toy2d/teacher
if python -c "import rtdmd.train" 2>/dev/null; then
  python -m rtdmd.train cold_start --config toy2d --out runs/demo/cold_start
fi
