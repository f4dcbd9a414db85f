"""run.metrics hooks: loaded by import path, called on every rollout's images, and refused
with a message naming the hook when they return something the log cannot average."""

import pytest
import torch

from longalign_rl.hooks import load_metric_hooks, run_metric_hooks

IMAGES = torch.rand(3, 3, 8, 8)
PROMPTS = ["a", "b", "c"]


def brightness(images, prompts):
    return {"bright": images.mean(dim=(1, 2, 3)), "words": torch.tensor([float(len(p.split())) for p in prompts])}


def wrong_shape(images, prompts):
    return {"bright": images.mean()}


def not_a_dict(images, prompts):
    return [1.0, 2.0, 3.0]


def raises(images, prompts):
    raise RuntimeError("OCR model not found")


def test_hooks_load_by_import_path_and_give_one_value_per_sample():
    hooks = load_metric_hooks([f"{__name__}:brightness"])
    stats = run_metric_hooks(hooks, IMAGES, PROMPTS)
    assert set(stats) == {"bright", "words"}
    torch.testing.assert_close(stats["bright"], IMAGES.mean(dim=(1, 2, 3)))
    assert stats["words"].tolist() == [1.0, 1.0, 1.0]


def test_bad_hooks_are_named():
    with pytest.raises(ValueError, match=r"run.metrics\[1\] 'tests.nowhere:f': cannot import module"):
        load_metric_hooks([f"{__name__}:brightness", "tests.nowhere:f"])
    with pytest.raises(ValueError, match=r"run.metrics\[0\] .*no attribute 'IMAGE'"):
        load_metric_hooks([f"{__name__}:IMAGE"])
    with pytest.raises(TypeError, match=r"wrong_shape'.*'bright' must be a tensor of shape \[3\], got \(\)"):
        run_metric_hooks(load_metric_hooks([f"{__name__}:wrong_shape"]), IMAGES, PROMPTS)
    with pytest.raises(TypeError, match="not_a_dict' returned list"):
        run_metric_hooks(load_metric_hooks([f"{__name__}:not_a_dict"]), IMAGES, PROMPTS)
    twice = load_metric_hooks([f"{__name__}:brightness", f"{__name__}:brightness"])
    with pytest.raises(ValueError, match="'bright' is also logged by another hook"):
        run_metric_hooks(twice, IMAGES, PROMPTS)
    with pytest.raises(ValueError, match="'words' is also logged by the algorithm"):
        run_metric_hooks(load_metric_hooks([f"{__name__}:brightness"]), IMAGES, PROMPTS, reserved={"loss", "words"})
