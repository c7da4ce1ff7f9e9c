"""Glue between the Metaflow flow (``flows/rtdmd_flow.py``) and the trainers.

* :mod:`rtdmd.pipeline.profiles` — compute profiles (``local`` / ``kubernetes``) chosen by the
  flow's ``deploy`` Config; a FlowMutator turns them into step decorators.
* :mod:`rtdmd.pipeline.launch` — run ``python -m rtdmd.train`` / ``rtdmd.eval`` under torchrun,
  stream the logs, fail with the worker's error.
* :mod:`rtdmd.pipeline.artifacts` — artifact-root layout keyed by logical (origin) run and stage.
* :mod:`rtdmd.pipeline.tracking` — MLflow parent / stage / evaluation runs.
* :mod:`rtdmd.pipeline.preflight` — fail before training when params, URIs or services are wrong.

Nothing here imports torch or Metaflow at module import time (flow steps stay light).
"""
