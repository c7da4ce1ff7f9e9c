"""Prompt prep stage: ingest raw prompt sources, normalise, split, validate, publish atomically.

``python -m rtdmd.data.prepare --source PATH_OR_URI [--source ...] --out DIR [--params FILE]``

Sources (each ``--source`` may be prefixed ``NAME=`` to name a single dataset):

* a file — a reference-layout name (``train.txt``, ``test_metadata.jsonl``, ...) belongs to the
  dataset named by its directory; any other ``.txt/.text/.jsonl/.json`` is an *unsplit* dataset
  named by its stem;
* a dataset directory — holds reference-layout files directly;
* a root directory in the reference layout — ``<root>/<dataset>/<files>``;
* ``s3://bucket/prefix`` — a file or a prefix laid out like a directory above; fetched with boto3,
  endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / ``METAFLOW_S3_ENDPOINT_URL``,
  credentials from the environment.

Per dataset and split the file used is the first that exists of
``{split}_metadata.jsonl, {split}.jsonl, {split}.txt`` (metadata-bearing first, so GenEval lines
keep their metadata); ``metadata.jsonl, prompts.json, prompts.txt`` are used only when a dataset
has no split file at all, and are split by the dataset's ``unsplit`` rule. Other files are listed
as ignored in the manifest.

Processing per dataset: normalise (BOM/CRLF dropped, NFC, whitespace runs collapsed) → dedupe
within each split (first occurrence kept, counted) → split unsplit rows (a seeded, order-free
choice: the ``round(test_fraction·n)`` prompts with the smallest ``sha256(seed, text)``) → drop
train prompts that also appear in test → validate everything (great-expectations; see
:mod:`rtdmd.data.validate`) → cap (first N in file order, the reference's eval-subset rule) →
publish ``<out>/<dataset>/<split>.jsonl`` + ``manifest.json`` atomically.

Exit status: 0 and the manifest path on stdout; 1 for unreadable input or bad params (message
names file and line); 2 when validation fails, with the report path (``<out>.validation_report.json``
and ``.md`` next to ``<out>``) on stderr. Nothing is published unless validation passes.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from rtdmd.config.typed import ConfigError, to_mapping
from rtdmd.data import formats, schema
from rtdmd.data.params import DATASET_NAME, DataParams, load_data_params

SPLIT_FILES = {
    "train": ("train_metadata.jsonl", "train.jsonl", "train.txt"),
    "test": ("test_metadata.jsonl", "test.jsonl", "test.txt"),
}
UNSPLIT_FILES = ("metadata.jsonl", "prompts.json", "prompts.txt")
RECOGNISED = frozenset(SPLIT_FILES["train"] + SPLIT_FILES["test"] + UNSPLIT_FILES)
PROMPT_EXTS = (".txt", ".text", ".jsonl", ".json")
SPLITS = ("train", "test")


class PrepareError(ValueError):
    """A source cannot be ingested (missing, no recognised file, bad name)."""


@dataclasses.dataclass
class SourceFile:
    dataset: str
    role: str  # "train" | "test" | "unsplit"
    path: Path  # local file
    display: str  # what reports and the manifest show (path as given, or s3 URI)
    origin: str  # the --source argument it came from
    extra: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- discovery
def _dataset_files(directory: Path, dataset: str, display: str, origin: str) -> tuple[list[SourceFile], list[str]]:
    present = {p.name: p for p in directory.iterdir() if p.is_file()}
    chosen: list[SourceFile] = []
    for split, names in SPLIT_FILES.items():
        for name in names:
            if name in present:
                chosen.append(SourceFile(dataset, split, present[name], f"{display}/{name}", origin))
                break
    if not chosen:
        for name in UNSPLIT_FILES:
            if name in present:
                chosen.append(SourceFile(dataset, "unsplit", present[name], f"{display}/{name}", origin))
                break
    used = {f.path.name for f in chosen}
    ignored = sorted(f"{display}/{n}" for n in present if n not in used and (n in RECOGNISED or n.endswith(PROMPT_EXTS)))
    return chosen, ignored


def _check_name(name: str, where: str) -> str:
    if not DATASET_NAME.match(name):
        raise PrepareError(f"{where}: dataset name {name!r} must match {DATASET_NAME.pattern}")
    return name


def discover(path: Path, display: str, name: str | None = None, origin: str | None = None) -> tuple[list[SourceFile], list[str]]:
    """Files to ingest under a local ``path`` (file, dataset dir or reference-layout root)."""
    origin = origin or display
    if not path.exists():
        raise PrepareError(f"{display}: no such file or directory")
    if path.is_file():
        if path.name in RECOGNISED:
            ds = name or path.resolve().parent.name
            role = next((s for s, names in SPLIT_FILES.items() if path.name in names), "unsplit")
        elif path.suffix.lower() in PROMPT_EXTS:
            ds = name or re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
            role = "unsplit"
        else:
            raise PrepareError(f"{display}: not a prompt file (expected {', '.join(PROMPT_EXTS)})")
        return [SourceFile(_check_name(ds, display), role, path, display, origin)], []
    if any((path / n).is_file() for n in RECOGNISED):
        return _dataset_files(path, _check_name(name or path.resolve().name, display), display.rstrip("/"), origin)
    files, ignored = [], []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any((sub / n).is_file() for n in RECOGNISED):
            if name:
                raise PrepareError(f"{display}: NAME= only applies to a single dataset; {path} holds several")
            f, ig = _dataset_files(sub, _check_name(sub.name, f"{display}/{sub.name}"), f"{display.rstrip('/')}/{sub.name}", origin)
            files += f
            ignored += ig
    if not files:
        raise PrepareError(
            f"{display}: no recognised prompt file (looked for {', '.join(sorted(RECOGNISED))} "
            "in it and in its sub-directories)"
        )
    return files, ignored


def resolve_sources(sources: list[str], workdir: Path) -> tuple[list[SourceFile], list[dict]]:
    """All source files, plus one manifest entry per source argument."""
    from rtdmd.data import remote

    all_files, entries = [], []
    for arg in sources:
        name, spec = None, arg
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)=(.+)$", arg)
        if m and not arg.startswith("s3://"):
            name, spec = m.group(1), m.group(2)
        if spec.startswith("s3://"):
            dest = Path(tempfile.mkdtemp(prefix="s3src-", dir=workdir))
            keep = lambda n: n in RECOGNISED or n.lower().endswith(PROMPT_EXTS)  # noqa: E731
            try:
                local, objects = remote.fetch_s3(spec, dest, keep=keep)
            except (ValueError, FileNotFoundError):
                raise
            except Exception as exc:  # botocore: credentials, endpoint, access errors
                raise PrepareError(f"{spec}: cannot fetch from S3 (endpoint {remote.endpoint_from_env() or 'AWS default'}): {exc}") from None
            files, ignored = discover(local, spec.rstrip("/"), name, origin=arg)
            by_local = {o["local"]: o for o in objects}
            for f in files:
                obj = by_local.get(str(f.path), {})
                f.display = obj.get("uri", f.display)
                f.extra = {"etag": obj.get("etag")}
            entries.append({"source": arg, "kind": "s3", "endpoint": remote.endpoint_from_env(), "ignored": ignored})
        else:
            files, ignored = discover(Path(spec), spec, name, origin=arg)
            entries.append({"source": arg, "kind": "local", "ignored": ignored})
        all_files += files
    return all_files, entries


# ----------------------------------------------------------------------------- collection
def _kind(configured: str, records: list[formats.PromptRecord]) -> str:
    if configured != "auto":
        return configured
    metas = [r.metadata for r in records if r.metadata is not None]
    if any(schema.looks_like_geneval(m) for m in metas):
        return "geneval"
    if any(schema.looks_like_geneval2(m) for m in metas):
        return "geneval2"
    return "text"


def _split_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode("utf-8", "surrogateescape")).hexdigest()


def _dedupe(rows: list[dict], seen: set | None = None) -> tuple[list[dict], int]:
    seen = set() if seen is None else seen
    out, dup = [], 0
    for r in rows:
        t = r["text"]
        if t is not None:
            if t in seen:
                dup += 1
                continue
            seen.add(t)
        out.append(r)
    return out, dup


def collect(files: list[SourceFile], params: DataParams) -> dict[str, Any]:
    """Read, normalise, dedupe, split. Returns rows (pre-cap) per dataset/split and stats."""
    # Filter datasets.
    kept = []
    for f in files:
        if params.only and f.dataset not in params.only:
            continue
        if f.dataset not in params.datasets and params.unknown_datasets != "include":
            if params.unknown_datasets == "error":
                raise PrepareError(f"{f.display}: dataset {f.dataset!r} is not listed under `datasets` in the params")
            continue
        kept.append(f)
    if not kept:
        raise PrepareError("no dataset left to prepare after applying `only` / `unknown_datasets`")

    file_info, raw = [], {}
    for f in kept:
        p = params.for_dataset(f.dataset)
        records = formats.read_prompts(f.path, strict=False, max_line_bytes=params.max_line_bytes)
        kind = _kind(p.kind, records)
        ds = raw.setdefault(f.dataset, {"kind": set(), "train": [], "test": [], "unsplit": []})
        ds["kind"].add(kind)
        data = f.path.read_bytes()
        file_info.append({"source": f.display, "dataset": f.dataset, "split": f.role, "records": len(records),
                          "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "kind": kind, **f.extra})
        for rec in records:
            text = formats.normalise_text(rec.text) if rec.text is not None else None
            meta = rec.metadata
            if isinstance(meta, dict):
                meta = dict(meta)
                if isinstance(meta.get("prompt"), str) and text is not None:
                    meta["prompt"] = text
            ds[f.role].append({"dataset": f.dataset, "kind": kind, "text": text, "metadata": meta,
                               "source": f.display, "line": rec.line, "parse_error": rec.parse_error})

    out: dict[str, dict] = {}
    for name, ds in raw.items():
        p = params.for_dataset(name)
        stats = {s: Counter() for s in SPLITS}
        splits = {}
        for s in SPLITS:
            stats[s]["read"] = len(ds[s])
            if p.dedupe:
                splits[s], stats[s]["duplicates_removed"] = _dedupe(ds[s])
            else:
                splits[s] = list(ds[s])
        if ds["unsplit"]:
            rows = ds["unsplit"]
            unsplit_stats = Counter(read=len(rows))
            if p.dedupe:
                rows, unsplit_stats["duplicates_removed"] = _dedupe(rows)
            if p.unsplit == "split":
                texts = [r["text"] for r in rows if r["text"] is not None]
                n_test = round(p.test_fraction * len(texts))
                chosen = set(sorted(texts, key=lambda t: _split_key(params.split_seed, t))[:n_test])
                dest = {id(r): ("test" if r["text"] in chosen else "train") for r in rows}
            else:
                dest = {id(r): p.unsplit for r in rows}
            for s in SPLITS:
                part = [r for r in rows if dest[id(r)] == s]
                unsplit_stats[f"to_{s}"] = len(part)
                if p.dedupe:  # against what the split already holds
                    part, dup = _dedupe(part, {r["text"] for r in splits[s] if r["text"] is not None})
                    stats[s]["duplicates_removed"] += dup
                splits[s] += part
            stats["unsplit"] = unsplit_stats
        if p.drop_train_test_overlap and splits["test"] and splits["train"]:
            test_texts = {r["text"] for r in splits["test"] if r["text"] is not None}
            before = len(splits["train"])
            splits["train"] = [r for r in splits["train"] if r["text"] is None or r["text"] not in test_texts]
            stats["train"]["overlap_with_test_removed"] = before - len(splits["train"])
        for s in SPLITS:
            occurrences: Counter = Counter()
            for r in splits[s]:
                r["split"] = s
                if r["text"] is None:
                    r["id"] = None
                    continue
                rid = formats.prompt_id(name, r["text"])
                occurrences[rid] += 1
                r["id"] = rid if occurrences[rid] == 1 else f"{rid}-{occurrences[rid] - 1}"
        kinds = sorted(ds["kind"])
        out[name] = {"kind": kinds[0] if len(kinds) == 1 else "mixed", "splits": splits,
                     "stats": {s: dict(c) for s, c in stats.items() if c}}
    return {"datasets": out, "files": file_info}


# ----------------------------------------------------------------------------- main entry
def report_stem(out: Path) -> str:
    return f"{out.name}.validation_report"


def gx_dir(out: Path) -> Path:
    """The great-expectations project next to the prepared data (suites, checkpoints, Data Docs)."""
    return out.parent / f"{out.name}.gx"


def prepare(sources: list[str], out: str | Path, params: DataParams, *, params_file: str | None = None) -> Path:
    """Run the stage; returns the manifest path. Raises PrepareError / PromptFormatError /
    :class:`rtdmd.data.validate.DataValidationError` (after writing the report next to ``out``)."""
    from rtdmd.data import validate

    out = Path(out)
    if not sources:
        raise PrepareError("no --source given and `sources` is empty in the params")
    with tempfile.TemporaryDirectory(prefix="rtdmd-prepare-") as work:
        files, source_entries = resolve_sources(sources, Path(work))
        collected = collect(files, params)
    datasets = collected["datasets"]

    rows, n = [], 0
    for name in sorted(datasets):
        for s in SPLITS:
            for r in datasets[name]["splits"][s]:
                r["row"] = n
                n += 1
                rows.append(r)
    stale = [out.parent / f"{report_stem(out)}.json", out.parent / f"{report_stem(out)}.md"]
    outcome = validate.validate_rows(rows, collected["files"], params, report_dir=out.parent, report_stem=report_stem(out),
                                     gx_dir=gx_dir(out))
    for f in stale:
        f.unlink(missing_ok=True)

    files_out: dict[str, bytes] = {}
    counts: dict[str, dict[str, int]] = {}
    summary: dict[str, Any] = {}
    for name in sorted(datasets):
        p = params.for_dataset(name)
        counts[name] = {}
        for s in SPLITS:
            rows_s = datasets[name]["splits"][s]
            cap = p.eval_cap if s == "test" else p.train_cap
            if cap and len(rows_s) > cap:
                datasets[name]["stats"].setdefault(s, {})["capped"] = len(rows_s) - cap
                rows_s = rows_s[:cap]
            if not rows_s:
                continue
            recs = [formats.prepared_record(name, s, r["text"], r["metadata"], r["source"], r["line"], rid=r["id"]) for r in rows_s]
            files_out[f"{name}/{s}.jsonl"] = formats.encode_prepared(recs)
            counts[name][s] = len(recs)
        summary[name] = {"kind": datasets[name]["kind"], "splits": datasets[name]["stats"]}
    # the published outputs are a function of the inputs only (no clock): DVC's md5 of
    # data/prepared, and so dvc.lock, stays the same when a fresh clone re-runs the stage
    report = {k: v for k, v in outcome.report.items() if k not in ("created_at", "seconds")}
    files_out["validation_report.json"] = (json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n").encode()
    files_out["validation_report.md"] = validate._markdown(report).encode()

    import great_expectations as gx

    totals = Counter()
    for c in counts.values():
        totals.update(c)
    params_map = to_mapping(params)
    manifest = {
        "format": formats.PREPARED_FORMAT,
        "version": formats.PREPARED_VERSION,
        "tool": {"rtdmd.data.prepare": "1", "great_expectations": gx.__version__, "python": sys.version.split()[0]},
        "params_file": params_file,
        "params": params_map,
        "params_sha256": hashlib.sha256(json.dumps(params_map, sort_keys=True).encode()).hexdigest(),
        "sources": source_entries,
        "source_files": collected["files"],
        "counts": counts,
        "totals": dict(totals),
        "datasets": summary,
        "validation": {"passed": True, "rules_checked": report["rules_checked"],
                       "expectations_checked": report["expectations_checked"], "rows_checked": report["rows_checked"]},
    }
    return formats.publish_prepared(out, files_out, manifest)


def _is_prepared(path: Path) -> bool:
    """``path`` holds a prepared prompt directory (what this command writes; re-runs replace it)."""
    try:
        return json.loads((path / formats.MANIFEST).read_text()).get("format") == formats.PREPARED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtdmd.data.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", action="append", default=[], metavar="[NAME=]PATH_OR_URI",
                    help="file, dataset dir, reference-layout root or s3://bucket/prefix (repeatable)")
    ap.add_argument("--out", required=True, help="output directory of the prepared sets (e.g. data/prepared)")
    ap.add_argument("--params", default=None, help="params YAML (params/data.yaml); defaults if omitted")
    ap.add_argument("--force", action="store_true", help="replace an --out that is not a prepared prompt directory")
    args = ap.parse_args(argv)
    from rtdmd.artifacts.fs import ArtifactError
    from rtdmd.artifacts.lock import OutputLock, check_replaceable
    from rtdmd.data.validate import DataValidationError

    try:
        params = load_data_params(args.params)
        check_replaceable(args.out, force=args.force, ours=_is_prepared, what="prepared prompt directory")  # exclusive output
        with OutputLock(args.out, command="rtdmd.data.prepare"):
            manifest = prepare(args.source or list(params.sources), args.out, params, params_file=args.params)
    except DataValidationError as exc:
        print(f"error: prompt data failed validation; nothing was published.\nreport: {exc.report_path}", file=sys.stderr)
        if exc.data_docs is not None:
            print(f"data docs: {exc.data_docs}", file=sys.stderr)
        for f in exc.failures:
            where = ", ".join(f"{e['source']}:{e['line']}" for e in f["examples"])
            print(f"  {f['rule']}: {f['failing_rows']} row(s), e.g. {where}", file=sys.stderr)
        return 2
    except (PrepareError, formats.PromptFormatError, ConfigError, ArtifactError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    m = json.loads(Path(manifest).read_text())
    print(str(manifest))
    print(f"prepared {sum(m['totals'].values())} prompts ({m['totals']}) in {len(m['counts'])} datasets "
          f"-> {args.out} (data_version {m['data_version'][:12]})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
