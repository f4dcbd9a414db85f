"""The ShapesWorld experiment: does LongAlign do what it claims, where the truth is known?

    python -m shapesworld.experiment                  # about 12 minutes on 2 CPU cores
    python -m shapesworld.experiment --quick --out /tmp/x   # seconds (tests)

For each seed it measures the exact checker's accuracy per cell-sentence position (colour
and shape) and the background (an attribute no reward scores), on held-out captions:
- the shipped base, prompts encoded the plain 77-token way (truncated) and by segments;
- the shipped stage-1 model (the base fine-tuned on segment-encoded captions);
- stage 2: reward backpropagation from the stage-1 model with segment encoding, a LoRA,
  and the decomposed CLIP-type reward at text_irrelevant_weight w = 1.0, 0.3 and 0.0,
  logging the reward, both of its parts and the ground truth over steps.
It writes report.md (tables, mean +- std over seeds), results.json, PNG plots and image
grids to --out.

Stage 2 here runs the framework's own pure pieces (Sampler, reward_backprop_step, the
registered reward) in plain processes, on-policy, without Ray or DeepSpeed: the same
maths as `python -m longalign_rl.train`, minus the distribution, so nine short runs fit
on a laptop. Pure torch: no ray, no deepspeed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from shapesworld.evaluate import draw_captions, evaluate, ground_truth, make_encoder, summarize
from shapesworld.world import WorldConfig, caption, sample_scene
from longalign_rl.outputs import save_image_grid

WORLD = WorldConfig()


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...] = (0, 1, 2)
    weights: tuple[float, ...] = (1.0, 0.3, 0.0)  # text_irrelevant_weight of stage 2
    base: str = "shapesworld"
    stage1: str = "shapesworld-stage1"
    reward: str = "shapes_clip"
    steps: int = 50  # stage-2 optimiser steps per run
    batch: int = 16  # prompts per step
    lr: float = 2e-3
    lora_rank: int = 8
    grad_clip: float = 0.3  # the reference's
    num_steps: int = 10  # DDIM steps, training and evaluation
    num_grad_steps: int = 2
    guidance_scale: float = 5.0
    eval_n: int = 128  # held-out captions per evaluation
    workers: int = 2  # processes, one torch thread each

    @classmethod
    def quick(cls) -> "Settings":
        return cls(seeds=(0, 1), steps=2, batch=2, eval_n=4, lora_rank=2, workers=1)


@dataclass
class Job:
    kind: str  # "eval" or "stage2"
    seed: int
    model: str = ""
    encoding: str = "segment"
    weight: float = 0.0
    result: dict = field(default_factory=dict)


# ------------------------------------------------------------------------- jobs


def _eval_prompts(s: Settings, seed: int) -> list[str]:
    return draw_captions(WORLD, s.eval_n, seed=10_000 + seed)  # no training pool uses these seeds


def run_eval(job: Job, s: Settings, out: Path) -> dict:
    from longalign_rl.models import load_components

    prompts = _eval_prompts(s, job.seed)
    images, result = evaluate(load_components(job.model), job.encoding, prompts, seed=job.seed, cfg=WORLD,
                              num_steps=s.num_steps, guidance_scale=s.guidance_scale)
    if job.seed == s.seeds[0]:
        save_image_grid(images[:16], prompts[:16], out / "grids" / f"{job.model}_{job.encoding}.png")
    return result


def run_stage2(job: Job, s: Settings, out: Path) -> dict:
    """Reward backpropagation from the stage-1 model; history per step and a final evaluation."""
    from longalign_rl.algorithms.reward_backprop import reward_backprop_step
    from longalign_rl.config import LoRAConfig, SamplerConfig
    from longalign_rl.lora import make_trainable
    from longalign_rl.models import load_components
    from longalign_rl.registry import get_reward
    from longalign_rl.sampling.sampler import build_sampler
    from longalign_rl.vae import decode

    torch.manual_seed(job.seed)
    parts = load_components(s.stage1)
    params = make_trainable(parts.unet, LoRAConfig(rank=s.lora_rank, alpha=float(s.lora_rank), dropout=0.0))
    reward = get_reward(s.reward, text_irrelevant_weight=job.weight)
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=1e-2)
    settings = SamplerConfig(num_steps=s.num_steps, guidance_scale=s.guidance_scale, resolution=WORLD.image_size,
                             num_grad_steps=s.num_grad_steps, timestep_spacing="trailing", precision="fp32")
    sampler = build_sampler(settings, parts, encoder=make_encoder(parts, "segment"))
    rng = np.random.default_rng(20_000 + job.seed)  # training captions: fresh scenes every step
    history = []
    for step in range(s.steps):
        prompts = [caption(sample_scene(WORLD, rng), WORLD) for _ in range(s.batch)]
        rollout = sampler.sample(prompts, seed=job.seed * 1_000_003 + step)
        loss, stats = reward_backprop_step(parts.unet, parts.vae, reward, rollout, s.guidance_scale)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        optimizer.step()
        with torch.no_grad():
            images = decode(parts.vae, rollout.final_latents)  # what this step's policy drew
        record = {"step": step + 1, "loss": float(loss.detach())}
        record.update({k: float(v.mean()) for k, v in stats.items() if v.numel() and not k.startswith("segment_score")})
        gt = summarize(ground_truth(images, prompts, WORLD))
        record.update({"gt/colour": float(np.mean(gt["colour"])), "gt/shape": float(np.mean(gt["shape"])),
                       "gt/background": gt["background"]})
        history.append(record)
    prompts = _eval_prompts(s, job.seed)
    images, final = evaluate(parts, "segment", prompts, seed=job.seed, cfg=WORLD, num_steps=s.num_steps,
                             guidance_scale=s.guidance_scale)
    if job.seed == s.seeds[0]:
        save_image_grid(images[:16], prompts[:16], out / "grids" / f"stage2_w{job.weight}.png")
    return {"history": history, "final": final}


def _run(args: tuple[Job, Settings, str]) -> Job:
    job, s, out = args
    torch.set_num_threads(1)
    start = time.perf_counter()
    job.result = (run_eval if job.kind == "eval" else run_stage2)(job, s, Path(out))
    job.result["seconds"] = round(time.perf_counter() - start, 1)
    return job


def jobs(s: Settings) -> list[Job]:
    out = []
    for seed in s.seeds:  # the long ones first, so the pool ends together
        out += [Job("stage2", seed, s.stage1, "segment", w) for w in s.weights]
    for seed in s.seeds:
        out += [Job("eval", seed, s.base, "truncated"), Job("eval", seed, s.base, "segment"),
                Job("eval", seed, s.stage1, "truncated"), Job("eval", seed, s.stage1, "segment")]
    return out


# ------------------------------------------------------------------------- report


def conditions(done: list[Job], s: Settings) -> dict[str, list[dict]]:
    """Condition name -> one ground-truth summary per seed."""
    table: dict[str, list[dict]] = {}
    for model, name in ((s.base, "base"), (s.stage1, "stage 1")):
        for encoding in ("truncated", "segment"):
            table[f"{name}, {encoding}"] = [j.result for j in done if j.kind == "eval" and j.model == model
                                            and j.encoding == encoding]
    for w in s.weights:
        table[f"stage 2 (w = {w}), segment"] = [j.result["final"] for j in done if j.kind == "stage2" and j.weight == w]
    return table


def _ms(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values.mean():.2f}"


def curves(done: list[Job], s: Settings, key: str) -> dict[float, np.ndarray]:
    """w -> [seeds, steps] of one history key."""
    return {w: np.array([[r.get(key, np.nan) for r in j.result["history"]] for j in done
                         if j.kind == "stage2" and j.weight == w]) for w in s.weights}


def write_report(done: list[Job], s: Settings, out: Path, seconds: float, command: str) -> str:
    table = conditions(done, s)
    n_cells = WORLD.grid**2
    lines = [
        "# ShapesWorld experiment",
        "",
        f"Command: `{command}`  ",
        f"Wall clock: {seconds / 60:.1f} min ({s.workers} processes, one torch thread each). "
        f"Seeds: {', '.join(map(str, s.seeds))}; {s.eval_n} held-out captions per evaluation and seed; "
        f"DDIM {s.num_steps} steps, guidance {s.guidance_scale}.",
        "",
        "Ground truth = the exact checker (shapesworld/checker.py), per cell-sentence "
        "position (1 = top left ... 4 = bottom right). Under 77-token truncation the colours and "
        "shapes of cells 3 and 4 are cut off. Background = fraction of the pixels between cells that "
        "read as black (no reward scores it). Mean ± std over seeds.",
        "",
        "| condition | " + " | ".join(f"colour {i}" for i in range(1, n_cells + 1)) + " | "
        + " | ".join(f"shape {i}" for i in range(1, n_cells + 1)) + " | background |",
        "|---" * (2 * n_cells + 2) + "|",
    ]
    for name, rows in table.items():
        colour = [_ms([r["colour"][i] for r in rows]) for i in range(n_cells)]
        shape = [_ms([r["shape"][i] for r in rows]) for i in range(n_cells)]
        lines.append(f"| {name} | " + " | ".join(colour + shape) + f" | {_ms([r['background'] for r in rows])} |")
    lines += ["", f"## Stage 2 over {s.steps} steps (reward `{s.reward}`, batch {s.batch}, LoRA rank "
              f"{s.lora_rank}, lr {s.lr})", "",
              "First and last 10% of steps, on the training batches themselves (mean over seeds):", "",
              "| w | reward | text-relevant | text-irrelevant | gt colour | gt shape | background |",
              "|---|---|---|---|---|---|---|"]
    k = max(1, s.steps // 10)
    for w in s.weights:
        cells = []
        for key in ("reward", "text_relevant", "text_irrelevant", "gt/colour", "gt/shape", "gt/background"):
            c = curves(done, s, key)[w]
            cells.append(f"{np.nanmean(c[:, :k]):.3f} → {np.nanmean(c[:, -k:]):.3f}" if c.size else "n/a")
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines += ["", "Plots: `accuracy_by_position.png`, `stage2_curves.png`; image grids (seed "
              f"{s.seeds[0]}, first 16 held-out captions) in `grids/`.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def plot(done: list[Job], s: Settings, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = conditions(done, s)
    n_cells = WORLD.grid**2
    fig, axes = plt.subplots(1, 2, figsize=(14, 4), sharey=True)
    width = 0.8 / len(table)
    for a, attribute in zip(axes, ("colour", "shape")):
        for j, (name, rows) in enumerate(table.items()):
            values = np.array([r[attribute] for r in rows])
            a.bar(np.arange(n_cells) + j * width, values.mean(0), width, yerr=values.std(0), label=name)
        a.set_xticks(np.arange(n_cells) + 0.4 - width / 2, [f"cell {i + 1}" for i in range(n_cells)])
        a.set_title(f"{attribute} accuracy by sentence position")
        a.axhline(1 / (len(WORLD.colours) if attribute == "colour" else len(WORLD.shapes)), color="grey", ls=":")
    axes[0].set_ylabel("exact checker accuracy")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_position.png", dpi=100)
    plt.close(fig)

    keys = ("reward", "text_relevant", "text_irrelevant", "gt/colour", "gt/shape", "gt/background")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for a, key in zip(axes.flat, keys):
        for w, c in curves(done, s, key).items():
            if c.size == 0:
                continue
            steps = np.arange(1, c.shape[1] + 1)
            mean, std = np.nanmean(c, 0), np.nanstd(c, 0)
            a.plot(steps, mean, label=f"w = {w}")
            a.fill_between(steps, mean - std, mean + std, alpha=0.2)
        a.set_title(key)
        a.set_xlabel("step")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(out / "stage2_curves.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/shapesworld", help="folder for report.md, results.json, plots, grids")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 steps, 4 captions, 1 process: seconds (tests)")
    parser.add_argument("--reward", help="a registered CLIP-type reward taking text_irrelevant_weight (default shapes_clip)")
    parser.add_argument("--steps", type=int, help="stage-2 steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--workers", type=int, help="processes (default 2)")
    parser.add_argument("--weights", type=float, nargs="+", help="text_irrelevant_weight values (default 1.0 0.3 0.0)")
    parser.add_argument("--lr", type=float, help="stage-2 learning rate (default 2e-3)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite report.md and the plots from --out/results.json without running anything")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["settings"].items()})
        done = [Job(**j) for j in saved["jobs"]]
        plot(done, s, Path(args.out))
        print(write_report(done, s, Path(args.out), saved["seconds"], saved.get("command", "")))
        return 0
    s = Settings.quick() if args.quick else Settings()
    s = replace(s, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in
                      (("reward", args.reward), ("steps", args.steps), ("seeds", args.seeds), ("workers", args.workers),
                       ("weights", args.weights), ("lr", args.lr))
                      if v is not None})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    todo = [(job, s, str(out)) for job in jobs(s)]
    if s.workers > 1:
        with multiprocessing.get_context("spawn").Pool(s.workers) as pool:
            done = []
            for job in pool.imap_unordered(_run, todo):
                done.append(job)
                print(f"[{time.perf_counter() - start:6.0f} s] {job.kind} {job.model} {job.encoding} "
                      f"w={job.weight} seed={job.seed}: {job.result.get('final', job.result)}"[:300], flush=True)
    else:
        done = [_run(t) for t in todo]
    seconds = time.perf_counter() - start
    done.sort(key=lambda j: (j.kind, j.model, j.encoding, j.weight, j.seed))
    command = " ".join(["python -m shapesworld.experiment", *(sys.argv[1:] if argv is None else argv)])
    (out / "results.json").write_text(json.dumps({"settings": asdict(s), "seconds": seconds, "command": command,
                                                  "jobs": [asdict(j) for j in done]}, indent=1))
    plot(done, s, out)
    print(write_report(done, s, out, seconds, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
