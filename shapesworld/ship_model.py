"""Ship the UNet of a model a framework run wrote as a named ShapesWorld model.

    python -m longalign_rl.train --config configs/shapesworld_stage1.yaml run.name=partial
    python -m shapesworld.ship_model runs/partial --name shapesworld-partial

Stage 1 (configs/shapesworld_stage1.yaml) writes `model/`, a diffusers folder with the
LoRA merged into the UNet. Its VAE, text encoder and scheduler are the shipped base's, so
only the UNet ships (float16, in shapesworld/weights/<name>/unet/), with a report.json:
the run's config and the exact checker's accuracy per cell on held-out captions (both
encodings, DDIM 10 steps, guidance 5). The name loads like the others once it is an entry
point in setup.cfg (`longalign_rl.models`), with a loader in shapesworld/plugin.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from longalign_rl.outputs import CONFIG, MODEL, read_metrics
from shapesworld.plugin import SHIPPED_BASE, WEIGHTS_DIR

EVAL_SEED = 12345  # held-out captions, as shapesworld.evaluate.evaluate_model draws them


SHARED_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def complete_folder(folder: Path, base: Path = WEIGHTS_DIR / SHIPPED_BASE) -> None:
    """Make a shipped model folder a complete diffusers folder that
    `StableDiffusionPipeline.from_pretrained` loads: the parts it does not ship itself
    (a stage-1 model ships only its UNet) link to the base's (relative symlinks), and
    model_index.json is the base's. The base itself must be complete (tokenizer/ and
    model_index.json included)."""
    import os
    import shutil

    for part in SHARED_PARTS:
        target = folder / part
        if not target.exists():
            target.symlink_to(os.path.relpath(base / part, folder), target_is_directory=True)
    if folder.resolve() != base.resolve():
        shutil.copyfile(base / "model_index.json", folder / "model_index.json")


def ship(run_dir: Path, name: str, n: int, out_dir: Path = WEIGHTS_DIR) -> dict:
    from diffusers import UNet2DConditionModel

    from longalign_rl.models import load_pretrained
    from shapesworld.evaluate import draw_captions, evaluate
    from shapesworld.world import WorldConfig

    unet = UNet2DConditionModel.from_pretrained(run_dir / MODEL, subfolder="unet", torch_dtype=torch.float32)
    folder = out_dir / name
    unet.half().save_pretrained(folder / "unet", safe_serialization=True)
    # beside the base when shipping into shapesworld/weights; elsewhere (a test) the links reach the shipped base
    complete_folder(folder, out_dir / SHIPPED_BASE if (out_dir / SHIPPED_BASE).is_dir() else WEIGHTS_DIR / SHIPPED_BASE)
    report = {"made_by": f"python -m shapesworld.ship_model {run_dir} --name {name}",
              "run_config": yaml.safe_load((run_dir / CONFIG).read_text()),
              "last_step": read_metrics(run_dir)[-1],
              "eval": {"captions": n, "seed": EVAL_SEED, "num_steps": 10, "guidance_scale": 5.0}}
    # What ships, loaded as the loader loads it: the complete folder (the base's parts, this UNet; float16 -> float32).
    parts = load_pretrained(str(folder))
    prompts = draw_captions(WorldConfig(), n, seed=EVAL_SEED)
    for encoding in ("truncated", "segment"):
        _, report["eval"][encoding] = evaluate(parts, encoding, prompts, seed=EVAL_SEED, num_steps=10, guidance_scale=5.0)
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.ship_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a stage-1 run directory (with model/ and config.yaml)")
    parser.add_argument("--name", required=True, help="the model's name, e.g. shapesworld-partial")
    parser.add_argument("--eval", type=int, default=256, help="held-out captions of the report")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder of the shipped models")
    args = parser.parse_args(argv)
    report = ship(args.run_dir, args.name, args.eval, args.out)
    for encoding in ("truncated", "segment"):
        e = report["eval"][encoding]
        print(f"{encoding}: colour {[round(x, 2) for x in e['colour']]} shape {[round(x, 2) for x in e['shape']]} "
              f"background {e['background']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
