"""Triton python-backend model serving tinyserve.examples' MLP (float32 64 -> 256 -> 256 -> 10) for
bench/bench_oip.py.  The weights are the state dict bench_oip.py saves from tinyserve.examples.mlp()
into this version directory (mlp.pt), so both servers answer with the same numbers.  One torch thread,
inference mode.  With dynamic batching Triton hands execute() several requests: their rows are run
as one batch and the result split back by row counts.  It runs in the Triton virtualenv (torch,
numpy < 2): bench_oip.py starts tritonserver with that venv's bin/ first on PATH, which is how the
python-backend stub (an embedded, isolated interpreter) finds its prefix."""
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class MLP(torch.nn.Module):
    def __init__(self, d_in=64, hidden=256, d_out=10):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.fc3 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(1)
        here = os.path.join(args["model_repository"], args["model_version"])
        m = MLP()
        m.load_state_dict(torch.load(os.path.join(here, "mlp.pt"), weights_only=True))
        self.model = m.eval()

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        with torch.inference_mode():
            if len(xs) == 1:
                outs = [self.model(torch.from_numpy(xs[0])).numpy()]
            else:
                y = self.model(torch.from_numpy(np.concatenate(xs))).numpy()
                outs, at = [], 0
                for x in xs:
                    outs.append(y[at:at + x.shape[0]])
                    at += x.shape[0]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("output0", np.ascontiguousarray(o))])
                for o in outs]
