"""Glue between the Metaflow flow (``flows/rtdmd_flow.py``) and the trainers.

* :mod:`rtdmd.pipeline.context` — the typed :class:`RunContext` ``start`` builds and every step reads.
* What each step does: :mod:`~rtdmd.pipeline.plan` (``start``: parse, validate, check services,
  MLflow parent run), :mod:`~rtdmd.pipeline.training` (model assets, prompt prep, torchrun stages),
  :mod:`~rtdmd.pipeline.evaluation` (matrix rows, one evaluation per variant, merge),
  :mod:`~rtdmd.pipeline.registration` (final artifact, registry ``candidate``, where to look).
* :mod:`rtdmd.pipeline.profiles` — compute profiles (``local`` / ``kubernetes``) chosen by the
  flow's ``deploy`` Config; a FlowMutator turns them into step decorators.
* :mod:`rtdmd.pipeline.launch` — run ``python -m rtdmd.train`` / ``rtdmd.eval`` under torchrun,
  stream the logs, fail with the worker's error.
* :mod:`rtdmd.pipeline.artifacts` — artifact-root layout keyed by logical (origin) run and stage.
* MLflow parent / stage / evaluation runs: :mod:`rtdmd.tracking` (below this layer, shared with the registry).
* :mod:`rtdmd.pipeline.preflight` — fail before training when params, URIs or services are wrong.

Nothing here imports torch or Metaflow at module import time (flow steps stay light).
"""
