"""The device load path (docs/gpu.md): Triton kernels, each with a torch reference, and the pipelined
loader that streams a weights file to a device (CPU decodes, device copies and regroups)."""

from tinyserve.kernels.loader import (
    DeviceLoadStats,
    Engine,
    StagingPool,
    default_pool,
    load_to_device,
    plan_batches,
    release_pools,
)
from tinyserve.kernels.planes import merge_planes, merge_planes_torch, merge_planes_triton, triton_usable

__all__ = ["DeviceLoadStats", "Engine", "StagingPool", "default_pool", "load_to_device", "merge_planes",
           "merge_planes_torch", "merge_planes_triton", "plan_batches", "release_pools", "triton_usable"]
