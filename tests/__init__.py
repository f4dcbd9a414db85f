"""Tests in two tiers: unit/ (no Ray cluster, no DeepSpeed engine; about 1.5 minutes) and
e2e/ (Ray, DeepSpeed, `ray job submit`, the scripts). Shared fixtures: conftest.py."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The default config's sizes for e2e runs that test something else (faults, plug-ins, signals,
# `ray job submit`): 2 prompts per worker instead of 8, 2 validation prompts instead of 16. The
# default config itself runs as shipped in test_end_to_end.py's module run.
LIGHT = ("train.batch_size=2", "run.validation_size=2")
