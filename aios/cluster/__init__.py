"""The Ray Train job: everything that imports ray lives in this package; the worker loop never does.

`run_on_ray(config, bundle)` runs `aios.train.loop.Trainer` inside a `ray.train.torch.TorchTrainer` worker,
with a `RaySession` (aios/cluster/session.py) in place of the in-process `LocalSession`. `aios.cluster.submit`
sends a run to a remote cluster as a Ray job (`aios submit`, `aios jobs`); importing it does not import torch.
"""

from __future__ import annotations

__all__ = ["run_on_ray"]


def __getattr__(name: str):
    if name == "run_on_ray":  # on first use: it imports torch and Ray Train
        from aios.cluster.job import run_on_ray

        return run_on_ray
    raise AttributeError(f"module 'aios.cluster' has no attribute {name!r}")
