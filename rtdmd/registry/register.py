"""Register a trained LoRA stack as a new version of ``rtdmd-<backbone>`` with alias ``candidate``.

A version is an MLflow pyfunc model (:mod:`rtdmd.registry.pyfunc`) logged with the source run
(``models:/<model_id>``, named ``rtdmd-<backbone>-<sha12>``, linked to the run as its output),
and the model version's source is that logged model. Its RTDMD files are the model's
``artifacts/rtdmd/``::

    rtdmd_model.json        format, backbone, family, base model id + revision (+ generator init),
                            stacking order (stage, directory, manifest sha256, original URI),
                            sampler settings (NFE, step list, sigmas, eta, guidance), params hash,
                            lineage (flow pathspec, runs), evaluation summary
    params.yaml             the resolved params the stack was trained with (rebuilds the backbone)
    stack/00-cold_start/    the published LoRA artifacts, oldest first, unchanged: generator/ (and
    stack/01-rl/            fake_score/) in the diffusers layout + the artifact's manifest.json
    eval_summary.json       the evaluation record (rtdmd.registry.evaluation), when evaluated
    README.md               how to load it

Version tags: ``rtdmd.backbone``, ``rtdmd.stage``, ``rtdmd.stack``, ``rtdmd.artifact_uri``,
``rtdmd.manifest_sha256``, ``rtdmd.base_model``, ``rtdmd.base_revision``, ``rtdmd.sampler``,
``rtdmd.params_hash``, ``rtdmd.eval`` (JSON) + ``eval.<reward>`` (candidate scores), and the
lineage (``metaflow.pathspec``, ``rtdmd.flow.parent_run_id``, ...). The evaluation summary is
also in the version description and on the logged model (tags ``eval.<reward>``, metrics
``eval/<reward>``).

Registration is idempotent: the same final artifact (manifest sha256) registered again from the
same source run (a resumed flow re-running ``register``) reuses its version.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import yaml

from rtdmd.artifacts.fs import ArtifactError
from rtdmd.config import load_params, params_hash
from rtdmd.config.schema import Params
from rtdmd.config.typed import from_mapping, to_mapping
from rtdmd.registry import evaluation as E
from rtdmd.registry.client import connect, get_version, model_name, parse_ref, resolve_tracking_uri
from rtdmd.registry.constants import ARTIFACT_KEY, CANDIDATE, FORMAT, MODEL_FILE
from rtdmd.registry.errors import RegistryError
from rtdmd.registry.load import resolve_model
from rtdmd.tracking import Tracker, experiment_name


def _params(params: Any, backbone: str | None):
    if isinstance(params, Params):
        return params
    if isinstance(params, Mapping):
        return from_mapping(Params, params, source="<registered params>")
    if params is not None:
        return load_params(params)
    if not backbone:
        raise RegistryError("register_candidate needs params or a backbone name")
    return load_params(backbone)


def _readme(name: str, version_hint: str, info: Mapping[str, Any]) -> str:
    stack = " -> ".join(s["stage"] for s in info["stack"])
    return (f"# {name} (RTDMD LoRA stack: {stack})\n\n"
            f"Base model `{info['base_model']['id']}` (revision {info['base_model'].get('revision') or 'n/a'}); "
            f"sampler: {info['sampler'].get('nfe')} steps {info['sampler'].get('step_list')}, "
            f"eta {info['sampler'].get('eta')}, guidance {info['sampler'].get('guidance')}.\n\n"
            "```python\nfrom rtdmd.registry import load_registered\n"
            f"m = load_registered(\"models:/{name}@champion\")   # or {version_hint}\n"
            "x = m.generate([\"a prompt\"], seed=0)             # images in [0, 1] (toy2d: points)\n```\n\n"
            "The adapters under `stack/` are merged into the base weights in directory order; each is a "
            "diffusers-layout LoRA (`pipe.load_lora_weights(stack/NN-stage/generator)`).\n")


def _description(stack: str, base: Any, record: Mapping[str, Any] | None) -> str:
    """The version description: what it is, and its evaluation summary (shown in the registry UI)."""
    text = f"RTDMD {stack} LoRA stack on {base} (pyfunc: mlflow.pyfunc.load_model(...).predict([prompts]))"
    if record:
        cold = (record.get("cold_start") or {}).get("scores") or {}
        scores = ", ".join(f"{r} {v:.4g}" + (f" (cold start {cold[r]:.4g})" if r in cold else "")
                           for r, v in sorted(record["candidate"]["scores"].items()))
        text += f". Evaluation ({record['candidate'].get('variant')}): {scores}"
    return text


def _set_evaluation(client, mv, record: Mapping[str, Any]) -> None:
    """Record ``record`` on a version: its tags + description, and its logged model (if any)."""
    from rtdmd.registry.pyfunc import model_id_of, record_on_logged_model  # lazy: mlflow.pyfunc

    client.set_model_version_tag(mv.name, mv.version, E.TAG, E.tag_value(record))
    for r, v in record["candidate"]["scores"].items():
        client.set_model_version_tag(mv.name, mv.version, f"eval.{r}", f"{v:.6g}")
    tags = mv.tags or {}
    client.update_model_version(mv.name, mv.version, _description(tags.get("rtdmd.stack", "?"),
                                                                  tags.get("rtdmd.base_model", "?"), record))
    if model_id_of(mv):
        record_on_logged_model(client, model_id_of(mv), mv.run_id, record)
        client.set_logged_model_tags(model_id_of(mv), {"mlflow.note.content": client.get_model_version(
            mv.name, mv.version).description or ""})


def _find_existing(client, name: str, sha: str, run_id: str | None):
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        if tags.get("rtdmd.manifest_sha256") == sha and (run_id is None or mv.run_id == run_id):
            return mv
    return None


def register_candidate(*, artifact_uri: str, params: Any = None, backbone: str | None = None,
                       evaluation: Mapping[str, Any] | None = None, cold_start_uri: str | None = None,
                       tracking_uri: str | None = None, run_id: str | None = None, experiment: str | None = None,
                       lineage: Mapping[str, Any] | None = None, alias: str | None = CANDIDATE,
                       description: str | None = None, candidate_variant: str | None = None,
                       cold_start_variant: str | None = None) -> dict[str, Any]:
    """Register the LoRA stack ending in ``artifact_uri`` as a new version; returns
    ``{name, version, uri, alias, run_id, source, evaluated}``.

    ``params``: a :class:`Params`, a params mapping, a backbone name or None (``backbone``'s params
    file). ``evaluation``: a matrix summary or evaluation record (see
    :func:`rtdmd.registry.evaluation.build_evaluation`); without one the version is registered but
    cannot be promoted by the gates until an evaluation is recorded. ``run_id``: the MLflow run that
    owns the files (the flow's parent run); None creates a ``register`` run in ``experiment``
    (default ``rtdmd-<backbone>``).
    """
    from rtdmd.lora.artifact import stack_chain  # lazy: torch (registry queries stay light)
    from rtdmd.registry.pyfunc import link_version, log_version_model, using_tracking_uri  # lazy: mlflow.pyfunc

    p = _params(params, backbone)
    try:
        chain = stack_chain(str(artifact_uri), backbone=p.name)
    except (ArtifactError, OSError, ValueError) as exc:
        raise RegistryError(f"cannot register {artifact_uri}: {exc}") from None
    final = chain[-1]
    shas = [a.manifest_sha256 for a in chain]
    if cold_start_uri and len(chain) > 1 and str(chain[0].uri) != str(cold_start_uri):
        raise RegistryError(f"{artifact_uri} stacks on {chain[0].uri}, not on the given cold start {cold_start_uri}")
    record = E.build_evaluation(evaluation, stack_shas=shas, candidate_variant=candidate_variant,
                                cold_start_variant=cold_start_variant) if evaluation else None
    name = model_name(p)
    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={"rtdmd.backbone": p.name},
                                       description=f"RTDMD LoRA stacks for backbone {p.name} (aliases: candidate, champion)")
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise RegistryError(f"cannot create registered model {name}: {exc}") from None

    existing = _find_existing(client, name, shas[-1], run_id) if run_id else None
    if existing is not None:
        version = existing.version
        if record is not None:
            _set_evaluation(client, existing, record)
        src_run, source = existing.run_id, existing.source
    else:
        m = final.manifest
        sampler = dict(m.get("sampler") or {"nfe": len(p.sampler.step_list), "step_list": list(p.sampler.step_list),
                                              "eta": p.sampler.eta, "guidance": p.sampler.guidance})
        base = dict(m.get("base_model") or {"id": p.model.pretrained, "revision": p.model.revision,
                                             "generator_init": p.model.generator_init})
        info: dict[str, Any] = {
            "format": FORMAT, "backbone": p.name, "family": p.model.family, "base_model": base,
            "stack": [{"order": i, "stage": a.manifest.get("stage", f"stage{i}"),
                       "dir": f"stack/{i:02d}-{a.manifest.get('stage', f'stage{i}')}",
                       "manifest_sha256": a.manifest_sha256, "source_uri": str(a.uri),
                       "rank": a.adapters["generator"].rank, "alpha": a.adapters["generator"].alpha}
                      for i, a in enumerate(chain)],
            "sampler": sampler, "params_hash": params_hash(p), "config_hash": m.get("config_hash"),
            "data_version": m.get("data_version"), "lineage": dict(lineage or {}),
            "evaluation": {k: v for k, v in (record or {}).items() if k != "variants"} or None,
            "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        sha12 = shas[-1][:12]
        with tempfile.TemporaryDirectory(prefix="rtdmd-register-") as tmp:
            root = Path(tmp) / ARTIFACT_KEY
            root.mkdir()
            for entry, art in zip(info["stack"], chain):
                shutil.copytree(art.path, root / entry["dir"])
            (root / "params.yaml").write_text(yaml.safe_dump(to_mapping(p), sort_keys=False))
            (root / MODEL_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
            if record is not None:
                (root / "eval_summary.json").write_text(json.dumps(record, indent=2, sort_keys=True))
            (root / "README.md").write_text(_readme(name, f"models:/{name}/<version>", info))
            created_run = run_id is None
            if created_run:
                tr = Tracker(uri, experiment or experiment_name(p.name))
                run = client.create_run(tr.experiment_id, run_name=f"register:{final.manifest.get('stage', 'lora')}",
                                        tags={"rtdmd.kind": "register", "rtdmd.backbone": p.name,
                                              "rtdmd.artifact_uri": str(artifact_uri)})
                src_run = run.info.run_id
            else:
                src_run = run_id
            try:
                model_id = log_version_model(client, uri, root, experiment_id=client.get_run(src_run).info.experiment_id,
                                             run_id=src_run, params=p, info=info, record=record,
                                             name=f"{name}-{sha12}")
            except Exception as exc:  # noqa: BLE001 - artifact store problems
                if created_run:
                    client.set_terminated(src_run, "FAILED")
                raise RegistryError(f"cannot log the model of {name} to run {src_run}: {exc}") from None
            if created_run:
                client.set_terminated(src_run, "FINISHED")
        source = f"models:/{model_id}"
        tags = {
            "rtdmd.backbone": p.name, "rtdmd.stage": final.manifest.get("stage", ""),
            "rtdmd.stack": ">".join(e["stage"] for e in info["stack"]), "rtdmd.artifact_uri": str(artifact_uri),
            "rtdmd.manifest_sha256": shas[-1], "rtdmd.base_model": str(base.get("id")),
            "rtdmd.base_revision": str(base.get("revision") or ""), "rtdmd.params_hash": info["params_hash"],
            "rtdmd.sampler": json.dumps(sampler, sort_keys=True, default=str),
            "rtdmd.cold_start_uri": str(cold_start_uri or (chain[0].uri if len(chain) > 1 else "")),
        }
        for k, v in (lineage or {}).items():
            if v is not None and str(v) != "":
                tags[str(k)] = str(v)[:5000]
        if record is not None:
            tags[E.TAG] = E.tag_value(record)
            for r, v in record["candidate"]["scores"].items():
                tags[f"eval.{r}"] = f"{v:.6g}"
        try:
            with using_tracking_uri(uri):  # the registry looks the logged model up in the global store
                mv = client.create_model_version(
                    name, source, run_id=src_run, tags=tags, model_id=model_id,
                    description=description or _description(tags["rtdmd.stack"], base.get("id"), record))
        except MlflowException as exc:
            raise RegistryError(f"cannot create a version of {name}: {exc}") from None
        link_version(client, model_id, mv)
        version = mv.version
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    return {"name": name, "version": str(version), "uri": f"models:/{name}/{version}", "alias": alias,
            "run_id": src_run, "source": source, "evaluated": record is not None, "tracking_uri": uri}


def record_evaluation(ref: str, evaluation: Mapping[str, Any], *, tracking_uri: str | None = None,
                      candidate_variant: str | None = None, cold_start_variant: str | None = None) -> dict:
    """Attach (or replace) the evaluation record of a registered version (``rtdmd eval --record``)."""
    mref = parse_ref(ref)
    if not mref.is_registered:
        raise RegistryError(f"{ref} is not a registered version or alias; evaluations are recorded on versions")
    client = connect(tracking_uri)
    mv = get_version(client, mref)
    resolved = resolve_model(mref.uri, tracking_uri=tracking_uri)
    shas = [s["manifest_sha256"] for s in resolved.info.get("stack", [])]
    record = E.build_evaluation(evaluation, stack_shas=shas, candidate_variant=candidate_variant,
                                cold_start_variant=cold_start_variant)
    if record is None:
        raise RegistryError("the evaluation has no scores to record")
    _set_evaluation(client, mv, record)
    return {"name": mv.name, "version": str(mv.version), "evaluation": record}
