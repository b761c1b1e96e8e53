"""A run's training metrics as Ray metrics (`ray.util.metrics`), exported by rank 0.

Ray's metrics agent on each node serves them to Prometheus (the node's --metrics-export-port, names prefixed
`ray_`), and the dashboard's Metrics view shows them through Grafana. Every series carries the brain and run
name as tags. They follow the metrics log (metrics.jsonl), which keeps every record:

  aios_train_loss            the last step's loss (the ACT objective: LM + Q-halt + Q-continue + aux)
  aios_train_lm_loss         its language-model part
  aios_train_tokens_per_s    segment tokens per second of the last step, over all workers
  aios_train_segments        ACT segments per sample, averaged over the samples that halted in the last step
  aios_train_step            the step the run has reached
  aios_eval_loss             the last evaluation's loss (and aios_eval_perplexity)
  aios_train_restarts        worker-group restarts of this job (Ray Train retries after a worker failure)
  aios_train_world_size      workers of the current worker group (an elastic job's size changes)
"""

from __future__ import annotations

from ray.util.metrics import Gauge

TAG_KEYS = ("brain", "run")

# (metric, description, the step record's field)
_STEP_GAUGES = (
    ("aios_train_loss", "Training loss of the last step (LM + Q-halt + Q-continue + aux).", "loss"),
    ("aios_train_lm_loss", "Language-model loss of the last step.", "lm_loss"),
    ("aios_train_tokens_per_s", "Segment tokens per second of the last step, all workers.", "tokens_per_s"),
    ("aios_train_segments", "ACT segments per halted sample in the last step.", "segments"),
    ("aios_train_step", "The step the run has reached.", "step"),
)
_EVAL_GAUGES = (
    ("aios_eval_loss", "Loss of the last evaluation.", "loss"),
    ("aios_eval_perplexity", "Perplexity of the last evaluation.", "perplexity"),
)


class RayMetrics:
    """Called with every metrics-log record: sets the gauges a step or an eval record carries."""

    def __init__(self, brain: str, run: str | None, *, restarts: int, world_size: int):
        tags = {"brain": brain, "run": run or ""}

        def gauge(name: str, description: str) -> Gauge:
            metric = Gauge(name, description=description, tag_keys=TAG_KEYS)
            metric.set_default_tags(tags)
            return metric

        self.step = [(gauge(name, text), field) for name, text, field in _STEP_GAUGES]
        self.eval = [(gauge(name, text), field) for name, text, field in _EVAL_GAUGES]
        # Set again with every step: Ray exports a gauge's value for the interval it was set in, not after.
        self.constant = [(gauge("aios_train_restarts", "Worker-group restarts of this job after worker failures."),
                          float(restarts)),
                         (gauge("aios_train_world_size", "Workers of the current worker group."), float(world_size))]

    def __call__(self, record: dict) -> None:
        gauges = {"step": self.step, "eval": self.eval}.get(record.get("event"), ())
        if record.get("event") == "step":
            for metric, value in self.constant:
                metric.set(value)
        for metric, field in gauges:
            value = record.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metric.set(float(value))
