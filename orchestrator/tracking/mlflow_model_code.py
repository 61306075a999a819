"""The MLflow model of a trained network, as "models from code": run by MLflow when a model is loaded, never imported.

A model is logged as its state dict (`weights.pt`, read back with `torch.load(weights_only=True)`) and its
architecture (`spec.json`: the model spec, input shape and class count), plus this file. Loading
rebuilds the network with `orchestrator.train.models.build_model` and loads the weights: no pickled code
runs, unlike `mlflow.pytorch`'s default format (and its warning about it). `tracking.load_torch_model`
returns the `torch.nn.Module`; `mlflow.pyfunc.load_model(uri).predict(images)` gives logits for float
(N, C, H, W) inputs already normalised as in training.
"""

import json

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class TorchStateDictModel(PythonModel):
    def load_context(self, context) -> None:
        import torch

        from orchestrator.config import ModelSpec
        from orchestrator.train.models import build_model

        with open(context.artifacts["spec"]) as handle:
            meta = json.load(handle)
        self.model = build_model(ModelSpec.from_record(meta["spec"]), tuple(meta["input_shape"]), int(meta["num_classes"]))
        self.model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.model.eval()

    def predict(self, context, model_input: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


mlflow.models.set_model(TorchStateDictModel())
