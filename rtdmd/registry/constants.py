"""Names the registry modules share (no imports, so any of them may import it)."""
from __future__ import annotations

MODEL_PREFIX = "rtdmd-"  # registered model name: rtdmd-<backbone>
CANDIDATE, CHAMPION = "candidate", "champion"  # aliases: newest registered / promoted
LOCK_SUFFIX = "--promotion-lock"  # lock model of older releases (now: tags, rtdmd.registry.lock); hidden in listings
FORMAT = "rtdmd-registered-lora/1"  # "format" field of MODEL_FILE
MODEL_FILE = "rtdmd_model.json"  # stack order, base model, sampler settings of a registered version
EVAL_TAG = "rtdmd.eval"  # model-version tag holding the evaluation record
EVAL_SCHEMA = 1  # version of that record
HISTORY_PREFIX = "rtdmd.history."  # model tags recording each champion move
ARTIFACT_KEY = "rtdmd"  # artifacts/<key>/ of a version's logged pyfunc model: its RTDMD files
