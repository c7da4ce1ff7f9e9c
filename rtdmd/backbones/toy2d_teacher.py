"""``python -m rtdmd.backbones.toy2d_teacher --out DIR``: train and cache the toy2d teacher.

Hyper-parameters come from ``params/toy2d_teacher.yaml`` (a DVC params file) when present.
"""
from __future__ import annotations

import argparse
import sys
import time

from rtdmd.backbones.toy2d import TeacherTrainCfg, save_teacher, train_teacher
from rtdmd.config.typed import ConfigError, from_mapping, load_yaml


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="output directory (written atomically)")
    ap.add_argument("--params", default="params/toy2d_teacher.yaml", help="YAML with a 'teacher' section")
    args = ap.parse_args(argv)
    try:
        raw = load_yaml(args.params).get("teacher", {})
        cfg = from_mapping(TeacherTrainCfg, raw, source=args.params)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.time()
    path = save_teacher(train_teacher(cfg), args.out)
    print(f"toy2d teacher written to {path} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
