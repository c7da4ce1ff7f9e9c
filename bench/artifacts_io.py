"""Item 5 — artifact throughput: ``rtdmd.artifacts.store`` vs raw boto3 on the same S3 server.

Artifact: the stage output layout (``generator/`` + ``fake_score/``, each
``pytorch_lora_weights.safetensors`` + ``adapter_config.json``, written by
:func:`rtdmd.lora.io.save_lora_dir`) of a rank-32 LoRA on the **real FLUX.2-klein 4B** targets:
the adapted Linear layers come from the architecture (:func:`bench.arch.lora_bytes_flux2_4b`,
``Σ r·(in+out)·4`` bytes per adapter), filled with random fp32 values.

Store path: :func:`rtdmd.artifacts.store.publish_dir` (sha256 manifest of the source files, concurrent
upload through boto3's transfer manager, manifest last) + :func:`~rtdmd.artifacts.store.fetch_dir`
into an empty cache (concurrent download, verify every checksum).
Raw path: a **parallel** raw-boto3 baseline: every file's ``upload_file`` / ``download_file`` at
once on a thread pool of ``store.MAX_CONCURRENCY`` workers (same ``TransferConfig``: 16 MiB
multipart chunks), no checksums. Both against one local moto server
(``rtdmd.testing.s3server``) on 127.0.0.1, interleaved, objects deleted after every round.
``ratio = median(store publish+fetch) / median(raw put+get)``; target ≤ 1.2.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TARGET = 1.2


def build_artifact_dir(root: Path, rank: int) -> dict:
    import torch

    from bench.arch import lora_bytes_flux2_4b, lora_layers, meta_transformer
    from rtdmd.lora.io import save_lora_dir

    info = lora_bytes_flux2_4b(rank)
    layers = lora_layers(meta_transformer("flux2_4b"), info["targets"])
    g = torch.Generator().manual_seed(0)
    for role in ("generator", "fake_score"):
        state = {}
        for name, i, o in layers:
            state[f"{name}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.01
            state[f"{name}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.01
        save_lora_dir(root / role, state, rank=rank, alpha=2.0 * rank, targets=info["targets"])
    files = sorted(p for p in root.rglob("*") if p.is_file())
    info["artifact_bytes"] = sum(p.stat().st_size for p in files)
    info["files"] = [str(p.relative_to(root)) for p in files]
    return info


def finding_text(diag: dict) -> str:
    d = diag["store_minus_raw_s_median"]
    head = (f"store − raw = {d:.2f} s per round trip" if d >= 0 else
            f"store − raw = {d:.2f} s per round trip (the store was not slower in this run: noise)")
    return (f"{head}; the store's extra work, timed separately: 2 × sha256 of the files (hashed concurrently, as "
            f"the store does) {diag['sha256_all_files_s_median']:.2f} s + 2 × new boto3 client "
            f"{diag['boto3_client_creation_s_median']:.2f} s")


def overhead_note(diag: dict) -> str:
    explained = 2 * diag["sha256_all_files_s_median"] + 2 * diag["boto3_client_creation_s_median"]
    rest = diag["store_minus_raw_s_median"] - explained
    return finding_text(diag) + (f" = {explained:.2f} s; the remaining {rest:.2f} s (extra manifest requests, the "
                                 "fetch's writes into its cache, noise) are not attributed" if rest > 0 else "")


def run(quick: bool, workdir: Path) -> dict:
    from bench.common import stats
    from rtdmd.artifacts import store
    from rtdmd.testing.s3server import client, create_bucket, local_s3_server, patched_env, s3_env

    rank = 4 if quick else 32
    rounds = 2 if quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="bench-art-", dir=workdir))
    src = tmp / "artifact"
    info = build_artifact_dir(src, rank)
    files = [src / f for f in info["files"]]
    bucket = "rtdmd-bench"
    store_pub, store_fetch, raw_put, raw_get = [], [], [], []
    with local_s3_server() as endpoint, patched_env(s3_env(endpoint)):
        create_bucket(endpoint, bucket)
        c = client(endpoint)
        cfg = store._transfer_config()

        def clear(prefix):
            for o in c.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
                c.delete_object(Bucket=bucket, Key=o["Key"])

        c.put_object(Bucket=bucket, Key="warmup", Body=b"x" * 1024)  # connection + server warm-up
        c.get_object(Bucket=bucket, Key="warmup")["Body"].read()
        local_hash, client_new = [], []
        for r in range(1, rounds + 1):
            uri = f"s3://{bucket}/store/{r}"
            cache = tmp / f"cache{r}"
            t0 = time.perf_counter()
            store.publish_dir(src, uri, {"kind": "rtdmd-lora", "stage": "bench"})
            t1 = time.perf_counter()
            path = store.fetch_dir(uri, cache)
            t2 = time.perf_counter()
            assert (path / "generator" / "pytorch_lora_weights.safetensors").stat().st_size > 0
            shutil.rmtree(cache, ignore_errors=True)
            clear(f"store/{r}")
            dl = tmp / f"raw{r}"
            for f in files:
                (dl / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            t3 = time.perf_counter()
            with ThreadPoolExecutor(store.MAX_CONCURRENCY) as pool:
                list(pool.map(lambda f: c.upload_file(str(f), bucket, f"raw/{r}/{f.relative_to(src)}", Config=cfg),
                              files))
            t4 = time.perf_counter()
            with ThreadPoolExecutor(store.MAX_CONCURRENCY) as pool:
                list(pool.map(lambda f: c.download_file(bucket, f"raw/{r}/{f.relative_to(src)}",
                                                        str(dl / f.relative_to(src)), Config=cfg), files))
            t5 = time.perf_counter()
            shutil.rmtree(dl, ignore_errors=True)
            clear(f"raw/{r}")
            # where the store's extra time goes: the sha256 of every file (on publish and on fetch)
            from rtdmd.artifacts.fs import sha256_files

            t7 = time.perf_counter()
            sha256_files(files)
            t8 = time.perf_counter()
            store.s3_client()  # the store builds a fresh boto3 client per call (publish, fetch)
            t9 = time.perf_counter()
            local_hash.append(t8 - t7)
            client_new.append(t9 - t8)
            store_pub.append(t1 - t0)
            store_fetch.append(t2 - t1)
            raw_put.append(t4 - t3)
            raw_get.append(t5 - t4)
    shutil.rmtree(tmp, ignore_errors=True)
    st_tot = [a + b for a, b in zip(store_pub, store_fetch)]
    raw_tot = [a + b for a, b in zip(raw_put, raw_get)]
    mb = info["artifact_bytes"] / 2 ** 20
    s, rr = stats(st_tot), stats(raw_tot)
    ratio = s["median"] / rr["median"]
    rows = [
        {"path": "rtdmd.artifacts.store", "publish s (median)": stats(store_pub)["median"],
         "fetch s (median)": stats(store_fetch)["median"], "publish+fetch s (median)": s["median"],
         "publish+fetch s (min)": s["min"], "MiB/s (round trip, median)": 2 * mb / s["median"]},
        {"path": "raw boto3, files in parallel", "publish s (median)": stats(raw_put)["median"],
         "fetch s (median)": stats(raw_get)["median"], "publish+fetch s (median)": rr["median"],
         "publish+fetch s (min)": rr["min"], "MiB/s (round trip, median)": 2 * mb / rr["median"]},
    ]
    diag = {"sha256_all_files_s_median": stats(local_hash)["median"],
            "boto3_client_creation_s_median": stats(client_new)["median"],
            "store_minus_raw_s_median": s["median"] - rr["median"]}
    return {"title": "Artifact throughput", "metric": "store publish+fetch ÷ raw boto3 put+get (median)",
            "value": ratio, "ratio_min": s["min"] / rr["min"], "target": f"≤ {TARGET}", "met": ratio <= TARGET,
            "threads": None, "repeats": rounds, "table": rows, "diagnostics": diag,
            "finding": finding_text(diag),
            "artifact": {"rank": rank, "adapted_layers": info["layers"], "lora_numel_per_adapter": info["numel"],
                         "bytes_per_adapter_formula": info["bytes"], "artifact_bytes_on_disk": info["artifact_bytes"],
                         "adapter_shapes_in_out": info["shapes"]},
            "notes": [f"artifact: generator + fake_score rank-{rank} LoRA on FLUX.2-klein 4B targets, "
                      f"{info['layers']} Linear layers, Σ r·(in+out) = {info['numel']:,} params = "
                      f"{info['bytes'] / 1e6:.1f} MB fp32 per adapter, {info['artifact_bytes'] / 1e6:.1f} MB on disk",
                      "local moto server on 127.0.0.1 (in-memory), same TransferConfig for both paths; "
                      "both move all files concurrently (store: boto3 transfer manager, raw: thread pool)",
                      overhead_note(diag)]}


def main(argv=None) -> int:
    from bench.common import item_main

    return item_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
