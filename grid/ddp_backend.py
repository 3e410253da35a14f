"""A patch of Ray's private torch backend (``ray.train.torch.config._TorchBackend``): the DDP process-group
backend follows what the workers' torch sees. Runs in the Ray Train workers' group set-up; kept on its own
so that a Ray upgrade that moves the private class breaks one small file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend


def _cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


class _DeviceBackend(_TorchBackend):
    """Ray's torch backend, choosing the DDP backend from what the workers' torch sees: NCCL when every
    worker has CUDA, gloo otherwise. Ray's own rule (NCCL whenever GPUs are requested) breaks on nodes
    whose GPUs Ray schedules but CUDA cannot use (logical GPUs of a test cluster, a node with a broken
    driver): NCCL refuses to start there, gloo trains on the CPU device that ``get_device()`` returns."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        cuda = all(worker_group.execute(_cuda_usable))
        super().on_start(worker_group, dataclasses.replace(backend_config, backend="nccl" if cuda else "gloo"))


@dataclass
class DeviceTorchConfig(TorchConfig):
    """``TorchConfig`` whose process-group backend follows the workers' devices (:class:`_DeviceBackend`)."""

    @property
    def backend_cls(self) -> type:
        return _DeviceBackend
