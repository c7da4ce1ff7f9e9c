"""The ``rtdmd`` command line (entry point ``rtdmd = rtdmd.cli:main``).

Examples::

    rtdmd lora import ckpt/generator_ema.pt ckpt/fake_score_net.pt --backbone flux2_4b --out artifacts/flux2_cs
    rtdmd params show toy2d rl.generator.lr=1e-4
    rtdmd plan --backbone flux2_4b --stage cold_start --nodes 1 --gpus-per-node 8 --gpu-memory 80
    rtdmd params import-reference ref/cold_start/sd35m.yaml ref/rtdmd/sd35m.yaml --rl-gpus 8 --out params/mine.yaml
    rtdmd infer models:/rtdmd-toy2d@champion --prompt ring --out out/champ
    rtdmd eval toy2d@champion toy2d@candidate --with-teacher --out runs/eval/cmp
    rtdmd promote --backbone toy2d            # gated; --force --reason '...' overrides
    rtdmd rollback --backbone toy2d --reason 'regression'
    rtdmd history --backbone toy2d
    rtdmd ui                                  # MLflow UI + compare URL of the latest flow run
"""
from __future__ import annotations

import sys

import yaml

from rtdmd.cli import models
from rtdmd.cli.common import parser, run
from rtdmd.config import load_params
from rtdmd.config.typed import to_mapping


def _lora_import(args) -> int:
    from rtdmd.lora.importer import import_reference  # lazy (torch)

    params = load_params(args.backbone)
    manifest = import_reference(args.paths, params=params, out=args.out, alpha=args.alpha, force=args.force)
    print(f"wrote {args.out} ({len(manifest['files'])} files, roles: "
          f"{', '.join(sorted({f.split('/')[0] for f in manifest['files']}))})")
    return 0


def _params_show(args) -> int:
    print(yaml.safe_dump(to_mapping(load_params(args.backbone, args.overrides)), sort_keys=False), end="")
    return 0


def _params_import_reference(args) -> int:
    from rtdmd.config.reference_import import import_reference_file

    out, notes = import_reference_file(args.cold_start, args.rtdmd, args.inference, args.out, force=args.force,
                                       cold_start_gpus=args.cold_start_gpus, rl_gpus=args.rl_gpus)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def build_parser():
    ap = parser("rtdmd", __doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    lora = sub.add_parser("lora", help="LoRA artifact tools").add_subparsers(dest="lora_command", required=True)
    imp = lora.add_parser("import", help="import reference generator_ema.pt / fake_score_net.pt into an artifact",
                          epilog="example: rtdmd lora import generator_ema.pt --backbone flux2_4b --out out/cs")
    imp.add_argument("paths", nargs="+", help="reference .pt files (generator and optionally fake score)")
    imp.add_argument("--backbone", required=True, help="params name, e.g. flux2_4b")
    imp.add_argument("--out", required=True, help="artifact directory or s3:// URI")
    imp.add_argument("--alpha", type=float, default=64.0, help="LoRA alpha of the checkpoint (reference: 64)")
    imp.add_argument("--force", action="store_true", help="replace an existing --out that is not an imported artifact")
    imp.set_defaults(func=_lora_import)

    params = sub.add_parser("params", help="params tools").add_subparsers(dest="params_command", required=True)
    show = params.add_parser("show", help="print the resolved params of a backbone (with overrides)")
    show.add_argument("backbone")
    show.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    show.set_defaults(func=_params_show)
    imp = params.add_parser("import-reference", help="convert the reference's config files into a params file")
    imp.add_argument("cold_start", help="the reference's stage-1 config (configs/cold_start/<backbone>.yaml)")
    imp.add_argument("rtdmd", help="the reference's stage-2 config (configs/rtdmd/<backbone>.yaml)")
    imp.add_argument("--inference", default=None, help="the reference's inference config (checked for agreement)")
    imp.add_argument("--out", required=True, help="params YAML to write; its stem is the params name")
    imp.add_argument("--cold-start-gpus", type=int, default=8, help="GPUs the stage-1 per-GPU batch ran on (8)")
    imp.add_argument("--rl-gpus", type=int, default=16, help="GPUs the stage-2 per-GPU batch ran on (16)")
    imp.add_argument("--force", action="store_true", help="replace an existing --out file")
    imp.set_defaults(func=_params_import_reference)

    plan = sub.add_parser("plan", add_help=False, help="will it fit? simulate a training step at real size "
                                                       "(python -m rtdmd.plan --help)")
    plan.set_defaults(func=None)  # main() hands everything after "plan" to rtdmd.plan.cli
    models.add_subcommands(sub)  # infer, eval, promote, rollback, history, ui
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # its own parser and one-line errors (python -m rtdmd.plan)
        from rtdmd.plan.cli import main as plan_main

        return plan_main(argv[1:])
    return run(build_parser(), argv, log=False)


if __name__ == "__main__":
    sys.exit(main())
