"""The MLflow "model from code" of a registered RTDMD version: :func:`mlflow.pyfunc.log_model`
copies this file into the logged model and :func:`mlflow.pyfunc.load_model` runs it, so loading
a version unpickles nothing (the model class lives in :mod:`rtdmd.registry.pyfunc`, which must be
importable where the model is loaded)."""
from mlflow.models import set_model

from rtdmd.registry.pyfunc import RtdmdPyfuncModel

set_model(RtdmdPyfuncModel())
