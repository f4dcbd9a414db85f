"""Images from a run's model (or any model), long prompts segment-encoded as in training:

    python -m longalign_rl.generate RUN "a long prompt. ..." ["another" ...] --out DIR
    python -m longalign_rl.generate RUN --prompts FILE --out DIR [--seed 0] [--steps N] [--guidance G]

RUN is a run directory (its lora/, unet/ or model/, or --checkpoint) or a model
(model.pretrained: "shapesworld-partial", a diffusers folder, a hub id). Prompt i is drawn
from seed --seed + i with deterministic DDIM (longalign_rl.pipeline), so the same command
gives the same images; a model folder's sampling.json may set other defaults (an imported
reference model: the authors' UniPC, 25 steps). Writes DIR/000.png ..., DIR/prompts.txt
(index, seed, prompt) and DIR/grid.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longalign_rl.arguments import Parser, at_least, finite, multiple_of


def build_parser(prog: str = "python -m longalign_rl.generate") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory, or a model (a registered name, a diffusers folder, a hub id)")
    parser.add_argument("prompts", nargs="*", help="prompts (any length)")
    parser.add_argument("--prompts", dest="prompt_source", metavar="SOURCE",
                        help="more prompts: a .txt / .jsonl file or 'pkg.module:function' (as prompts.source)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the images")
    parser.add_argument("--seed", type=at_least(0), default=0, help="prompt i is drawn from seed SEED + i (default 0)")
    parser.add_argument("--steps", type=at_least(1),
                        help="sampling steps (default: the run's sampler.num_steps, or the model folder's sampling.json)")
    parser.add_argument("--guidance", type=finite(minimum=1.0),
                        help="guidance scale, >= 1 (default: the run's sampler.guidance_scale)")
    parser.add_argument("--resolution", type=multiple_of(8),
                        help="pixels per side, a multiple of 8 (default: the run's sampler.resolution)")
    parser.add_argument("--checkpoint", help="a checkpoint of the run (folder or step) instead of its exported weights")
    parser.add_argument("--last", action="store_true", help="a run that selected its weights by validation "
                        "(run.select_by): its last step's (lora_last/) instead of the selected ones (lora/)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--t5", metavar="ENCODER", help="the T5 encoder of a model folder with a T5 branch "
                        "(text_adapter/), e.g. google-t5/t5-large; a run directory names its own")
    return parser


def gather_prompts(args: argparse.Namespace) -> list[str]:
    from longalign_rl.prompts import load_prompts

    prompts = [p for p in args.prompts if p.strip()]
    if args.prompt_source:
        prompts += load_prompts(args.prompt_source, key="--prompts")
    if not prompts:
        raise ValueError("no prompts: give them as arguments or with --prompts FILE")
    return prompts


def main(argv: list[str] | None = None, prog: str = "python -m longalign_rl.generate") -> int:
    args = build_parser(prog).parse_args(argv)
    from longalign_rl.arguments import check_device, check_finite_images, check_output_folder
    from longalign_rl.console import quiet_libraries
    from longalign_rl.models import DTYPES
    from longalign_rl.outputs import save_image_grid, save_images, write_prompt_list
    from longalign_rl.pipeline import load

    quiet_libraries(verbose=False)
    try:
        check_device(args.device)
        check_output_folder(args.out)
        prompts = gather_prompts(args)
        pipe = load(args.run, checkpoint=args.checkpoint, device=args.device, dtype=DTYPES[args.precision], t5=args.t5,
                    last=args.last)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seeds = [args.seed + i for i in range(len(prompts))]
    images = pipe.generate(prompts, seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                           resolution=args.resolution, batch_size=args.batch_size, output_type="pt")
    try:
        check_finite_images(images, args.run)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_images(images, args.out)
    write_prompt_list(args.out / "prompts.txt", prompts, seeds)
    save_image_grid(images, prompts, args.out / "grid.png")
    d = pipe.longalign
    print(f"{len(prompts)} image(s) from {args.run} ({d['weights']} weights; "
          f"{args.steps or d['num_steps']} {d['scheduler']} steps, "
          f"guidance {d['guidance_scale'] if args.guidance is None else args.guidance}, max_tokens {d['max_tokens']}) "
          f"in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
