"""Default locations, relative to the working directory (the repository root in the README's commands)."""

DEFAULT_BUNDLE_DIR = "artifacts/brains/actv1"  # <bundle-dir>/<brain-name>/ is a brain bundle
DEFAULT_EXPERTS_DIR = "artifacts/experts"  # <experts-dir>/<expert-id>/ is an expert (expert training)
DEFAULT_DATA_CACHE_DIR = "artifacts/prepared_data"  # <cache-dir>/<fingerprint[:16]>/ is a prepared dataset

# A name under --bundle-dir that starts with this is never a brain: staging copies live under such names
# (`.name.staging-*`, aios.atomic), so `aios brains list` skips them and no brain may be named that way.
HIDDEN_PREFIX = "."

# A bundle's model files (aios.models.hrm_act_v1 writes and reads them; here so that code which only looks at
# bundles, `aios brains list/push/pull`, need not import torch).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
