"""The driver's checks of everything a run names before anything starts (docs/reliability.md):
the reward (built and probed once), the model, the T5 branch, prompts, stage-1 data, metric
hooks, trackers; and the run header that says what will run. A failure is a ConfigError
naming the key; nothing is written. No Ray: train.py calls these before it joins a cluster.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from longalign_rl.config import Config, ConfigError
from longalign_rl.data import Pair, check_source
from longalign_rl.guard import DRIFT, JUDGE, STATISTICS, build_judges, judge_entries, selection_key
from longalign_rl.hooks import load_metric_hooks, probe_metric_hooks
from longalign_rl.prompts import load_prompts
from longalign_rl.registry import algorithm_of
from longalign_rl.validation import validation_set

log = logging.getLogger("longalign_rl")


def check_reward(cfg: Config, prompts: list[str]) -> list[str] | None:
    """Fail on the driver, before any worker starts, for a reward that cannot be used: it is
    built with reward.kwargs and called once on two random images with the run's first
    prompts (registry.probe_reward: shapes, finite values, a gradient when it claims one).
    Returns the names of its parts (None: it lives in the reward actors, not probed here)."""
    from transformers.utils import logging as transformers_logging

    from longalign_rl.registry import (ALGORITHMS, check_reward_kwargs, find_algorithm, find_reward, get_reward,
                                       probe_reward)

    transformers_logging.disable_progress_bar()  # the driver's console says what matters only
    try:
        factory = find_reward(cfg.reward.name)
    except Exception as e:
        if cfg.reward.num_actors:
            return None  # it may exist only in the reward actors' runtime_env: probed there (start_reward_actors)
        raise ConfigError(f"reward: {e}") from e
    try:  # a misspelt keyword, named before anything is built
        check_reward_kwargs(cfg.reward.name, cfg.reward.kwargs, factory)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    if cfg.reward.num_actors:
        return None  # built and probed in the reward actors (start_reward_actors), never here
    try:
        reward = get_reward(cfg.reward.name, **cfg.reward.kwargs)
    except Exception as e:  # a plugin's factory may raise anything: name the key and the plugin
        message = str(e) if str(e).startswith("reward ") else f"reward {cfg.reward.name!r}: {type(e).__name__}: {e}"
        raise ConfigError(f"reward: {message}") from e
    if not reward.differentiable and algorithm_of(cfg).differentiable_reward:
        others = [name for name in ALGORITHMS.names() if not find_algorithm(name).differentiable_reward]
        raise ConfigError(f"reward.name: reward {cfg.reward.name!r} is not differentiable; algorithm "
                          f"{cfg.algorithm.name} needs gradients from the reward to the image "
                          f"(algorithm.name: {' or '.join(others) or 'another algorithm'} optimises any reward)")
    try:
        out = probe_reward(reward, cfg.reward.name, prompts, cfg.sampler.resolution)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"reward: {e}") from e
    return list(out.components)


def check_model(cfg: Config) -> None:
    """model.pretrained names something that exists; a local folder holds complete files;
    its family (model_index.json) is known, is model.family when that is set, and takes the
    run's settings (Family.check_config)."""
    from longalign_rl.families import FAMILIES, find_family
    from longalign_rl.hub import check_hub_model
    from longalign_rl.models import MODELS, check_model_folder, declared_family
    from longalign_rl.registry import resolve_source

    source = resolve_source(cfg.model.pretrained, key="model.pretrained", names=MODELS,
                            path_kind="diffusers folder", hub_ids=True)
    if source.kind == "path":
        check_model_folder(Path(cfg.model.pretrained))
    elif source.kind == "hub":
        check_hub_model(cfg.model.pretrained, cfg.model.revision)
        log.info("model.pretrained %r is a hub id: every process downloads it or reads the hub cache",
                 cfg.model.pretrained)
    if cfg.model.family and cfg.model.family not in FAMILIES:
        raise ConfigError(f"model.family: unknown model family {cfg.model.family!r}; known: "
                          f"{', '.join(FAMILIES.names())} (or empty: read from the model)")
    family = declared_family(cfg.model.pretrained, cfg.model.revision)
    if family is not None and cfg.model.family and family.name != cfg.model.family:
        raise ConfigError(f"model.family: {cfg.model.family!r}, but {cfg.model.pretrained!r} is a {family.name!r} "
                          f"model (pipeline {', '.join(family.pipeline_classes)}); leave model.family empty to read "
                          "it from the model")
    family = family or (find_family(cfg.model.family) if cfg.model.family else None)
    problems = family().check_config(cfg) if family is not None else []
    if family is not None and cfg.model.without_t5 and "text_encoder_3" not in family.parts:
        problems.append(f"model.without_t5: only SD3 loads without a T5 encoder; {cfg.model.pretrained!r} is a "
                        f"{family.name!r} model")
    if problems:
        raise ConfigError("; ".join(problems))


def check_t5(cfg: Config) -> None:
    """The T5 branch's encoder and adapter exist and are complete (config.json valid JSON,
    weights complete and finite), and the adapter takes the encoder's width; a random
    adapter is said. The sampler actors build the branch before the run starts too
    (start_sampler_actors), for what only loading shows."""
    from longalign_rl.arguments import check_json_file, check_weights_file
    from longalign_rl.encoding.t5 import ADAPTER_FOLDER, CONFIG_DIR
    from longalign_rl.hub import check_hub_model

    t5 = cfg.t5
    if not t5.encoder:
        return
    width = None
    try:
        if t5.encoder == "tiny":
            width = json.loads((CONFIG_DIR / "tiny" / "t5_encoder.json").read_text())["d_model"]
        elif Path(t5.encoder).exists():
            folder = Path(t5.encoder)
            if not (folder / "config.json").is_file():
                raise ConfigError(f"t5.encoder: {t5.encoder!r} is a path without config.json: not a T5 encoder folder")
            width = check_json_file(folder / "config.json", "t5.encoder").get("d_model")
            weights = sorted(folder.glob("*.safetensors"))
            if not weights and not list(folder.glob("*.bin")):
                raise ConfigError(f"t5.encoder: {folder} has no weights (*.safetensors or *.bin)")
            for file in weights:
                check_weights_file(file, "t5.encoder")
        else:
            check_hub_model(t5.encoder, None, key="t5.encoder", filename="config.json")
        if t5.adapter:
            if not (Path(t5.adapter) / "config.json").is_file():
                raise ConfigError(f"t5.adapter: {t5.adapter!r} holds no config.json of a TextAdapter "
                                  "(a folder saved by TextAdapter.save_pretrained)")
            adapter = check_json_file(Path(t5.adapter) / "config.json", "t5.adapter")
            if width is not None and adapter.get("in_dim") != width:
                raise ConfigError(f"t5.adapter: {t5.adapter!r} takes {adapter.get('in_dim')}-wide inputs, but the T5 "
                                  f"encoder {t5.encoder!r} gives {width}")
            for file in sorted(Path(t5.adapter).glob("*.safetensors")):
                check_weights_file(file, "t5.adapter")
        elif not (Path(cfg.model.pretrained) / ADAPTER_FOLDER / "config.json").is_file():
            log.warning("t5: no adapter weights (t5.adapter is empty and model.pretrained has no %s/): the TextAdapter "
                        "starts random%s", ADAPTER_FOLDER,
                        "; stage 2 keeps it frozen, so train it in stage 1 first" if cfg.stage == 2 else "")
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # a file check's message names the file
        raise ConfigError(str(e)) from None


def check_inputs(cfg: Config) -> list[Pair] | None:
    """Fail on the driver, before a run directory or a worker exists, for inputs that cannot
    be used. Both stages: the model, its T5 branch, the validation prompts and the metric hooks. Stage 1:
    the data source (returns the pairs of a folder or manifest). Stage 2: the reward and
    the prompt source (bad lines are reported with their numbers)."""
    check_model(cfg)
    check_t5(cfg)
    validation = validation_set(cfg)  # the validation prompts: a bad run.validation fails here
    hooks = load_metric_hooks(cfg.run.metrics)
    reward_keys: list[str] | None = []  # stage 1 has no reward
    if cfg.stage == 1:
        pairs = check_source(cfg.data)
        captions = [p.caption for p in pairs or []]
        prompts = validation.prompts if validation else captions
        if captions:
            warn_cut_prompts(cfg, "data.source", captions, "captions")
    else:
        pairs, prompts = None, load_prompts(cfg.prompts.source)
        parts = check_reward(cfg, prompts)
        reward_keys = None if parts is None else ["reward", *parts]
        warn_cut_prompts(cfg, "prompts.source", prompts)
    if validation and (cfg.run.validation or cfg.stage == 1):  # stage 2's default: prompts.source's first ones
        warn_cut_prompts(cfg, "run.validation" if cfg.run.validation else "prompts.source", validation.prompts,
                         "validation prompts")
    hook_keys = probe_metric_hooks(hooks, prompts, cfg.sampler.resolution) if hooks and prompts else set()
    judges = build_judges(cfg.run, "cpu")  # run.judge: built and probed here, as the reward is
    judge_keys = judges.probe(validation.prompts if validation else prompts, cfg.sampler.resolution) if judges else []
    key = cfg.run.select_by.key
    if key and validation and reward_keys is not None:  # a reward in the reward actors is not probed here
        known = [*reward_keys, *hook_keys, *judge_keys, *(DRIFT + name for name in STATISTICS)]
        if key not in known:
            raise ConfigError(f"run.select_by.key: {key!r} is not a validation key of this run; it has: "
                              f"{', '.join(known)}")
    return pairs


def warn_cut_prompts(cfg: Config, key: str, prompts: list[str], what: str = "prompts", limit: int = 20_000) -> None:
    """One warning on the driver for the prompts of `key` that are longer than
    prompts.max_tokens encoded states, which are cut where they are encoded (as the reference
    cuts its own): instead of a line for every cut prompt from every sampler and worker,
    whose warnings.log leaves them out (encoding.encode.CUT_PROMPTS_LOGGER). Measured with CLIP's
    tokenizer (SD v1.5's), on the first `limit` prompts."""
    from longalign_rl.encoding import build_clip_tokenizer
    from longalign_rl.encoding.encode import encoded_lengths

    p = cfg.prompts
    measured = prompts[:limit]
    tokenizer = build_clip_tokenizer()
    lengths = encoded_lengths(measured, tokenizer, pack_segments=p.pack_segments, split=p.split,
                              clean_text=p.clean_text)
    warn_t5_cut_prompts(cfg, key, measured, what, len(prompts) > limit)
    if p.split == "none":  # one segment each: CLIP's window cuts it, whatever max_tokens says
        from longalign_rl.encoding.segments import MAX_SEGMENT_TOKENS
        from longalign_rl.encoding.tokenizer import token_counter

        count = token_counter(tokenizer)
        window_cut = sum(count(prompt) > MAX_SEGMENT_TOKENS for prompt in measured)
        if window_cut:
            log.warning("%s: %d of %s%d %s are longer than CLIP's 77-token window and are cut there, as the "
                        "pipelines cut them (prompts.split: none); prompts.split: sentences keeps them whole",
                        key, window_cut, "the first " if len(prompts) > limit else "", len(measured), what)
    cut = sum(n > p.max_tokens for n in lengths)
    if not cut:
        return
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    start = measured[longest] if len(measured[longest]) <= 50 else measured[longest][:47] + "..."
    log.warning("%s: %d of %s%d %s are longer than prompts.max_tokens=%d encoded states and are cut to it "
                "(the longest, number %d, has %d: %r); raise prompts.max_tokens to keep them whole",
                key, cut, "the first " if len(prompts) > limit else "", len(measured), what, p.max_tokens,
                longest + 1, lengths[longest], start)


def configured_family(cfg: Config):
    """The family class of model.pretrained as the driver knows it without loading weights
    (its model_index.json, else model.family), or None."""
    from longalign_rl.families import find_family
    from longalign_rl.models import declared_family

    try:
        family = declared_family(cfg.model.pretrained, cfg.model.revision, download=False)
    except (OSError, ValueError):
        family = None
    return family or (find_family(cfg.model.family) if cfg.model.family else None)


def warn_t5_cut_prompts(cfg: Config, key: str, prompts: list[str], what: str, first: bool) -> None:
    """The same for a family's own T5 encoder (SD3, FLUX), which reads the whole prompt up to
    prompts.t5_max_tokens tokens: one warning counting the prompts it cuts."""
    family = configured_family(cfg)
    if family is None or cfg.model.without_t5:
        return
    family = family()
    try:
        tokenizer = family.t5_tokenizer(cfg.model.pretrained, cfg.model.revision)
    except OSError:  # not in the hub cache yet: the workers say it where they encode
        return
    if tokenizer is None:
        return
    limit = family.t5_tokens(cfg.prompts)
    lengths = [len(ids) for ids in tokenizer(list(prompts)).input_ids]
    cut = sum(n > limit for n in lengths)
    if cut:
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        log.warning("%s: %d of %s%d %s are longer than prompts.t5_max_tokens=%d T5 tokens and are cut to it "
                    "(the longest, number %d, has %d); raise prompts.t5_max_tokens to keep them whole",
                    key, cut, "the first " if first else "", len(prompts), what, limit, longest + 1, lengths[longest])


def check_trackers(cfg: Config) -> None:
    from longalign_rl.trackers import missing_packages

    missing = missing_packages(cfg.run.report_to)
    if missing:
        raise ConfigError("; ".join(missing))


def model_line(cfg: Config) -> str:
    """model.pretrained and its family, as the run header says them."""
    from longalign_rl.models import declared_family

    try:  # check_model has read it already: from the folder or the hub cache, never the network
        family = declared_family(cfg.model.pretrained, cfg.model.revision, download=False)
    except (OSError, ValueError):
        family = None
    name = family.name if family is not None else cfg.model.family or "read when it loads"
    return f"{cfg.model.pretrained} (family {name})"


def describe(cfg: Config, run_dir: Path, pairs: list[Pair] | None = None) -> str:
    """The run's header; a run with a guard (guard.py) adds its line."""
    text = _describe(cfg, run_dir, pairs)
    key = selection_key(cfg.run)
    if key is None:
        return text
    judges = [JUDGE + e.name if e.kind == "reward" else e.target for e in judge_entries(cfg.run.judge)]
    e = cfg.run.early_stop
    stop = " or ".join(([f"after {e.patience} validations without a new best"] if e.patience else [])
                       + (["at a drop beyond the uncertainty"] if e.on_drop else [])) or "off"
    return (text + f"\nguard              judges: {', '.join(judges) or 'none'}; selects by "
            f"{'the first judge key' if key == JUDGE else key} "
            f"({'higher' if cfg.run.select_by.higher_is_better else 'lower'} is better) every {cfg.run.eval_every} "
            f"steps; early stop: {stop}")


def _describe(cfg: Config, run_dir: Path, pairs: list[Pair] | None = None) -> str:
    from longalign_rl.families import default_family

    s, t = cfg.sampler, cfg.train
    trains = f"LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "the whole UNet"
    algorithm = algorithm_of(cfg)
    family = configured_family(cfg) or default_family()  # what the samplers will load
    # an elastic run (train.min_workers) may run on fewer, accumulating more
    elastic = f" (elastic: {t.min_workers} at least, the global batch kept)" if t.min_workers else ""
    if cfg.stage == 1:
        d = cfg.data
        if pairs is None:
            per_epoch = "pairs per epoch: as many as the generator gives"
        else:
            micro = len(pairs) // t.num_workers // t.batch_size  # per worker, full batches only
            per_epoch = f"{len(pairs)} pairs -> {micro // t.grad_accum} steps per epoch"
        return (
            f"run directory      {run_dir}\n"
            f"stage 1            supervised long-text fine-tuning (denoising loss) of {model_line(cfg)}, "
            f"{trains}\n"
            f"data               {d.source} {d.kwargs or ''}, {d.resolution} px, captions segment-encoded to "
            f"{cfg.prompts.max_tokens} tokens, dropout {d.caption_dropout}; {per_epoch}\n"
            f"trainers           {t.num_workers} workers{elastic} x {t.batch_size} pairs x {t.grad_accum} accumulation "
            f"= {cfg.global_batch} pairs per step, ZeRO-{t.zero_stage}, {t.precision}, lr {t.lr} "
            f"({t.warmup_steps} warm-up steps)\n"
            f"end                after {d.epochs} epoch(s) or {t.steps} steps, whichever comes first"
        )
    return (
        f"run directory      {run_dir}\n"
        f"model              {model_line(cfg)}   reward {cfg.reward.name} {cfg.reward.kwargs}"
        + (f", scored by {cfg.reward.num_actors} reward actors ({cfg.reward.num_cpus:g} CPU, "
           f"{cfg.reward.num_gpus:g} GPU each)" if cfg.reward.num_actors else "") + "\n"
        f"algorithm          {algorithm.describe(cfg)}\n"
        f"samplers           {s.num_actors} actors, {s.num_steps} {family.steps_name} steps "
        f"({algorithm.describe_sampling(cfg, family)}), "
        f"guidance {s.guidance_scale}, {s.resolution} px\n"
        f"trainers           {t.num_workers} workers{elastic} x {t.batch_size} prompts x {t.grad_accum} accumulation "
        f"= {cfg.global_batch} samples per step, ZeRO-{t.zero_stage}, {t.precision}\n"
        f"steps              {t.steps} -> {t.steps * cfg.global_batch} samples; weights to samplers every "
        f"{t.sync_every} step(s), policy lag <= {t.max_policy_lag}"
    )
