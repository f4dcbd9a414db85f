"""The run configuration: reference defaults (docs/method.md section 3), YAML and dotted
overrides, errors that name the key, and a lossless YAML round trip."""

import dataclasses
import typing

import pytest
import yaml

from longalign_rl.config import (
    Config,
    ConfigError,
    LoRAConfig,
    RewardConfig,
    TrainConfig,
    from_dict,
    load_config,
    to_dict,
    to_yaml,
    validate,
)
from tests import REPO

CONFIGS = REPO / "configs"


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------- defaults


def test_defaults_are_the_reference_values():
    cfg = load_config()
    t, s, lora = cfg.train, cfg.sampler, cfg.lora
    # AdamW lr 3e-5, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8
    assert t.lr == 3e-5 and isinstance(t.lr, float)
    assert t.betas == (0.9, 0.999)
    assert t.weight_decay == 1e-2
    assert t.eps == 1e-8
    # constant schedule with 2000 warm-up steps, gradient clip 0.3, bf16
    assert t.warmup_steps == 2000
    assert t.grad_clip == 0.3
    assert t.precision == "bf16"
    # about 3,750 steps; global batch 48 = 6 workers x 8
    assert t.steps == 3750
    assert cfg.global_batch == 48
    # deterministic DDIM, 50 steps (999 ... 19), guidance 7.5, 5 gradient steps
    assert s.num_steps == 50 and s.timestep_spacing == "trailing"
    assert s.guidance_scale == 7.5
    assert s.num_grad_steps == 5
    # segment encoding: 240 tokens, one sentence per segment
    assert cfg.prompts.max_tokens == 240
    assert cfg.prompts.pack_segments is False
    # LoRA rank 32, dropout 0.1, on attention, GEGLU and resnet layers
    assert lora.enabled is True and lora.rank == 32 and lora.dropout == 0.1
    for name in ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"):
        assert name in lora.target_modules
    assert isinstance(lora.target_modules, tuple)
    # max_policy_lag default 1
    assert t.max_policy_lag == 1
    # text_irrelevant_weight's default lives in the reward, not in the config
    assert cfg.reward.kwargs == {}
    assert "text_irrelevant_weight" not in {f.name for f in dataclasses.fields(RewardConfig)}
    assert "text_irrelevant_weight" not in to_yaml(cfg)


def test_defaults_equal_the_dataclass_defaults_and_validate():
    assert load_config() == Config()
    validate(Config())


def test_default_kwargs_dict_is_not_shared_between_configs():
    a, b = Config(), Config()
    assert a.reward.kwargs is not b.reward.kwargs


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().train.lr = 1.0  # type: ignore[misc]


# ------------------------------------------------------------------------- overrides


def test_yaml_then_dotted_overrides_cli_wins(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-4\n  steps: 10\nsampler:\n  num_steps: 20\n")
    cfg = load_config(path, ["train.lr=2e-4", "sampler.guidance_scale=5"])
    assert cfg.train.lr == 2e-4  # CLI beats YAML
    assert cfg.train.steps == 10  # YAML beats default
    assert cfg.sampler.num_steps == 20
    assert cfg.sampler.guidance_scale == 5.0 and isinstance(cfg.sampler.guidance_scale, float)
    assert cfg.train.weight_decay == 1e-2  # untouched default
    # the later of two dotted overrides wins
    assert load_config(path, ["train.steps=3", "train.steps=4"]).train.steps == 4


def test_dotted_lr_parses_to_a_float():
    cfg = load_config(None, ["train.lr=1e-5"])
    assert cfg.train.lr == 1e-5 and type(cfg.train.lr) is float


def test_yaml_exponent_without_a_dot_becomes_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads 3e-5 as the string "3e-5"
    assert yaml.safe_load("lr: 3e-5") == {"lr": "3e-5"}
    cfg = load_config(write(tmp_path, "train:\n  lr: 3e-5\n  eps: 1e-9\n  betas: [0.8, 9.99e-1]\n"))
    assert cfg.train.lr == 3e-5 and type(cfg.train.lr) is float
    assert cfg.train.eps == 1e-9 and type(cfg.train.eps) is float
    assert cfg.train.betas == (0.8, 0.999)


def test_int_is_accepted_for_a_float():
    cfg = load_config(None, ["train.grad_clip=1", "sampler.guidance_scale=3"])
    assert cfg.train.grad_clip == 1.0 and type(cfg.train.grad_clip) is float


def test_list_becomes_a_tuple():
    cfg = load_config(None, ["lora.target_modules=[to_q, to_v]", "train.betas=[0.5, 0.9]"])
    assert cfg.lora.target_modules == ("to_q", "to_v")
    assert cfg.train.betas == (0.5, 0.9)


def test_optional_str_accepts_null_and_str():
    assert load_config(None, ["model.revision=main"]).model.revision == "main"
    assert load_config(None, ["model.revision=null"]).model.revision is None


def test_reward_kwargs_dotted_overrides_add_keys(tmp_path):
    path = write(tmp_path, "reward:\n  name: clip\n  kwargs:\n    text_irrelevant_weight: 0.3\n")
    cfg = load_config(path, ["reward.kwargs.direction=corpus", "reward.kwargs.text_irrelevant_weight=0.5",
                             "reward.kwargs.nested.deep=1"])
    assert cfg.reward.name == "clip"
    assert cfg.reward.kwargs == {"text_irrelevant_weight": 0.5, "direction": "corpus", "nested": {"deep": 1}}
    # on top of empty defaults too
    assert load_config(None, ["reward.kwargs.seed=3"]).reward.kwargs == {"seed": 3}


def test_empty_override_value_is_an_empty_string():
    assert load_config(None, ["run.name="]).run.name == ""


def test_override_without_equals_sign_fails():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr"])


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override, path",
    [("lrr=1", "lrr"), ("train.lrr=1", "train.lrr"), ("sampler.num_step=3", "sampler.num_step"),
     ("reward.weight=1", "reward.weight")],
)
def test_unknown_key_fails_naming_the_full_path(override, path):
    with pytest.raises(ConfigError, match=rf"unknown config key '{path}'"):
        load_config(None, [override])


def test_unknown_key_in_yaml_fails_naming_the_full_path(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.lrr'") as e:
        load_config(write(tmp_path, "train:\n  lrr: 1.0e-4\n"))
    assert "lr" in str(e.value).split("known:")[1]  # the known keys are listed
    with pytest.raises(ConfigError, match=r"'trian'"):
        load_config(write(tmp_path, "trian:\n  lr: 1.0e-4\n"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=2.5", "train.steps"),
        ("train.lr=abc", "train.lr"),
        ("train.lr=[1]", "train.lr"),
        ("sampler.timestep_spacing=3", "sampler.timestep_spacing"),
        ("prompts.shuffle=1", "prompts.shuffle"),
        ("prompts.shuffle=yes_please", "prompts.shuffle"),
        ("lora.target_modules=[to_q, 3]", r"lora.target_modules\[1\]"),
        ("lora.target_modules=to_q", "lora.target_modules"),
        ("train.betas=[0.9]", "train.betas"),
        ("train.betas=[0.9, 0.99, 0.999]", "train.betas"),
        ("train.betas=[0.9, x]", r"train.betas\[1\]"),
        ("reward.kwargs=3", "reward.kwargs"),
        ("train=3", "train"),
        ("train.lr.x=1", "train.lr"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [("train.steps=true", "train.steps"), ("train.batch_size=false", "train.batch_size"),
                                           ("train.zero_stage=true", "train.zero_stage"), ("train.lr=true", "train.lr")])
def test_bool_for_a_number_fails(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected (int|float)"):
        load_config(None, [override])


def test_bool_for_a_number_fails_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.grad_accum: expected int"):
        load_config(write(tmp_path, "train:\n  grad_accum: yes\n"))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["sampler.num_steps=4", "sampler.num_grad_steps=5"], "sampler.num_grad_steps"),
        (["train.sync_every=3", "train.max_policy_lag=1"], "train.sync_every"),
        (["train.sync_every=2", "train.max_policy_lag=0"], "train.sync_every"),
        (["train.zero_stage=3"], "train.zero_stage"),
        (["train.zero_stage=-1"], "train.zero_stage"),
        (["train.precision=fp8"], "train.precision"),
        (["sampler.precision=float16"], "sampler.precision"),
        (["sampler.timestep_spacing=random"], "sampler.timestep_spacing"),
        (["sampler.resolution=100"], "sampler.resolution"),
        (["sampler.guidance_scale=0.5"], "sampler.guidance_scale"),
        (["lora.dropout=1.0"], "lora.dropout"),
        (["lora.rank=0"], "lora.rank"),
        (["train.lr=0"], "train.lr"),
        (["train.max_policy_lag=-1"], "train.max_policy_lag"),
        (["train.batch_size=0"], "train.batch_size"),
        (["prompts.max_tokens=0"], "prompts.max_tokens"),
        (["train.warmup_steps=-5"], "train.warmup_steps"),
        (["run.keep_checkpoints=-1"], "run.keep_checkpoints"),
        # issue 10: values that were accepted and then trained NaN weights or crashed in a worker
        (["train.lr=inf"], "train.lr"),
        (["train.lr=.nan"], "train.lr"),
        (["sampler.guidance_scale=.inf"], "sampler.guidance_scale"),
        (["train.betas=[1.5, 2]"], r"train.betas\[0\]"),
        (["train.betas=[0.9, 1.0]"], r"train.betas\[1\]"),
        (["train.eps=0"], "train.eps"),
        (["train.weight_decay=-0.1"], "train.weight_decay"),
        (["train.grad_clip=-1"], "train.grad_clip"),
        (["lora.alpha=-4"], "lora.alpha"),
        (["lora.target_modules=[]"], "lora.target_modules"),
        (["sampler.resolution=0"], "sampler.resolution"),
        (["sampler.num_cpus=-1"], "sampler.num_cpus"),
        (["train.cpus_per_worker=-0.5"], "train.cpus_per_worker"),
        (["run.max_failures=-2"], "run.max_failures"),
        (["sampler.num_actors=3", "train.num_workers=2"], "sampler.num_actors"),
    ],
)
def test_cross_field_and_range_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(None, overrides)


def test_valid_edge_values_pass():
    cfg = load_config(None, ["sampler.num_steps=5", "sampler.num_grad_steps=5", "train.sync_every=3",
                             "train.max_policy_lag=2", "train.zero_stage=0", "train.precision=fp16",
                             "sampler.precision=fp32", "sampler.guidance_scale=1", "lora.dropout=0"])
    assert cfg.sampler.num_grad_steps == 5 and cfg.train.sync_every == 3 and cfg.train.zero_stage == 0
    cfg = load_config(None, ["train.grad_clip=0", "train.weight_decay=0", "train.betas=[0, 0.999]",
                             "run.max_failures=-1", "sampler.num_gpus=0", "stage=1", "data.source=pairs.jsonl",
                             "sampler.num_actors=8", "train.num_workers=2"])  # stage 1 starts no actors
    assert cfg.train.grad_clip == 0 and cfg.run.max_failures == -1


def test_from_dict_validates_too():
    data = to_dict(Config())
    data["train"]["zero_stage"] = 3
    with pytest.raises(ConfigError, match=r"^train\.zero_stage: "):
        from_dict(data)
    data["train"]["zero_stage"] = 2
    data["train"]["lrr"] = 1.0
    with pytest.raises(ConfigError, match=r"'train\.lrr'"):
        from_dict(data)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_missing_yaml_file_errors_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)  # a directory is not a config file


def test_invalid_yaml_file_errors_naming_it(tmp_path):
    path = write(tmp_path, "train: [unclosed\n  lr: 1\n", name="broken.yaml")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*not valid YAML"):
        load_config(path)
    path = write(tmp_path, "- a\n- b\n", name="list.yaml")
    with pytest.raises(ConfigError, match=r"list\.yaml.*mapping"):
        load_config(path)
    path = write(tmp_path, "train: 5\n", name="scalar_section.yaml")
    with pytest.raises(ConfigError, match=r"^train: expected a mapping"):
        load_config(path)


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "# only a comment\n")) == Config()


# ------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "source, overrides",
    [
        (None, []),
        ("tiny.yaml", []),
        ("default.yaml", []),
        ("shapesworld_stage1.yaml", []),
        ("sd15_longalign.yaml", ["train.lr=1e-5", "model.revision=abc123", "lora.target_modules=[to_q]",
                                 "reward.kwargs.direction=corpus", "train.betas=[0.5, 0.75]"]),
        ("tiny_stage1.yaml", ["data.kwargs.n=8"]),
        ("sd15_stage1.yaml", []),
    ],
)
def test_to_yaml_and_back_gives_an_equal_config(source, overrides, tmp_path):
    cfg = load_config(CONFIGS / source if source else None, overrides)
    text = to_yaml(cfg)
    assert from_dict(yaml.safe_load(text)) == cfg
    assert load_config(write(tmp_path, text)) == cfg
    # to_dict is plain YAML data: lists, not tuples
    data = to_dict(cfg)
    assert isinstance(data["train"]["betas"], list) and isinstance(data["lora"]["target_modules"], list)
    assert list(data) == ["stage", "model", "data", "prompts", "t5", "sampler", "reward", "algorithm", "lora", "train",
                          "run"]


def test_default_run_is_the_shapesworld_demo():
    from longalign_rl.train import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG)
    assert DEFAULT_CONFIG.name == "default.yaml"
    assert cfg.model.pretrained == "shapesworld-partial" and cfg.prompts.source == "shapesworld.plugin:captions"
    assert cfg.reward.name == "shapes_clip" and cfg.run.metrics == ("shapesworld.plugin:ground_truth",)
    assert cfg.sampler.num_actors == 2 and cfg.train.num_workers == 2 and cfg.train.use_gpu is False
    # the setting of issue 9's sweep whose held-out ground truth rose (docs/shapesworld.md)
    assert cfg.train.lr == 3e-3 and cfg.train.steps == 48 and cfg.reward.kwargs["text_irrelevant_weight"] == 0.3


def test_metric_hooks_must_be_import_paths():
    assert load_config(None, ["run.metrics=[a.b:c, d:e]"]).run.metrics == ("a.b:c", "d:e")
    with pytest.raises(ConfigError, match=r"run.metrics\[1\]: must be an import path .*got 'mnist'"):
        load_config(None, ["run.metrics=[a.b:c, mnist]"])
    with pytest.raises(ConfigError, match="unknown config key 'run.ground_truth'"):
        load_config(None, ["run.ground_truth=shapesworld"])  # replaced by run.metrics


def test_shipped_tiny_config():
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.model.pretrained == "tiny"
    assert cfg.sampler.num_steps == 10 and cfg.sampler.num_grad_steps == 2 and cfg.sampler.resolution == 64
    assert cfg.reward.name == "tiny_clip" and cfg.reward.kwargs == {"text_irrelevant_weight": 0.3, "direction": "batch"}
    assert cfg.lora.rank == 4 and cfg.lora.dropout == 0.0
    assert cfg.train.lr == 1e-3 and cfg.train.use_gpu is False and cfg.train.precision == "fp32"
    assert cfg.global_batch == 4
    # what the file does not mention keeps its default
    assert cfg.train.grad_clip == 0.3 and cfg.prompts.max_tokens == 240


def test_shipped_sd15_config_is_the_reference():
    cfg = load_config(CONFIGS / "sd15_longalign.yaml")
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.reward.name == "hpsv2"
    assert cfg.reward.kwargs == {"text_irrelevant_weight": 0.3, "direction": "batch"}
    # everything else is the reference default
    assert dataclasses.replace(cfg, reward=RewardConfig(), model=Config().model) == Config()
    assert cfg.train == TrainConfig() and cfg.lora == LoRAConfig()


def test_command_line_values_keep_their_text_for_string_fields():
    cfg = load_config(None, ["run.name=2024", "model.revision=0123", "train.lr=1e-5", "reward.kwargs.w=0.5"])
    assert cfg.run.name == "2024" and cfg.model.revision == "0123"
    assert cfg.train.lr == 1e-5 and cfg.reward.kwargs["w"] == 0.5


def test_naming_another_reward_drops_the_previous_rewards_kwargs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("reward:\n  name: clip\n  kwargs:\n    text_irrelevant_weight: 0.5\n")
    assert load_config(path, ["reward.name=my.mod:R"]).reward.kwargs == {}
    assert load_config(path, ["reward.kwargs.direction=corpus"]).reward.kwargs == {
        "text_irrelevant_weight": 0.5, "direction": "corpus"}


# ------------------------------------------------------------------------- stage 1


def test_stage_defaults_to_2_and_data_has_the_reference_stage_1_values():
    cfg = Config()
    assert cfg.stage == 2 and cfg.data.source == ""  # stage 2 needs no data
    assert cfg.data.caption_dropout == 0.1 and cfg.data.epochs == 2 and cfg.data.resolution == 512
    assert cfg.data.shuffle is True and cfg.data.image_column == "image" and cfg.data.caption_column == "caption"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["stage=3"], "stage"),
        (["stage=0"], "stage"),
        (["stage=1"], "data.source"),        # stage 1 without pairs
        (["stage=1", "data.source= "], "data.source"),
        (["data.epochs=0"], "data.epochs"),
        (["data.resolution=100"], "data.resolution"),
        (["data.resolution=0"], "data.resolution"),
        (["data.caption_dropout=1.5"], "data.caption_dropout"),
        (["data.kwargs=3"], "data.kwargs"),
        (["stage=one"], "stage"),
    ],
)
def test_stage_and_data_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(None, overrides)


def test_naming_another_data_source_drops_the_previous_generators_kwargs(tmp_path):
    path = write(tmp_path, "stage: 1\ndata:\n  source: my_world:pairs\n  kwargs:\n    n: 8\n")
    assert load_config(path, ["data.source=pairs.jsonl"]).data.kwargs == {}
    assert load_config(path, ["data.kwargs.seed=3"]).data.kwargs == {"n": 8, "seed": 3}


def test_shipped_tiny_stage1_config():
    cfg = load_config(CONFIGS / "tiny_stage1.yaml")
    assert cfg.stage == 1 and cfg.model.pretrained == "tiny"
    assert cfg.data.source == "shapesworld.plugin:pairs" and cfg.data.resolution == 64 and cfg.data.kwargs["n"] == 64
    assert cfg.train.num_workers == 2 and cfg.train.use_gpu is False and cfg.train.precision == "fp32"


def test_shipped_sd15_stage1_config_is_the_reference():
    cfg = load_config(CONFIGS / "sd15_stage1.yaml")
    t, d = cfg.train, cfg.data
    assert cfg.stage == 1 and cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert d.source  # a placeholder to fill in
    # docs/method.md section 4: AdamW lr 3e-5, weight decay 1e-2, 2000 warm-up steps, clip 0.3,
    # global batch 192, two epochs, caption dropout 0.1, 512 px, LoRA, 240 tokens
    assert t.lr == 3e-5 and t.weight_decay == 1e-2 and t.warmup_steps == 2000 and t.grad_clip == 0.3
    assert cfg.global_batch == 192 and t.num_workers * t.batch_size * t.grad_accum == 192
    assert d.epochs == 2 and d.caption_dropout == 0.1 and d.resolution == 512
    assert cfg.lora.enabled and cfg.prompts.max_tokens == 240
    assert t.steps * cfg.global_batch > 2 * 2_000_000  # the epochs, not the step cap, end the run


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["algorithm.name=ppo"], "algorithm.name"),
        (["algorithm.name=grpo", "sampler.eta=0"], "sampler.eta"),  # no density without noise
        (["algorithm.name=ddpo", "sampler.eta=1.5"], "sampler.eta"),
        (["sampler.eta=-1"], "sampler.eta"),
        (["algorithm.name=grpo", "train.batch_size=6", "algorithm.group_size=4"], "train.batch_size"),
        (["algorithm.group_size=1"], "algorithm.group_size"),
        (["algorithm.timestep_fraction=0"], "algorithm.timestep_fraction"),
        (["algorithm.timestep_fraction=1.5"], "algorithm.timestep_fraction"),
        (["algorithm.clip_range=0"], "algorithm.clip_range"),
        (["algorithm.advantage_clip=-1"], "algorithm.advantage_clip"),
        (["algorithm.kl_weight=-0.1"], "algorithm.kl_weight"),
        (["algorithm.inner_epochs=0"], "algorithm.inner_epochs"),
        (["algorithm.buffer_size=8", "algorithm.min_count=9"], "algorithm.min_count"),
    ],
)
def test_algorithm_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(None, overrides)


def test_policy_gradient_batches_hold_whole_groups():
    from longalign_rl.algorithms.policy_gradient import trained_steps
    from longalign_rl.registry import algorithm_of

    rb = load_config(None, ["train.batch_size=8"])
    assert algorithm_of(rb).differentiable_reward and rb.prompts_per_batch == 8
    grpo = load_config(None, ["algorithm.name=grpo", "train.batch_size=8", "algorithm.group_size=4",
                              "sampler.num_steps=10", "algorithm.timestep_fraction=0.45"])
    assert grpo.prompts_per_batch == 2 and trained_steps(grpo) == 4 and grpo.samples_per_start == 1
    assert load_config(None, ["algorithm.name=grpo", "algorithm.shared_start=true"]).samples_per_start == 4
    ddpo = load_config(None, ["algorithm.name=ddpo", "train.batch_size=6", "algorithm.group_size=4"])
    assert ddpo.prompts_per_batch == 6 and trained_steps(ddpo) == 50  # group_size is grpo's only


def test_an_unknown_algorithm_lists_the_known_ones_and_an_import_path_must_name_a_record():
    with pytest.raises(ConfigError, match=r"^algorithm.name: unknown algorithm 'ppo'; known algorithms: ddpo, grpo, "
                                          r"reward_backprop"):
        load_config(None, ["algorithm.name=ppo"])
    with pytest.raises(ConfigError, match=r"^algorithm.name: 'longalign_rl.config:Config' is the class Config, not a "
                                          r"longalign_rl.registry.Algorithm"):
        load_config(None, ["algorithm.name=longalign_rl.config:Config"])
    with pytest.raises(ConfigError, match=r"^algorithm.name 'nowhere.at_all:X': cannot import module 'nowhere.at_all'"):
        load_config(None, ["algorithm.name=nowhere.at_all:X"])


def test_unknown_keys_get_the_closest_known_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stesp'; did you mean 'train.steps'\?"):
        load_config(None, ["train.stesp=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'\?"):
        load_config(None, ["trian.steps=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'sampler.qwerty' \(known:"):
        load_config(None, ["sampler.qwerty=3"])  # nothing close: no guess


@pytest.mark.parametrize("raw", ["yes", "no", "on", "off", "1", "y"])
def test_booleans_are_true_or_false_only(raw, tmp_path):
    """YAML 1.1 reads yes/no/on/off as booleans; a config takes only true / false, from the
    command line and from a file."""
    with pytest.raises(ConfigError, match="train.use_gpu: expected true or false, got"):
        load_config(None, [f"train.use_gpu={raw}"])
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  use_gpu: {raw}\n")
    with pytest.raises(ConfigError, match="train.use_gpu: expected true or false"):
        load_config(f)
    assert load_config(None, ["train.use_gpu=True"]).train.use_gpu is True
    assert load_config(None, ["algorithm.shared_start=false"]).algorithm.shared_start is False


def test_print_config_lists_every_key_with_its_type_default_and_meaning(capsys):
    from longalign_rl import train

    assert train.main(["--print-config", "train.lr=1e-4", "algorithm.name=grpo"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def leaves(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            yield from leaves(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{f.name}"]

    keys = list(leaves(Config, ""))
    assert len(keys) > 60
    for key in keys:
        (i,) = [i for i, line in enumerate(lines) if line.startswith(f"{key}: ")]
        assert lines[i + 1].startswith("    ") and len(lines[i + 1].strip()) > 10, f"{key} has no meaning"
    assert "train.lr: float = 3.0e-05    (this config: 0.0001)" in lines
    assert "algorithm.name: str = reward_backprop    (this config: grpo)" in lines
    assert "[reward]" in lines and any(line.startswith("[data]  Stage 1") for line in lines)
    assert train.main(["--print-config", "train.stesp=1"]) == 2


def test_the_longalign_rl_command(capsys):
    from longalign_rl import cli

    assert cli.main(["rewards"]) == 0
    out = capsys.readouterr().out
    assert "shapes_exact     background_weight, positions" in out
    assert "shapes_clip      weights, backend, text_irrelevant_weight, direction" in out  # **kwargs: ClipTypeReward's
    assert "weighted_sum     rewards" in out
    assert cli.main(["config", "train.lr=0.5"]) == 0 and "(this config: 0.5)" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2 and "longalign-rl train" in capsys.readouterr().err
    assert cli.main(["train", "train.stesp=1"]) == 2 and "did you mean 'train.steps'" in capsys.readouterr().err
    # generate and evaluate are the modules' own mains, under the command's name
    assert cli.main(["generate", "tiny", "--out", "/nonexistent/never-written"]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert cli.main(["evaluate", "tiny", "--prompts", "/nonexistent/prompts.txt"]) == 2
    assert "--prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert capsys.readouterr().out.startswith("usage: longalign-rl generate")


def test_a_config_includes_others_relative_to_itself_in_order(tmp_path):
    """`include:` (a path or a list): the included files in order, the later over the earlier,
    the file's own keys over them; naming another reward starts from its own kwargs."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.yaml").write_text("train:\n  lr: 1.0e-4\n  steps: 7\nreward:\n  name: tiny_clip\n"
                                               "  kwargs: {text_irrelevant_weight: 0.5}\n")
    (tmp_path / "parts" / "b.yaml").write_text("include: a.yaml\ntrain:\n  lr: 2.0e-4\n")
    (tmp_path / "run.yaml").write_text("include: [parts/b.yaml]\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "run.yaml", ["train.batch_size=3"])
    assert (cfg.train.lr, cfg.train.steps, cfg.train.batch_size) == (2e-4, 9, 3)
    assert cfg.reward.kwargs == {"text_irrelevant_weight": 0.5}
    assert "include" not in to_dict(cfg)  # a run's config.yaml is resolved: no includes


@pytest.mark.parametrize("files,message", [
    ({"run.yaml": "include: missing.yaml\n"}, r"config file '.*missing.yaml' does not exist \(include: of '.*run.yaml'\)"),
    ({"run.yaml": "include: b.yaml\n", "b.yaml": "include: run.yaml\n"}, r"include: a config includes itself: .*run.yaml"),
    ({"run.yaml": "include: {a: 1}\n"}, r"include: in '.*run.yaml' must be a path or a list of paths"),
])
def test_a_bad_include_names_the_file(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "run.yaml")


def test_the_reference_configs_write_each_fact_once():
    """The tiny paper-exact configs include the full-size ones, which include the keys both
    stages share: the reference LoRA layers are written in one YAML file."""
    from tests import REPO

    configs = REPO / "configs"
    holders = [p.relative_to(configs) for p in sorted(configs.rglob("*.yaml")) if "conv_shortcut" in p.read_text()]
    assert [str(p) for p in holders] == ["include/reference.yaml"]
    assert "include: longalign_reference.yaml" in (configs / "tiny_reference.yaml").read_text()
    assert "include: longalign_reference_stage1.yaml" in (configs / "tiny_reference_stage1.yaml").read_text()
