"""The run configuration: typed, frozen dataclasses with every default in one place.

Defaults are the reference values of LongAlign's stage 2 (docs/method.md section 3) unless a
comment says otherwise; `stage: 1` with a `data` section runs stage 1 (docs/method.md section
4, supervised long-text fine-tuning; its reference values are in configs/sd15_stage1.yaml).
YAML files under `configs/` hold overrides only; the command line adds dotted overrides
(`train.lr=1e-5`). Unknown keys and wrong types are errors that name the key's full path.
The resolved config is saved with every run (`to_yaml`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from longalign_rl.registry import IMPORT_PATH, algorithm_of
from longalign_rl.typed_yaml import ConfigError, build, dotted, load_yaml, merge, plain


@dataclass(frozen=True)
class ModelConfig:
    # A built-in architecture with random weights ("tiny": test-sized SD parts, or
    # "sd15-random": SD v1.5's architecture; see longalign_rl/model_configs/), a model a
    # plugin registers in the entry-point group longalign_rl.models, an import path
    # "pkg.module:loader", a local diffusers folder, or a hub id such as
    # stable-diffusion-v1-5/stable-diffusion-v1-5 (longalign_rl/models.py).
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # Hub revision (branch, tag or commit) of `pretrained`; None = the default branch.
    revision: str | None = None
    # Seed of a built-in architecture's random weights; every process builds the same ones.
    random_seed: int = 0
    # The model family (longalign_rl/families/, docs/models.md): "sd" (SD 1.x/2.x), "sdxl",
    # "sd3" (SD3/SD3.5), "flux" (FLUX.1), or one a plugin registers in the entry-point group
    # longalign_rl.families. "" = read it from the model (a diffusers folder's
    # model_index.json); a family that the weights are not is refused.
    family: str = ""
    # SD3 only: load the model without its T5 encoder (diffusers' text_encoder_3=None; its
    # tokens are zeros). 4.8 B fewer parameters, and the prompt reaches the model through the
    # CLIP segments alone: where long prompts hurt most.
    without_t5: bool = False


@dataclass(frozen=True)
class DataConfig:
    """Stage 1's image-caption pairs (unused by stage 2)."""

    # Where the pairs come from: a folder of images with same-named .txt captions
    # (a.png + a.txt), a .jsonl or .csv manifest with an image path (relative to the
    # manifest) and a caption per row, or "pkg.module:function" returning an iterable of
    # (uint8 [H, W, 3] image, caption) pairs (see longalign_rl/data.py).
    source: str = ""
    # Keyword arguments of a generator source, e.g. {n: 512, seed: 0}.
    kwargs: dict = field(default_factory=dict)
    # Manifest columns (JSONL keys or CSV header names) of the image path and the caption.
    image_column: str = "image"
    caption_column: str = "caption"
    # Training image side in pixels: the shorter side is resized to it, then centre-cropped
    # (latents are resolution / 8).
    resolution: int = 512
    # How images are resized to `resolution`: "bicubic" (PIL, the long side rounded) or
    # "bilinear" (the reference's torchvision Resize(resolution, bilinear) + CenterCrop on the
    # PIL image: PIL's bilinear, antialiased when it shrinks, the long side truncated).
    # Reference: bilinear. data.py to_training_image.
    resize: str = "bicubic"
    # Probability that a caption is replaced by the empty prompt's encoding, so the model
    # keeps the unconditional branch classifier-free guidance needs (reference: 0.1).
    caption_dropout: float = 0.1
    # Passes over the data (reference: 2). Stage 1 stops after data.epochs epochs or
    # train.steps optimiser steps, whichever comes first.
    epochs: int = 2
    # Reshuffle the pairs every epoch (seeded by train.seed).
    shuffle: bool = True

# prompts.split's choices (encoding/segments.py SPLITS; kept here so the config needs no torch).
PROMPT_SPLITS = ("sentences", "reference", "none")


@dataclass(frozen=True)
class PromptConfig:
    # "demo" (built-in long prompts), a .txt file (one prompt per line), a .jsonl file
    # (one {"prompt": ...} object per line) or "pkg.module:function" returning the list of
    # prompts (see longalign_rl/prompts.py).
    source: str = "demo"
    # Length of the merged segment encoding, in token states (reference: 240 = 3 x 80);
    # stage 1 encodes its captions the same way.
    max_tokens: int = 240
    # Join consecutive short sentences into one segment while they fit 75 tokens.
    # False = one sentence per segment, as the reference.
    pack_segments: bool = False
    # How a prompt is cut into segments: "sentences" (split at . ! ? ; and newlines, never
    # inside a number; an over-long sentence split at commas, nothing lost) or "reference"
    # (the reference code's rule: at . and ?, also inside numbers, each piece + "."; a piece
    # over 75 tokens cut by the tokenizer). encoding/segments.py; docs/reference_mode.md.
    # "none": the prompt whole, cut at 77 tokens as the pipelines cut it (with max_tokens 77,
    # exactly their encoding: the baseline a long-prompt run is compared against).
    split: str = "sentences"
    # Clean every CLIP segment before it is tokenised as the reference's CLIP tokenizer
    # (transformers' slow one, with ftfy) did: ftfy.fix_text (mojibake, HTML entities such as
    # &amp;, curly quotes), then runs of whitespace to one space, stripped. transformers 5's
    # CLIPTokenizer does only the whitespace part. After the split, as the reference (with
    # split: sentences an entity's ";" ends a sentence first). Reference: true.
    # encoding/tokenizer.py clip_clean.
    clean_text: bool = False
    # Reshuffle the prompts every pass over them (seeded by train.seed).
    shuffle: bool = True
    # Families with a pooled text embedding (SDXL): which one a prompt of several segments
    # gets, "first" (its first segment's) or "mean" (the mean over its segments). A prompt of
    # one segment gets its own either way, as the pipeline gives it. docs/models.md.
    pooled: str = "first"
    # Families with a T5 encoder of their own (SD3, FLUX): the whole prompt's T5 tokens, cut
    # or padded to this many (the cut prompts are counted on the driver). 0 = the family's
    # pipeline default: SD3 256, FLUX 512. Longer than the model was trained at is allowed
    # (T5's positions are relative) but untested by its makers.
    t5_max_tokens: int = 0


@dataclass(frozen=True)
class T5BranchConfig:
    """The T5 branch of the reference release (off by default; encoding/t5.py): the whole
    prompt through a frozen T5 encoder and a TextAdapter, whose tokens follow the CLIP
    segment tokens (reference: 240 + 240 = 480)."""

    # "" = off; "tiny" (a test-sized random T5 with an offline tokenizer), a local folder or
    # a hub id (reference: google-t5/t5-large).
    encoder: str = ""
    # The adapter's weights: a folder saved by TextAdapter.save_pretrained (the reference
    # starts stage 1 from LaVi-Bridge's t5_unet/adapter); "" = the text_adapter/ of the
    # model folder (model.pretrained) when it has one (stage 1's model/ does), else random.
    adapter: str = ""
    # T5 tokens of the whole prompt, cut or padded to this many (reference: 240).
    max_tokens: int = 240
    # The adapter's size between its two feed-forwards (reference: 896), when it starts random.
    adapter_dim: int = 896
    # Stage 1 trains the adapter with the UNet at this learning rate (null = train.lr: the
    # reference's one AdamW, with the same warm-up); stage 2 keeps it frozen.
    adapter_lr: float | None = None


@dataclass(frozen=True)
class SamplerConfig:
    # Ray sampler actors (no gradient); each trainer worker draws from actor rank % num_actors.
    num_actors: int = 6
    # Resources per actor; fractions share a GPU. The autoscaler adds nodes to satisfy them.
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    # Ray custom resources per actor besides CPU and GPU, to place the actors on one node
    # type: a cluster YAML's node type declares them ({"sampler_node": 1}), or Ray's
    # accelerator resources ({"accelerator_type:A10G": 0.01}). cluster/README.md.
    resources: dict = field(default_factory=dict)
    # How long a trainer worker keeps asking the sampler actors for one rollout while they
    # fail (a dead actor is restarted and rebuilds its model: seconds for the tiny model,
    # minutes for SD v1.5 on a new node) before the step fails with the last cause. Seconds.
    timeout_s: float = 600.0
    # DDIM steps from pure noise (reference: 50, t = 999, 979, ..., 19); on a flow-matching
    # model (SD3, FLUX) its Euler steps, on the model's own shifted schedule.
    num_steps: int = 50
    # "trailing" gives the reference timesteps 999..19; "leading" gives diffusers' 981..1.
    # DDIM's: a flow-matching model's schedule is its scheduler's (not read).
    timestep_spacing: str = "trailing"
    # Classifier-free guidance scale; FLUX.1-dev's guidance embedding takes it instead
    # (guidance-distilled: one denoiser call per step, FluxPipeline's default 3.5).
    guidance_scale: float = 7.5
    # Image side in pixels (latents are resolution / the VAE's scale factor, 8 for SD's).
    resolution: int = 512
    # Steps whose UNet call gets a gradient: every (num_steps // num_grad_steps)-th step
    # from a random offset (reference: 5 of 50, every 10th), drawn once per optimiser step
    # for its whole global batch.
    num_grad_steps: int = 5
    # Which steps those are: "strided" (the reference's, above) or "last" (the chain's last
    # num_grad_steps steps, as DRaFT-K and the flow-model reward-backprop recipes take them).
    grad_steps: str = "strided"
    # Sampler precision: fp32 | bf16 | fp16. Another split of the global batch changes the
    # order of sums: fp32 keeps runs the same to ~1e-5, 16 bits to ~1e-2 (docs/scaling.md).
    precision: str = "bf16"
    # DDIM's eta for policy-gradient algorithms (algorithm.name grpo | ddpo): each step adds
    # eta-scaled noise, which makes it a Gaussian with a log-probability (ddpo-pytorch: 1.0).
    # On a flow-matching model (SD3, FLUX) the noise level a of Flow-GRPO's SDE
    # (sampling/flow.py; Flow-GRPO: 0.7). Reward backpropagation samples deterministically
    # (eta 0, the ODE) and ignores it.
    eta: float = 1.0
    # What the chain hands to the VAE: "step" (the last DDIM step's output; with SD v1.5's
    # set_alpha_to_one=false that is 0.99957 x0_pred + 0.02916 eps) or "pred_x0" (the last
    # step's predicted clean latent, as the reference decodes: the DDIM scheduler with
    # set_alpha_to_one, whose last step then returns exactly x0_pred). docs/reference_mode.md.
    # DDIM's: a flow-matching model's last Euler step lands on sigma 0 (not read).
    final: str = "step"
    # Sample with the LoRA's dropout active (train mode), as the reference's chain does; the
    # dropout masks of a UNet call are drawn from a seed of the rollout and the step, which
    # the trainer replays, so the replay stays exact. false = dropout off (eval mode).
    # Masks are drawn per batch, so with true a run is not the same on another split of its
    # global batch (docs/scaling.md).
    train_mode: bool = False


@dataclass(frozen=True)
class RewardConfig:
    # A registered reward (see `longalign_rl.registry.list_rewards()`) or "pkg.module:Class".
    name: str = "hpsv2"
    # Keyword arguments for the reward, e.g. text_irrelevant_weight, direction. An override
    # that names another reward starts from empty kwargs (they belong to the reward).
    kwargs: dict = field(default_factory=dict)
    # Reward actors (algorithm.name grpo | ddpo): with num_actors > 0 a pool of Ray actors
    # builds the reward and scores the samplers' finished images while the samplers go on
    # sampling; the driver and the trainer workers then never build nor import it. Each
    # actor reserves num_cpus / num_gpus of its own (a large reward model on its own GPU)
    # and runs in runtime_env, Ray's runtime environment (pip, py_modules, env_vars, ...),
    # so the reward may need packages the trainers do not have. 0: the trainers score.
    num_actors: int = 0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict = field(default_factory=dict)  # custom resources per actor, as sampler.resources
    runtime_env: dict = field(default_factory=dict)
    # Reward actors: how long a trainer worker waits for one batch's scores (a reward call
    # that blocks, a server that never answers) before the step fails, naming this key. In
    # seconds; it covers re-sending the batch to the next actor when one dies.
    timeout_s: float = 600.0
    # Reward actors: how many times Ray restarts an actor whose process died (a crash in the
    # reward's native code, out of memory); after that the actor is gone, and when every
    # actor is gone the step fails with the cause. Ray's -1 (for ever) is not allowed.
    max_restarts: int = 3


@dataclass(frozen=True)
class AlgorithmConfig:
    """How stage 2 turns the samplers' images into updates (docs/algorithms.md). The
    algorithms are registry.Algorithm records, found by name like rewards: the built-in
    reward_backprop, grpo and ddpo (longalign_rl/algorithms/), or a third party's.

    reward_backprop: LongAlign's reference (docs/method.md): the reward's gradient flows
    back through the decoder and the gradient steps; the reward must be differentiable.
    grpo | ddpo: policy gradients (PPO-clip on the log-probabilities of stochastic DDIM
    steps); any reward, differentiable or not (a checker, a detector, OCR). The policy-
    gradient defaults below are ddpo-pytorch's unless a comment says otherwise."""

    # A registered algorithm (reward_backprop | grpo | ddpo, or an entry point in the group
    # longalign_rl.algorithms) or an import path 'package.module:ALGORITHM'.
    name: str = "reward_backprop"
    # A third-party algorithm's own keyword arguments (its record checks them).
    kwargs: dict = field(default_factory=dict)
    # grpo: samples drawn per prompt; advantages are the rewards normalised within each
    # group. A group is sampled by one actor and trained by one worker, so
    # train.batch_size must be a multiple of it (Flow-GRPO: 12-24; here 4).
    group_size: int = 4
    # grpo: the samples of a group start from the same noise (DanceGRPO's shared
    # initialisation), so their rewards differ only through the steps' noise, which is what
    # the policy gradient credits; false = independent starts (ddpo-pytorch, Flow-GRPO).
    shared_start: bool = False
    # Fraction of the stochastic steps (sde_window) trained, drawn per step from its seed
    # (ddpo-pytorch: 1.0; Flow-GRPO trains about 0.6 of them). Only those are recorded.
    timestep_fraction: float = 1.0
    # The part of the chain sampled stochastically, [start, end) as fractions of the DDIM
    # steps from the noisy end; the other steps are deterministic DDIM (eta 0) and never
    # trained, as Flow-GRPO-Fast and MixGRPO do: noise enters only where the policy
    # gradient credits it. [0.0, 0.5] = the first half, where layout and shapes are decided.
    sde_window: tuple[float, float] = (0.0, 1.0)
    # PPO's clip range for the ratio of new to sampling probability of a step.
    clip_range: float = 1e-4
    # Advantages are clipped to [-advantage_clip, advantage_clip].
    advantage_clip: float = 5.0
    # Weight of the KL penalty to the starting model (the LoRA adapter disabled, or a frozen
    # copy of the UNet when fine-tuning it whole); 0 = no penalty and no reference pass.
    # reward_backprop: a KL-style penalty, the squared distance of the guided predictions to
    # the starting model's at the replayed steps (one more forward pass per step, no graph).
    kl_weight: float = 0.0
    # reward_backprop: each sample's reward counts up to this value in the loss, so a prompt
    # already above it is not pushed further (null = no cap). Off by default: a regulariser
    # against reward hacking, measured in docs/guard.md.
    reward_cap: float | None = None
    # Optimiser updates over each step's samples (ddpo-pytorch: num_inner_epochs). The
    # warm-up (train.warmup_steps) still counts steps, i.e. batches of samples.
    inner_epochs: int = 1
    # ddpo: each prompt's rewards are normalised by the mean and std of its last
    # buffer_size rewards once it has min_count of them, by the whole batch's before.
    buffer_size: int = 16
    min_count: int = 16


@dataclass(frozen=True)
class LoRAConfig:
    # False = full fine-tuning of the UNet.
    enabled: bool = True
    # LoRA rank of every adapted layer (reference: 32).
    rank: int = 32
    # LoRA scale alpha / rank (reference: alpha = rank, a scale of 1).
    alpha: float = 32.0
    # Dropout on each LoRA layer's input while training (reference: 0.1); the samplers use
    # it too with sampler.train_mode.
    dropout: float = 0.1
    # The layers adapted: names of Linear / Conv2d modules of the UNet (the default adds the
    # transformer blocks' proj_in / proj_out and ff.net.2 to the reference's resnet,
    # attention and GEGLU layers: config.REFERENCE_LORA_TARGETS, docs/reference_mode.md).
    target_modules: tuple[str, ...] = (
        "to_q", "to_k", "to_v", "to_out.0",      # attention
        "proj_in", "proj_out",                   # transformer block in/out
        "ff.net.0.proj", "ff.net.2",             # GEGLU feed-forward
        "conv1", "conv2", "conv_shortcut", "time_emb_proj",  # resnet blocks
    )


@dataclass(frozen=True)
class TrainConfig:
    # Optimiser steps (reference: about 3,750).
    steps: int = 3750
    # Ray Train workers, each with a DeepSpeed engine (reference: 6 GPUs).
    num_workers: int = 6
    # Elastic training (Ray Train's ScalingConfig(num_workers=(min, max))): 0 = always
    # num_workers; else the run starts with as many workers as the cluster holds between
    # min_workers and num_workers, and after a lost node restarts from its last checkpoint
    # with those that are left instead of waiting. Each worker count keeps the global batch
    # num_workers x batch_size x grad_accum by accumulating more micro-steps, so it must
    # divide by every count x batch_size (docs/scaling.md).
    min_workers: int = 0
    use_gpu: bool = True
    # CPUs Ray reserves per worker (fractions allowed: the tiny run packs 4 processes on 2 cores).
    cpus_per_worker: float = 1.0
    # Ray custom resources per worker besides CPU and GPU, to place the workers on one node
    # type (as sampler.resources).
    resources: dict = field(default_factory=dict)
    # Prompts per worker per micro-step (reference: 48 global / 6 GPUs = 8).
    batch_size: int = 8
    # Micro-steps accumulated per optimiser step.
    grad_accum: int = 1
    # AdamW, as the reference.
    lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    # Linear warm-up to lr over this many steps, then constant.
    warmup_steps: int = 2000
    # true: update k (from 0) runs at lr * k / warmup_steps, so the first runs at lr 0, as the
    # reference's LambdaLR (diffusers' constant_with_warmup); false: at lr * (k + 1) /
    # warmup_steps, the first at lr / warmup_steps. Reference: true. training/engine.py warmup.
    warmup_from_zero: bool = False
    # Global gradient-norm clip.
    grad_clip: float = 0.3
    # Trainer precision: fp32 | bf16 | fp16. As sampler.precision: another split of the
    # global batch keeps a run the same to ~1e-5 in fp32, ~1e-2 in 16 bits (docs/scaling.md).
    precision: str = "bf16"
    # DeepSpeed ZeRO stage: 0, 1 or 2 (stage 3 would shard the weights the samplers need).
    # With 1 or 2 each checkpoint also holds the optimiser state whole, so a resume may change
    # train.num_workers; stage 0 in bf16 / fp16 resumes on the same count only (docs/scaling.md).
    zero_stage: int = 2
    # Recompute UNet activations in backward (saves memory at gradient steps).
    activation_checkpointing: bool = True
    # A step (sampling wait, update, logging, checkpoint, validation) that takes longer ends
    # its worker's process, with where it was blocked in errors/rank<r>.txt: a reward or hook
    # that never returns cannot be interrupted, and the other workers would wait for it in
    # the next collective. Seconds.
    step_timeout_s: float = 3600.0
    # Publish weights to the sampler actors every this many steps.
    sync_every: int = 1
    # Most optimiser steps a rollout's weights may lag the trainer's (1 = samplers work on
    # the next batch while the trainer updates; 0 = fully on-policy, no overlap).
    max_policy_lag: int = 1
    # Seeds prompt order, noise and LoRA dropout. A sample's noise comes from (seed, step,
    # its place in the global batch): the same run with any num_workers x batch_size x
    # grad_accum of the same product, any number of actors (docs/scaling.md).
    seed: int = 0


@dataclass(frozen=True)
class SelectConfig:
    """Which validation picks the exported weights (guard.py): lora/ (unet/, model/) hold the
    selected validation's, lora_last/ (unet_last/) the last step's, and best/ keeps the
    selected ones whatever run.keep_checkpoints prunes."""

    # The validation key that picks the run's weights (a mean of validation.jsonl: a judge's
    # "judge/<name>", "reward", a metric hook's name). "" = the first judge key when run.judge
    # has one, else no selection: lora/ holds the last step's weights, as without a guard.
    key: str = ""
    # Whether a higher value of the key is better.
    higher_is_better: bool = True
    # The selected validation is the latest whose value is within this many standard errors
    # (of its paired per-prompt change) of the best validation's: the one-standard-error
    # rule, so that the noise of a few validation prompts does not send a run that is still
    # improving back to an early lucky draw. 0 = the best validation itself.
    within: float = 1.0


@dataclass(frozen=True)
class EarlyStopConfig:
    """Ending the run when run.select_by's key stops improving (off by default); the run then
    ends as a finished one does: checkpoint, export of the selected weights, summary."""

    # Stop after this many validations in a row without a new best of run.select_by's key
    # (0 = never for that reason).
    patience: int = 0
    # Stop at the first validation whose selected key is worse than at the best validation
    # by more than its uncertainty (two standard errors of the paired per-prompt changes).
    on_drop: bool = False


@dataclass(frozen=True)
class DriftConfig:
    """Drift alarms (guard.py), with or without a judge: at every validation each statistic
    of the validation images (validation keys drift/<name>) against step 0's, the same
    prompts and noise, prompt by prompt. An alarm fires once per statistic, when its mean
    change is beyond the threshold here and beyond its uncertainty: one console line, a
    tracker event (alarm/<name>), a row in summary.md. 0 turns one off. The defaults sit
    above what the default ShapesWorld run moves and below what a brightness-rewarding run
    does (docs/guard.md, "Calibration")."""

    # Mean luma in [0, 1].
    brightness: float = 0.1
    # Mean HSV saturation in [0, 1].
    saturation: float = 0.1
    # Standard deviation of the luma within an image.
    contrast: float = 0.05
    # Share of the spectral power above half the Nyquist frequency (grids, speckle; blur lowers it).
    high_frequency: float = 0.05
    # Distance of an image's mean colour from the set's: colour diversity across prompts.
    colour_spread: float = 0.05
    # 1 - cosine to the step-0 image in the reward's image tower (a judge's without one). Any
    # training moves it: the default ShapesWorld run reaches 0.12-0.17 (docs/guard.md).
    feature_distance: float = 0.2


@dataclass(frozen=True)
class RunConfig:
    # Runs are written to output_dir/name; an empty name is replaced by a timestamp.
    output_dir: str = "runs"
    name: str = ""
    # Ray Train checkpoint every this many steps (and at the end).
    checkpoint_every: int = 250
    # Image grid of the current rollout every this many steps (and at step 1).
    image_every: int = 250
    # Validation: fixed prompts, prompt i drawn from seed validation_seed + i with deterministic
    # DDIM (sampler.num_steps, guidance_scale) at step 0, every eval_every steps and at the
    # end; scored by the reward and the metric hooks; saved as validation/step_<k>.png (each
    # image beside step 0's) and validation.jsonl, logged to the trackers as val/..., and
    # compared first vs last in summary.json / summary.md. `validation`: a prompt source as
    # prompts.source ("" = the first validation_size prompts of prompts.source).
    validation: str = ""
    # Validation prompts used (the first ones of the source); 0 turns validation off.
    validation_size: int = 8
    # The seed of validation prompt i is validation_seed + i.
    validation_seed: int = 0
    # Steps between validations.
    eval_every: int = 250
    # Worker restarts Ray Train allows (each resumes from the last checkpoint).
    max_failures: int = 3
    # A step whose loss, gradient norm, reward (every sample's) or weights are NaN or
    # infinite is tolerated this many times in a row; one more stops the run, keeping the
    # last finite checkpoint and exporting nothing (run_dir/stopped.json says why; exit 1).
    max_nonfinite_steps: int = 3
    # Checkpoints kept on disk (the newest ones); 0 keeps all.
    keep_checkpoints: int = 3
    # Metric hooks of stage 2, as import paths "pkg.module:function": each is called as
    # fn(images [B,3,H,W] in [0,1], prompts) on every rollout and returns {name: Tensor[B]},
    # logged per step as all-worker means (a world's exact checker, say). Every call must
    # return the same names.
    metrics: tuple[str, ...] = ()
    # The console shows the run's own output only (header, progress, warnings, outputs,
    # summary); true brings back the libraries' and the workers' logs (Ray Train, DeepSpeed,
    # model loading), as they are forwarded to the driver.
    verbose: bool = False
    # With RAY_ADDRESS set (a cluster to join), how long the driver tries to reach it
    # before it stops with an error (Ray's own client retries for ever). Seconds.
    connect_timeout_s: float = 30.0
    # Experiment trackers the driver logs the metrics, image grids and config to:
    # tensorboard (run_dir/tensorboard, offline), wandb, mlflow (longalign_rl/trackers.py).
    report_to: tuple[str, ...] = ("tensorboard",)
    # The guard against reward hacking (longalign_rl/guard.py, docs/guard.md).
    # Judges: scorers run only on the validation images, never trained on, each a mapping
    # {reward: a registered name or import path, kwargs: {...}, name: its key} or {metric:
    # 'pkg.module:function'}; validation keys judge/<name> (a reward's total; its parts as
    # judge/<name>/<part>) and judge/<metric's names>. The console and summary.md set the
    # reward beside them and say when they diverge.
    judge: tuple[dict, ...] = ()
    select_by: SelectConfig = field(default_factory=SelectConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)


REPORT_TO = ("tensorboard", "wandb", "mlflow")

# The reference's LoRA layers (its injector: every Linear and Conv2d under a ResnetBlock2D,
# an Attention or a GEGLU): the default's without the transformer blocks' proj_in /
# proj_out and the feed-forward's output ff.net.2. SD v1.5 at rank 4: 224 layers and
# 3.54 M parameters, against the default's 272 and 3.99 M (docs/reference_mode.md).
REFERENCE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                          "conv1", "conv2", "conv_shortcut", "time_emb_proj")


@dataclass(frozen=True)
class Config:
    # 1 = supervised long-text fine-tuning with the denoising loss on `data` (docs/method.md
    # section 4); 2 = reward fine-tuning with sampler actors and `reward` (section 3).
    stage: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)
    # Stage 1's image-caption pairs.
    data: DataConfig = field(default_factory=DataConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    t5: T5BranchConfig = field(default_factory=T5BranchConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def global_batch(self) -> int:
        """Samples per optimiser step over all workers."""
        return self.train.num_workers * self.train.batch_size * self.train.grad_accum

    def with_workers(self, world: int) -> "Config":
        """This config on `world` workers (an elastic run's count): the same global batch, the
        accumulation scaled to keep it."""
        t = self.train
        if world == t.num_workers:
            return self
        if self.global_batch % (world * t.batch_size):
            raise ConfigError(f"train.min_workers: {world} workers x train.batch_size {t.batch_size} do not divide "
                              f"the global batch of {self.global_batch}")
        accum = self.global_batch // (world * t.batch_size)
        return dataclasses.replace(self, train=dataclasses.replace(t, num_workers=world, grad_accum=accum))

    @property
    def samples_per_start(self) -> int:
        """Consecutive samples that share their starting noise (a grpo group with
        algorithm.shared_start; 1 otherwise)."""
        algorithm = algorithm_of(self)
        return algorithm.group_size(self) if algorithm.shared_start(self) else 1

    @property
    def prompts_per_batch(self) -> int:
        """Distinct prompts in one worker's batch (an algorithm that draws each prompt
        several times, grpo's groups, draws fewer)."""
        return self.train.batch_size // algorithm_of(self).group_size(self)


def _merge_layers(base: dict, override: dict) -> dict:
    """merge, except that reward.kwargs belong to their reward and data.kwargs to their
    generator: naming another reward (data source) starts from no kwargs instead of
    inheriting the previous one's."""
    merged = merge(base, override)
    for section, name in (("reward", "name"), ("data", "source")):
        new, old = override.get(section) or {}, base.get(section) or {}
        if isinstance(new, dict) and isinstance(old, dict) and name in new and new[name] != old.get(name):
            merged[section] = {**merged[section], "kwargs": new.get("kwargs", {})}
    return merged


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping, over the files its `include:` names (a path or a list of
    paths, relative to the file; each included in order, the later over the earlier, and the
    file's own keys over them all, merged as command-line overrides are), so that a fact
    shared by several configs is written once."""
    path = Path(path)
    if not path.is_file():
        where = f" (include: of {str(_chain[-1])!r})" if _chain else ""
        raise ConfigError(f"config file {str(path)!r} does not exist{where}")
    if path.resolve() in _chain:
        raise ConfigError("include: a config includes itself: " + " -> ".join(str(p) for p in (*_chain, path)))
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"include: in {str(path)!r} must be a path or a list of paths, got {includes!r}")
    merged: dict = {}
    for name in includes:
        merged = _merge_layers(merged, read_config_file(path.parent / name, (*_chain, path.resolve())))
    return _merge_layers(merged, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file's overrides (with the files it includes), then dotted
    command-line overrides."""
    data = read_config_file(path) if path is not None else {}
    data = _merge_layers(data, dotted(overrides or []))
    cfg = build(Config, data, "")
    validate(cfg)
    return cfg


def from_dict(data: dict) -> Config:
    """A config from a (resolved) dict, as saved in a run directory."""
    cfg = build(Config, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _floats(obj, prefix: str = ""):
    """(key, value) of every float in the config, nested sections and tuples included."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _floats(value, key + ".")
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, tuple):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def validate(cfg: Config) -> None:
    """Checks that span a value's range or several keys."""
    s, t, d = cfg.sampler, cfg.train, cfg.data
    for key, value in _floats(cfg):  # inf or nan anywhere turns into NaN weights later
        _require(math.isfinite(value), key, f"must be a finite number, got {value}")
    _require(cfg.stage in (1, 2), "stage",
             f"must be 1 (supervised fine-tuning) or 2 (reward fine-tuning), got {cfg.stage}")
    if cfg.stage == 1:
        _require(bool(d.source.strip()), "data.source",
                 "stage 1 needs image-caption pairs: a folder, a .jsonl or .csv manifest or 'pkg.module:function'")
    _require(d.epochs >= 1, "data.epochs", f"must be >= 1, got {d.epochs}")
    _require(d.resolution >= 8 and d.resolution % 8 == 0, "data.resolution",
             f"must be a positive multiple of 8, got {d.resolution}")
    _require(0.0 <= d.caption_dropout <= 1.0, "data.caption_dropout", f"must be in [0, 1], got {d.caption_dropout}")
    _require(d.resize in ("bicubic", "bilinear"), "data.resize", f"must be bicubic or bilinear, got {d.resize!r}")
    for key, value in [("sampler.num_actors", s.num_actors), ("sampler.num_steps", s.num_steps),
                       ("sampler.num_grad_steps", s.num_grad_steps), ("train.steps", t.steps),
                       ("train.num_workers", t.num_workers), ("train.batch_size", t.batch_size),
                       ("train.grad_accum", t.grad_accum), ("train.sync_every", t.sync_every),
                       ("prompts.max_tokens", cfg.prompts.max_tokens), ("run.checkpoint_every", cfg.run.checkpoint_every),
                       ("run.image_every", cfg.run.image_every), ("run.eval_every", cfg.run.eval_every),
                       ("lora.rank", cfg.lora.rank)]:
        _require(value >= 1, key, f"must be >= 1, got {value}")
    _require(s.num_grad_steps <= s.num_steps, "sampler.num_grad_steps",
             f"{s.num_grad_steps} gradient steps do not fit in sampler.num_steps={s.num_steps}")
    _require(cfg.prompts.split in PROMPT_SPLITS, "prompts.split",
             f"must be one of {', '.join(PROMPT_SPLITS)}, got {cfg.prompts.split!r}")
    _require(cfg.prompts.pooled in ("first", "mean"), "prompts.pooled",
             f"must be first or mean, got {cfg.prompts.pooled!r}")
    _require(not (cfg.prompts.split != "sentences" and cfg.prompts.pack_segments), "prompts.pack_segments",
             f"prompts.split: {cfg.prompts.split} keeps its pieces as they are; packing needs prompts.split: sentences")
    _require(cfg.t5.max_tokens >= 1, "t5.max_tokens", f"must be >= 1, got {cfg.t5.max_tokens}")
    _require(cfg.prompts.t5_max_tokens >= 0, "prompts.t5_max_tokens",
             f"must be >= 0 (0 = the family's default), got {cfg.prompts.t5_max_tokens}")
    _require(cfg.t5.adapter_dim >= 1, "t5.adapter_dim", f"must be >= 1, got {cfg.t5.adapter_dim}")
    _require(cfg.t5.adapter_lr is None or cfg.t5.adapter_lr > 0, "t5.adapter_lr",
             f"must be > 0 (or null: train.lr), got {cfg.t5.adapter_lr}")
    _require(bool(cfg.t5.encoder) or not cfg.t5.adapter, "t5.adapter",
             "an adapter without its T5 encoder does nothing; set t5.encoder too")
    _require(s.final in ("step", "pred_x0"), "sampler.final", f"must be step or pred_x0, got {s.final!r}")
    _require(s.grad_steps in ("strided", "last"), "sampler.grad_steps", f"must be strided or last, got {s.grad_steps!r}")
    _require(s.timestep_spacing in ("trailing", "leading", "linspace"), "sampler.timestep_spacing",
             f"must be trailing, leading or linspace, got {s.timestep_spacing!r}")
    _require(s.resolution % 8 == 0, "sampler.resolution", f"must be a multiple of 8, got {s.resolution}")
    for key, value in [("sampler.precision", s.precision), ("train.precision", t.precision)]:
        _require(value in ("fp32", "bf16", "fp16"), key, f"must be fp32, bf16 or fp16, got {value!r}")
    _require(t.zero_stage in (0, 1, 2), "train.zero_stage", f"must be 0, 1 or 2, got {t.zero_stage}")
    _require(t.max_policy_lag >= 0, "train.max_policy_lag", f"must be >= 0, got {t.max_policy_lag}")
    _require(t.sync_every - 1 <= t.max_policy_lag, "train.sync_every",
             f"sync_every={t.sync_every} lets the samplers lag {t.sync_every - 1} steps, more than "
             f"train.max_policy_lag={t.max_policy_lag}")
    _require(s.guidance_scale >= 1.0, "sampler.guidance_scale", f"must be >= 1, got {s.guidance_scale}")
    _require(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    for i, beta in enumerate(t.betas):
        _require(0.0 <= beta < 1.0, f"train.betas[{i}]", f"must be in [0, 1), got {beta}")
    _require(t.eps > 0, "train.eps", f"must be > 0, got {t.eps}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 = no clipping), got {t.grad_clip}")
    _require(cfg.lora.alpha > 0, "lora.alpha", f"must be > 0, got {cfg.lora.alpha}")
    _require(bool(cfg.lora.target_modules), "lora.target_modules", "must name at least one module")
    _require(s.resolution >= 8, "sampler.resolution", f"must be >= 8, got {s.resolution}")
    for key, resources in [("train.resources", t.resources), ("sampler.resources", s.resources),
                           ("reward.resources", cfg.reward.resources)]:
        for name, amount in resources.items():
            _require(name not in ("CPU", "GPU", "memory"), key,
                     f"{name!r} has its own key (num_cpus, num_gpus, cpus_per_worker, use_gpu); this one is for "
                     "custom resources")
            _require(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0, key,
                     f"{name!r}: {amount!r} is not a positive number")
    if t.min_workers:
        _require(1 <= t.min_workers <= t.num_workers, "train.min_workers",
                 f"must be 0 (fixed) or between 1 and train.num_workers={t.num_workers}, got {t.min_workers}")
        bad = [w for w in range(t.min_workers, t.num_workers + 1) if cfg.global_batch % (w * t.batch_size)]
        _require(not bad, "train.min_workers",
                 f"{', '.join(map(str, bad))} workers x train.batch_size {t.batch_size} cannot hold the global batch "
                 f"of {cfg.global_batch} by accumulation; raise min_workers or choose a global batch that "
                 f"every count from {t.min_workers} to {t.num_workers} divides")
    _require(cfg.stage == 1 or s.num_actors <= t.num_workers, "sampler.num_actors",
             f"{s.num_actors} actors for {t.num_workers} trainer workers: worker i draws from actor "
             f"i % num_actors, so {s.num_actors - t.num_workers} would never be used")
    for key, value in [("sampler.num_cpus", s.num_cpus), ("sampler.num_gpus", s.num_gpus),
                       ("train.cpus_per_worker", t.cpus_per_worker), ("reward.num_actors", cfg.reward.num_actors),
                       ("reward.num_cpus", cfg.reward.num_cpus), ("reward.num_gpus", cfg.reward.num_gpus)]:
        _require(value >= 0, key, f"must be >= 0, got {value}")
    _require(t.step_timeout_s > 0, "train.step_timeout_s", f"must be > 0 seconds, got {t.step_timeout_s}")
    _require(cfg.run.connect_timeout_s > 0, "run.connect_timeout_s",
             f"must be > 0 seconds, got {cfg.run.connect_timeout_s}")
    _require(s.timeout_s > 0, "sampler.timeout_s", f"must be > 0 seconds, got {s.timeout_s}")
    _require(cfg.reward.timeout_s > 0, "reward.timeout_s", f"must be > 0 seconds, got {cfg.reward.timeout_s}")
    _require(cfg.reward.max_restarts >= 0, "reward.max_restarts", f"must be >= 0, got {cfg.reward.max_restarts}")
    _require(cfg.run.max_nonfinite_steps >= 0, "run.max_nonfinite_steps",
             f"must be >= 0, got {cfg.run.max_nonfinite_steps}")
    _require(cfg.run.max_failures >= -1, "run.max_failures", f"must be >= 0 (or -1: retry forever), got "
             f"{cfg.run.max_failures}")
    _require(cfg.run.validation_size >= 0, "run.validation_size",
             f"must be >= 0 (0: no validation), got {cfg.run.validation_size}")
    name = cfg.run.name
    _require(not name or (name not in (".", "..") and "/" not in name and "\\" not in name and not name.startswith("~")),
             "run.name", f"must be a folder name inside run.output_dir (no '/', '..' or '~'), got {name!r}")
    _require(cfg.run.keep_checkpoints >= 0, "run.keep_checkpoints", f"must be >= 0, got {cfg.run.keep_checkpoints}")
    _require(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _validate_algorithm(cfg)
    for i, name in enumerate(cfg.run.report_to):
        _require(name in REPORT_TO, f"run.report_to[{i}]", f"must be one of {', '.join(REPORT_TO)}, got {name!r}")
    for i, hook in enumerate(cfg.run.metrics):
        _require(bool(IMPORT_PATH.match(hook)), f"run.metrics[{i}]",
                 f"must be an import path 'package.module:function', got {hook!r}")
    _validate_guard(cfg)


def _validate_guard(cfg: Config) -> None:
    from longalign_rl.guard import judge_entries, selection_key

    r = cfg.run
    judges = judge_entries(r.judge)  # a ConfigError naming run.judge[i]
    for name in dataclasses.fields(r.drift):
        value = getattr(r.drift, name.name)
        _require(value >= 0, f"run.drift.{name.name}", f"must be >= 0 (0: no alarm), got {value}")
    _require(r.select_by.within >= 0, "run.select_by.within",
             f"must be >= 0 standard errors (0: the best validation itself), got {r.select_by.within}")
    _require(r.early_stop.patience >= 0, "run.early_stop.patience",
             f"must be >= 0 (0: no patience limit), got {r.early_stop.patience}")
    wanted = [key for key, on in (("run.judge", bool(judges)), ("run.select_by.key", bool(r.select_by.key)),
                                  ("run.early_stop", r.early_stop.patience > 0 or r.early_stop.on_drop)) if on]
    _require(not wanted or r.validation_size > 0, wanted[0] if wanted else "run.validation_size",
             "works on the validation prompts, but run.validation_size is 0 (no validation); set it > 0")
    _require(not (r.early_stop.patience > 0 or r.early_stop.on_drop) or selection_key(r) is not None,
             "run.early_stop", "needs a key to watch: set run.select_by.key or add a run.judge")


def _validate_algorithm(cfg: Config) -> None:
    a, s = cfg.algorithm, cfg.sampler
    try:
        algorithm = algorithm_of(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    _require(s.eta >= 0, "sampler.eta", f"must be >= 0, got {s.eta}")
    _require(a.group_size >= 2, "algorithm.group_size",
             f"must be >= 2 (a lone sample has no group to be compared with), got {a.group_size}")
    _require(0.0 < a.timestep_fraction <= 1.0, "algorithm.timestep_fraction",
             f"must be in (0, 1], got {a.timestep_fraction}")
    start, end = a.sde_window
    _require(len(a.sde_window) == 2 and 0.0 <= start < end <= 1.0, "algorithm.sde_window",
             f"must be [start, end] with 0 <= start < end <= 1 (fractions of the DDIM steps), got {list(a.sde_window)}")
    for key, value in [("algorithm.clip_range", a.clip_range), ("algorithm.advantage_clip", a.advantage_clip)]:
        _require(value > 0, key, f"must be > 0, got {value}")
    _require(a.kl_weight >= 0, "algorithm.kl_weight", f"must be >= 0, got {a.kl_weight}")
    _require(a.reward_cap is None or algorithm.differentiable_reward, "algorithm.reward_cap",
             f"caps the reward in reward backpropagation's loss; {a.name} normalises rewards into advantages, "
             "where a cap does not act: leave it null")
    for key, value in [("algorithm.inner_epochs", a.inner_epochs), ("algorithm.buffer_size", a.buffer_size),
                       ("algorithm.min_count", a.min_count)]:
        _require(value >= 1, key, f"must be >= 1, got {value}")
    _require(a.min_count <= a.buffer_size, "algorithm.min_count",
             f"{a.min_count} rewards never fit a buffer of algorithm.buffer_size={a.buffer_size}")
    if cfg.stage == 1:
        return
    _require(not algorithm.differentiable_reward or cfg.reward.num_actors == 0, "reward.num_actors",
             f"reward actors score without a gradient; {a.name} needs the reward's gradient in the trainer workers "
             f"(got {cfg.reward.num_actors} actors)")
    algorithm.check(cfg)
