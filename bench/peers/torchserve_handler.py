"""TorchServe custom handler for the MLP: body {"x": [[64 floats], ...]} -> {"y": [[10 floats], ...]}.
One request per call (no batching configured), one torch thread, inference mode."""
import json
import os

import torch

_model = None


def handle(data, context):
    global _model
    if _model is None:
        import sys

        model_dir = context.system_properties.get("model_dir")
        sys.path.insert(0, model_dir)
        import mlp_def

        _model = mlp_def.load(os.path.join(model_dir, "mlp.pt"))
    if data is None:
        return None
    out = []
    for row in data:
        body = row.get("body") or row.get("data")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        x = torch.tensor(body["x"], dtype=torch.float32)
        with torch.inference_mode():
            y = _model(x)
        out.append({"y": y.tolist()})
    return out
