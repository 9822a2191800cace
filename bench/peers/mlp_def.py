"""The MLP of tinyserve.examples (float32 64 -> 256 -> 256 -> 10), for the peer servers, which run in
their own virtual environments without tinyserve.  The weights come from the state dict that
bench/peers/run.py saves from tinyserve.examples.mlp(), so every system serves the same numbers."""
import torch


class MLP(torch.nn.Module):
    def __init__(self, d_in=64, hidden=256, d_out=10):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.fc3 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def load(path):
    torch.set_num_threads(1)
    m = MLP()
    m.load_state_dict(torch.load(path, weights_only=True))
    return m.eval()
