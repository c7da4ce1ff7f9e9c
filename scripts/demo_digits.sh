#!/usr/bin/env bash
# `make demo-digits`: the whole flow on the digits known-answer backbone (real FLUX.2-klein code path,
# models trained here on the scikit-learn digits). Builds the digits VAE / teacher / rewards with DVC
# first (cached under data/digits/; a few CPU minutes the first time), then runs the flow at the
# params/digits.yaml settings and prints where the sample grid is.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${METAFLOW_USER:-}" ] && { [ -z "${USER:-}" ] || [ "${USER:-}" = root ]; }; then export METAFLOW_USER=rtdmd; fi
dvc repro digits_teacher digits_rewards
python flows/rtdmd_flow.py run --backbone digits --max-workers 2 ${DIGITS_OVERRIDES:+--overrides "$DIGITS_OVERRIDES"}
python -m rtdmd.pipeline where
root="$(python -c 'from rtdmd.pipeline.artifacts import default_artifact_root; print(default_artifact_root())')"
grid=$(ls -t "$root"/RtdmdFlow/*/eval/matrix/digits_grid.png 2>/dev/null | head -1 || true)
echo "digits sample grid (rows: teacher-50 / teacher-4 / cold_start-4 / rtdmd-4; two samples per digit): ${grid:-<artifact root>/RtdmdFlow/<run>/eval/matrix/digits_grid.png}"
