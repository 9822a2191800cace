"""Built-in example models (used by `tinyserve demo` and the tests).  `tinyserve pack
tinyserve.examples:mlp` packs one; a factory returns (module, example_inputs)."""

from __future__ import annotations

import torch


class MLP(torch.nn.Module):
    """float32 MLP 64 -> 256 -> 256 -> 10, the model of ../shared/PEERS.md."""

    def __init__(self, d_in: int = 64, hidden: int = 256, d_out: int = 10):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.fc3 = torch.nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp(seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    return MLP().eval(), (torch.randn(2, 64),)


class TinyEncoder(torch.nn.Module):
    """A small bf16 transformer-like block: embeddings, attention projections, LayerNorm, and a
    non-persistent buffer (the case that needs ep.constants)."""

    def __init__(self, vocab: int = 1000, d: int = 128):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d)
        self.register_buffer("scale", torch.tensor(d ** -0.5), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        return self.norm(h + self.out(att @ v)).mean(dim=1)


def encoder(seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    return TinyEncoder().eval(), (torch.randint(0, 1000, (2, 16)),)


def encoder_bf16(seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    module, example = encoder(seed)
    return module.to(torch.bfloat16), example
