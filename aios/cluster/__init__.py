"""The Ray Train job: everything that imports ray lives in this package; the worker loop never does.

`run_on_ray(config, bundle)` runs `aios.train.loop.Trainer` inside a `ray.train.torch.TorchTrainer` worker,
with a `RaySession` (aios/cluster/session.py) in place of the in-process `LocalSession`.
"""

from aios.cluster.job import run_on_ray

__all__ = ["run_on_ray"]
