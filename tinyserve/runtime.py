"""A loaded model version: weights mapped/decoded, program bound, ready to run.

(The server issue extends this with warm-up, worker threads and lifecycle states.)"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinyserve import errors
from tinyserve.config import ModelConfig
from tinyserve.program import load_export_program, load_python_model
from tinyserve.repository import load_config_dir
from tinyserve.weights import LoadStats, WeightsFile


@dataclass
class LoadedModel:
    config: ModelConfig
    path: Path
    module: torch.nn.Module | None
    weights: dict[str, torch.Tensor]
    weights_stats: LoadStats
    timings: dict[str, float] = field(default_factory=dict)
    hooks: object | None = None  # the python model file's module (preprocess / postprocess)

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor):
        if self.module is None:
            raise errors.ModelError(f"model {self.config.name!r} holds weights only; it has no program to run")
        return self.module(*inputs)


def load_version(version_dir: str | os.PathLike, *, verify: str = "compressed", threads: int | None = None) -> LoadedModel:
    """Load the model version in `version_dir` (a `<root>/<name>/<version>/` directory)."""
    version_dir = Path(version_dir)
    t0 = time.perf_counter()
    config = load_config_dir(version_dir)
    with WeightsFile(version_dir / config.weights) as wf:
        t1 = time.perf_counter()
        weights = wf.load(verify=verify, threads=threads)
        stats = wf.last_load
    t2 = time.perf_counter()
    module, hooks = None, None
    if config.platform == "torch_export":
        module = load_export_program(version_dir, weights, config.program)
    elif config.platform == "python":
        module, hooks = load_python_model(version_dir, weights, config.extra, config.program)
    t3 = time.perf_counter()
    return LoadedModel(config, version_dir, module, weights, stats,
                       {"open_s": t1 - t0, "weights_s": t2 - t1, "program_s": t3 - t2, "total_s": t3 - t0},
                       hooks)
