"""The reward registry: built-ins through entry points, names, import paths, and clear errors."""

import pytest
import torch

from longalign_rl import registry
from longalign_rl.registry import get_reward, list_rewards, register_reward
from rewards.decomposed import ClipTypeReward
from tests.plugins.my_reward import MyReward

BUILT_INS = {"clip", "pickscore", "hpsv2", "tiny_clip", "tiny_openclip", "shapes_checker"}
IMAGES = torch.full((2, 3, 8, 8), 0.5)


@pytest.fixture(autouse=True)
def fresh_registry():
    """Every test starts and ends with no registrations and unread entry points."""
    registry._reset()
    yield
    registry._reset()


def fake_distribution(root, entry_points: str, group: str = "longalign_rl.rewards") -> None:
    """An installed distribution "fake-plugin" whose only content is its entry points."""
    info = root / "fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + entry_points)


def test_built_ins_are_found_through_entry_points():
    # Nothing registers in code after _reset(), so these can only come from the entry points.
    assert BUILT_INS <= set(list_rewards())
    reward = get_reward("tiny_openclip")
    assert isinstance(reward, ClipTypeReward) and reward.differentiable is True


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown reward 'no_such_reward'") as info:
        get_reward("no_such_reward")
    assert all(name in str(info.value) for name in BUILT_INS)


def test_registered_reward_is_listed_and_built_with_kwargs():
    register_reward("brightness", MyReward)
    assert "brightness" in list_rewards()
    out = get_reward("brightness", scale=2.0)(IMAGES, ["a", "b"])
    torch.testing.assert_close(out.total, torch.ones(2))


def test_duplicate_names_are_errors():
    register_reward("brightness", MyReward)
    with pytest.raises(ValueError, match="'brightness' is already registered"):
        register_reward("brightness", MyReward)
    # A built-in entry point also holds its name, and the error says whose it is.
    with pytest.raises(ValueError, match="'tiny_clip' is already declared.*longalign-rl"):
        register_reward("tiny_clip", MyReward)


def test_import_path_builds_a_third_party_reward():
    reward = get_reward("tests.plugins.my_reward:MyReward", scale=3.0)
    torch.testing.assert_close(reward(IMAGES, ["a", "b"]).total, torch.full((2,), 1.5))


@pytest.mark.parametrize(
    "path, why",
    [
        ("tests.plugins.not_there:MyReward", "cannot import module"),
        ("tests.plugins.my_reward:NotThere", "no attribute"),
    ],
)
def test_bad_import_path_names_the_path(path, why):
    with pytest.raises(ValueError, match=why) as info:
        get_reward(path)
    assert repr(path) in str(info.value)


def test_rejected_keyword_names_reward_and_keyword():
    with pytest.raises(TypeError, match="reward 'tiny_clip'.*'colour'"):
        get_reward("tiny_clip", colour="red")
    with pytest.raises(TypeError, match="reward 'tests.plugins.my_reward:MyReward'.*'scael'"):
        get_reward("tests.plugins.my_reward:MyReward", scael=2.0)
    # A keyword the reward knows, with a value it refuses.
    with pytest.raises(ValueError, match="reward 'tiny_openclip'.*direction must be one of"):
        get_reward("tiny_openclip", direction="sideways")


def test_factory_that_returns_no_reward_is_an_error():
    with pytest.raises(TypeError, match="returned int, which is not a reward"):
        get_reward("tests.plugins.my_reward:not_a_reward")


def test_entry_point_of_another_distribution_is_listed_and_built(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "brightness = tests.plugins.my_reward:MyReward\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._reset()  # re-read the entry points with the new distribution on sys.path
    assert "brightness" in list_rewards() and BUILT_INS <= set(list_rewards())
    torch.testing.assert_close(get_reward("brightness", scale=2.0)(IMAGES, ["a", "b"]).total, torch.ones(2))
    with pytest.raises(ValueError, match="'brightness' is already declared.*fake-plugin"):
        register_reward("brightness", MyReward)


def test_entry_point_that_fails_to_load_names_plugin_and_distribution(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "broken = tests.plugins.not_there:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._reset()
    with pytest.raises(RuntimeError, match="reward plugin 'broken' failed to load.*fake-plugin 0.1"):
        get_reward("broken")


def test_two_entry_points_with_one_name_are_an_error(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "tiny_clip = tests.plugins.my_reward:MyReward\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._reset()
    with pytest.raises(ValueError, match="'tiny_clip' is declared twice") as info:
        list_rewards()
    assert "fake-plugin" in str(info.value) and "longalign-rl" in str(info.value)


# ---------------------------------------------------------------- the one resolver


def test_resolver_reads_names_import_paths_paths_and_hub_ids_by_fixed_rules(tmp_path):
    from longalign_rl.registry import Registry, resolve_source

    names = Registry("thing", None, builtins=lambda: {"demo": len})
    assert resolve_source("demo", key="k", names=names).target is len
    imported = resolve_source("tests.plugins.my_reward:MyReward", key="k", names=names)
    assert imported.kind == "import" and imported.target is MyReward
    folder = tmp_path / "model"
    folder.mkdir()
    assert resolve_source(str(folder), key="k", path_kind="folder") == registry.Source("path", str(folder), folder)
    assert resolve_source("org/name", key="k", path_kind="folder", hub_ids=True).kind == "hub"
    # A colon alone does not make an import path, and an existing path is not guessed at.
    with pytest.raises(ValueError, match=r"k: 'C:\\\\data' does not exist; expected .*an existing folder"):
        resolve_source("C:\\data", key="k", path_kind="folder")


def test_resolver_errors_name_the_key_and_what_the_value_may_be(tmp_path):
    from longalign_rl.registry import Registry, resolve_source

    names = Registry("thing", None, builtins=lambda: {"demo": len})
    with pytest.raises(ValueError, match=r"prompts.source: 'dmeo' does not exist; expected a known name \(demo\), "
                                         r"an import path 'package.module:function' or an existing prompt file"):
        resolve_source("dmeo", key="prompts.source", names=names, path_kind="prompt file")
    # The shape of an import path commits to it: a module that does not import is an error,
    # not a file name to look for.
    with pytest.raises(ValueError, match="data.source 'no_such_pkg.mod:fn': cannot import module 'no_such_pkg.mod'"):
        resolve_source("no_such_pkg.mod:fn", key="data.source", path_kind="manifest")
    # Where a key takes no paths, an existing file is no answer.
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="expected an import path"):
        resolve_source(str(tmp_path / "f.txt"), key="run.metrics[0]")


def test_models_resolve_builtins_entry_points_and_import_path_loaders(tmp_path):
    from longalign_rl.models import MODELS, Components, load_components

    assert {"tiny", "sd15-random"} <= set(MODELS.names())
    assert {"shapesworld", "shapesworld-stage1"} <= set(MODELS.names())  # a plugin's entry points
    parts = load_components("tests.plugins.my_reward:tiny_model", seed=3)
    assert isinstance(parts, Components) and not any(p.requires_grad for p in parts.unet.parameters())
    with pytest.raises(TypeError, match="model.pretrained: the loader of 'tests.plugins.my_reward:not_a_model' "
                                        "returned str, not longalign_rl.models.Components"):
        load_components("tests.plugins.my_reward:not_a_model")
    with pytest.raises(TypeError, match="the loader of 'tests.plugins.my_reward:MyReward' must be callable as "
                                        r"loader\(seed=...\)"):
        load_components("tests.plugins.my_reward:MyReward")
    with pytest.raises(ValueError, match=r"model.pretrained: '.*/missing/folder' does not exist; expected a known "
                                         r"name \(.*tiny.*\).* or a hub id 'org/name'"):
        load_components(str(tmp_path / "missing" / "folder"))
    with pytest.raises(ValueError, match="'tiny' is built in"):
        MODELS.register("tiny", lambda seed: None)


# ---------------------------------------------------------------- the driver's probe (issue 10)


@pytest.mark.parametrize("how, error", [
    ("raises", "failed on two test images: RuntimeError: model weights missing"),
    ("nan", "non-finite values"),
    (r"wide", r"total must be a tensor of shape \[2\].*got \[2, 3\]"),
    ("detached", "carries no gradient"),
    ("bad_component", r"components\['part'\] must be a tensor of shape \[2\]"),
    ("not_an_output", "returned Tensor, not a RewardOutput"),
])
def test_the_probe_names_a_reward_that_breaks_the_contract(how, error):
    reward = get_reward("tests.plugins.my_reward:broken", how=how)
    with pytest.raises((TypeError, ValueError), match=rf"reward 'broken-{how}'.*{error}|{error}") as e:
        registry.probe_reward(reward, f"broken-{how}", ["a prompt"], 16)
    assert f"broken-{how}" in str(e.value)


def test_the_probe_passes_working_rewards():
    registry.probe_reward(get_reward("tests.plugins.my_reward:broken"), "ok", ["a", "b", "c"], 16)
    registry.probe_reward(get_reward("tiny_clip"), "tiny_clip", ["a red cube. a blue ball."], 32)


# ---------------------------------------------------------------- algorithms


def test_built_in_algorithms_are_records_found_through_entry_points():
    from longalign_rl.config import load_config
    from longalign_rl.training.deepspeed_config import backward_passes_per_update, updates_per_step

    assert {"reward_backprop", "grpo", "ddpo"} <= set(registry.ALGORITHMS.names())
    rb, grpo, ddpo = (registry.find_algorithm(n) for n in ("reward_backprop", "grpo", "ddpo"))
    assert rb.differentiable_reward and not grpo.differentiable_reward and not ddpo.differentiable_reward
    assert rb.body.endswith(":RewardBackpropBody") and grpo.body == ddpo.body
    cfg = load_config(None, ["algorithm.name=grpo", "sampler.num_steps=10", "algorithm.group_size=2",
                             "algorithm.inner_epochs=3", "train.grad_accum=2", "algorithm.shared_start=true"])
    assert (grpo.group_size(cfg), ddpo.group_size(cfg), rb.group_size(cfg)) == (2, 1, 1)
    assert (grpo.shared_start(cfg), ddpo.shared_start(cfg)) == (True, False)
    assert backward_passes_per_update(cfg) == 2 * 10 and updates_per_step(cfg) == 3
    assert "2 samples per prompt" in grpo.describe(cfg) and "eta 1.0, 10 trained" == grpo.describe_sampling(cfg)


def test_a_third_party_algorithm_by_entry_point_or_import_path():
    """tests/plugins/best_of_group.py's record: found by name once a distribution declares it,
    and by import path; its own checks name the key; the framework reads its numbers."""
    from longalign_rl.config import ConfigError, load_config
    from longalign_rl.console import shown_keys
    from tests.plugins.best_of_group import BEST_OF_GROUP

    path = "algorithm.name=tests.plugins.best_of_group:BEST_OF_GROUP"
    cfg = load_config(None, [path, "algorithm.kwargs={group_size: 4}", "train.batch_size=8"])
    assert registry.algorithm_of(cfg) is BEST_OF_GROUP and cfg.prompts_per_batch == 2
    assert [k for k, _ in shown_keys(cfg, {"reward": 0.1, "best_reward": 0.2, "loss": 1.0, "advantage_zero": 0.5})] \
        == ["reward", "best_reward", "loss"]
    with pytest.raises(ConfigError, match=r"^train.batch_size: 6 is not a multiple of algorithm.kwargs.group_size=4"):
        load_config(None, [path, "algorithm.kwargs={group_size: 4}", "train.batch_size=6"])
    with pytest.raises(ConfigError, match=r"^algorithm.kwargs.size: best_of_group takes only group_size"):
        load_config(None, [path, "algorithm.kwargs={size: 4}"])


def test_an_algorithm_entry_point_of_another_distribution(tmp_path, monkeypatch):
    from tests.plugins.best_of_group import BEST_OF_GROUP

    fake_distribution(tmp_path, "best_of_group = tests.plugins.best_of_group:BEST_OF_GROUP\n"
                      "no_body = tests.plugins.my_reward:MyReward\n", group="longalign_rl.algorithms")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._reset()
    assert "best_of_group" in registry.ALGORITHMS.names() and registry.find_algorithm("best_of_group") is BEST_OF_GROUP
    with pytest.raises(TypeError, match="algorithm.name: 'no_body' is the class MyReward, not a longalign_rl.registry.Algorithm"):
        registry.find_algorithm("no_body")
