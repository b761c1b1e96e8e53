"""Default locations, relative to the working directory (the repository root in the README's commands)."""

DEFAULT_BUNDLE_DIR = "artifacts/brains/actv1"  # <bundle-dir>/<brain-name>/ is a brain bundle
DEFAULT_DATA_CACHE_DIR = "artifacts/prepared_data"  # <cache-dir>/<fingerprint[:16]>/ is a prepared dataset

# A name under --bundle-dir that starts with this is never a brain: staging copies live under such names
# (`.name.staging-*`, aios.atomic), so `aios brains list` skips them and no brain may be named that way.
HIDDEN_PREFIX = "."
