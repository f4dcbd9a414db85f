"""Ship the denoiser of a model a framework run wrote as a named ShapesWorld model.

    python -m longalign_rl.train --config configs/shapesworld_stage1.yaml run.name=partial
    python -m shapesworld.ship_model runs/partial --name shapesworld-partial

Stage 1 (configs/shapesworld_stage1.yaml; configs/shapesworld_flow_stage1.yaml for the
flow model) writes `model/`, a diffusers folder with the LoRA merged into the denoiser (a
UNet, or the flow model's transformer). Its other parts are those of the shipped model
the run started from (`model.pretrained`), so only the denoiser ships (float16, in
shapesworld/weights/<name>/unet/ or transformer/), with a report.json: the run's config
and the exact checker's accuracy per cell on held-out captions (both encodings, 10
sampling steps, guidance 5). The name loads like the others once it is an entry point in
setup.cfg (`longalign_rl.models`), with a loader in shapesworld/plugin.py.
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


def complete_folder(folder: Path, base: Path = WEIGHTS_DIR / SHIPPED_BASE) -> None:
    """Make a shipped model folder a complete diffusers folder that its pipeline's
    `from_pretrained` loads: every part it does not ship itself (a stage-1 model ships only
    its denoiser) links to the base's (relative symlinks), and model_index.json is the
    base's. The base itself must be complete (tokenizers and model_index.json included)."""
    import os
    import shutil

    for part in sorted(p for p in base.iterdir() if p.is_dir()):
        target = folder / part.name
        if not target.exists():
            target.symlink_to(os.path.relpath(part, folder), target_is_directory=True)
    if folder.resolve() != base.resolve():
        shutil.copyfile(base / "model_index.json", folder / "model_index.json")


def base_of(run_config: dict, out_dir: Path) -> Path:
    """The shipped model a run started from (its `model.pretrained`; the SD base when the
    config does not say), in `out_dir` when it is there, else in shapesworld/weights/."""
    name = (run_config.get("model") or {}).get("pretrained") or SHIPPED_BASE
    for folder in (out_dir / name, WEIGHTS_DIR / name):
        if (folder / "model_index.json").is_file():
            return folder
    raise ValueError(f"model.pretrained={name!r}: not a shipped ShapesWorld model folder in {out_dir} or "
                     f"{WEIGHTS_DIR}; ship_model ships the denoiser of a run that started from one")


def ship(run_dir: Path, name: str, n: int, out_dir: Path = WEIGHTS_DIR) -> dict:
    import diffusers

    from longalign_rl.models import load_pretrained, read_model_index
    from shapesworld.evaluate import draw_captions, evaluate
    from shapesworld.world import WorldConfig

    run_config = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
    base = base_of(run_config, out_dir)
    index = read_model_index(base)
    denoiser = "transformer" if "transformer" in index else "unet"
    model_class = getattr(diffusers, index.get(denoiser, ["diffusers", "UNet2DConditionModel"])[1])
    model = model_class.from_pretrained(run_dir / MODEL, subfolder=denoiser, torch_dtype=torch.float32)
    folder = out_dir / name
    model.half().save_pretrained(folder / denoiser, safe_serialization=True)
    complete_folder(folder, base)
    report = {"made_by": f"python -m shapesworld.ship_model {run_dir} --name {name}",
              "run_config": run_config, "last_step": read_metrics(run_dir)[-1],
              "eval": {"captions": n, "seed": EVAL_SEED, "num_steps": 10, "guidance_scale": 5.0}}
    # What ships, loaded as the loader loads it: the complete folder (the base's parts, this denoiser; float16 -> float32).
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
