"""LitServe serving the MLP: POST /predict {"x": [[64 floats], ...]} -> {"y": [[10 floats], ...]}.
    .venv-litserve/bin/python litserve_mlp.py WEIGHTS.pt PORT
No batching (one request per predict), one worker, CPU, one torch thread, inference mode."""
import os
import sys

import litserve as ls
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlp_def  # noqa: E402


class MLPAPI(ls.LitAPI):
    def setup(self, device):
        self.model = mlp_def.load(sys.argv[1])

    def decode_request(self, request):
        return torch.tensor(request["x"], dtype=torch.float32)

    def predict(self, x):
        with torch.inference_mode():
            return self.model(x)

    def encode_response(self, output):
        return {"y": output.tolist()}


if __name__ == "__main__":
    server = ls.LitServer(MLPAPI(), accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=int(sys.argv[2]), num_api_servers=1, log_level="warning",
               generate_client_file=False)
