"""Score a run's model on held-out prompts with a reward and the metric hooks, optionally
against another model on the same prompts and noise (the base model, say):

    python -m longalign_rl.evaluate RUN --prompts FILE [--n 64] [--against base] [--out DIR]

RUN is a run directory or a model, as for `longalign_rl.generate`. By default the reward
is the run's (`reward.name`, `reward.kwargs`) and the metric hooks are the run's
(`run.metrics`); `--reward NAME --reward-kwargs JSON` and `--metrics HOOK ...` choose
others, `--no-reward` scores with the hooks alone. Prompt i is drawn from seed --seed + i
with deterministic DDIM. `--against MODEL` draws the same prompts from the same noise
with another model (`base`: the run's own `model.pretrained`, without what the run
trained), sampled and encoded with the run's settings, and reports each key's paired change with two standard errors of the per-prompt
changes. A run that selected its weights by validation (run.select_by) is scored with the
selected ones (lora/); `--last` takes its last step's (lora_last/). Writes DIR/evaluation.json (every value) and the images (DIR/<model>/NNN.png).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from longalign_rl.arguments import Parser, at_least, finite, json_object
from longalign_rl.uncertainty import mean_and_error
from longalign_rl.outputs import CONFIG


def build_parser(prog: str = "python -m longalign_rl.evaluate") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory, or a model (a registered name, a diffusers folder, a hub id)")
    parser.add_argument("--prompts", required=True, metavar="SOURCE",
                        help="held-out prompts: a .txt / .jsonl file or 'pkg.module:function' (as prompts.source)")
    parser.add_argument("--n", type=at_least(1), help="use the first N prompts (default: all)")
    parser.add_argument("--seed", type=at_least(0), default=0, help="prompt i is drawn from seed SEED + i (default 0)")
    parser.add_argument("--reward", help="a reward name or 'pkg.module:Factory' (default: the run's reward.name)")
    parser.add_argument("--reward-kwargs", type=json_object, metavar="JSON",
                        help="its keyword arguments as JSON (default: the run's reward.kwargs, or none)")
    parser.add_argument("--no-reward", action="store_true", help="score with the metric hooks only")
    parser.add_argument("--metrics", nargs="*", metavar="HOOK", help="metric hooks 'pkg.module:function' "
                        "(default: the run's run.metrics)")
    parser.add_argument("--against", metavar="MODEL", help="compare with another run or model on the same prompts "
                        "and noise; 'base' is the run's model.pretrained")
    parser.add_argument("--out", type=Path, help="folder for evaluation.json and the images")
    parser.add_argument("--steps", type=at_least(1), help="DDIM steps (default: the run's sampler.num_steps)")
    parser.add_argument("--guidance", type=finite(minimum=1.0), help="guidance scale, >= 1 (default: the run's)")
    parser.add_argument("--checkpoint", help="a checkpoint of the run (folder or step) instead of its exported weights")
    parser.add_argument("--last", action="store_true", help="a run that selected its weights by validation "
                        "(run.select_by): its last step's (lora_last/) instead of the selected ones (lora/)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--t5", metavar="ENCODER", help="the T5 encoder of a model folder with a T5 branch "
                        "(text_adapter/); a run directory names its own, and --against a model takes the run's")
    return parser


def run_config(source: str):
    """The run's Config when `source` is a run directory, else None."""
    from longalign_rl.config import load_config
    from longalign_rl.pipeline import is_run_dir

    return load_config(Path(source) / CONFIG) if is_run_dir(source) else None


def score_model(pipe, prompts: list[str], seeds: list[int], reward, hooks, args) -> tuple[torch.Tensor, dict]:
    """Images [N, 3, H, W] and values {key: Tensor[N]} of one model."""
    from longalign_rl.scoring import batch_statistics
    from longalign_rl.validation import extend, score_images

    images, values = [], {}
    statistics = batch_statistics(reward, prompts) if reward is not None else None  # of the whole set, once
    for i in range(0, len(prompts), args.batch_size):
        chunk = pipe.generate(prompts[i:i + args.batch_size], seeds[i:i + args.batch_size],
                              num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt").float()
        images.append(chunk.cpu())
        extend(values, score_images(reward, hooks, chunk, prompts[i:i + args.batch_size], statistics=statistics))
    return torch.cat(images), values


def check_scores(images: torch.Tensor, values: dict[str, torch.Tensor], label: str) -> None:
    """RuntimeError when a model's images or scores are not finite: an evaluation that would
    print `nan` (a diverged model, a reward that fails on these images) is an error."""
    from longalign_rl.arguments import check_finite_images

    check_finite_images(images, label)
    for key, v in values.items():
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise RuntimeError(f"{label}: {key} is NaN or infinite for {bad} of {len(v)} prompts (images finite); "
                               "nothing was written")


def format_table(result: dict) -> str:
    """Each key's mean ± 2 standard errors; with --against, the paired change."""
    from longalign_rl.summary import verdict

    values = result["models"][0]["values"]
    if not values:
        return "no scores (no reward and no metric hooks): only the images were written"
    width = max(len(k) for k in values)
    comparison = {r["key"]: r for r in (result.get("comparison") or {}).get("rows", [])}
    labels = [m["label"] for m in result["models"]]
    lines = [f"{result['prompts']} prompts; mean ± 2 standard errors" +
             (f"; change = {labels[0]} - {labels[1]}, paired by prompt" if comparison else "")]
    for key, vals in values.items():
        mean, se = mean_and_error(vals)
        line = f"  {key:<{width}}  {labels[0]} {mean:8.4f}" + (f" ± {se:.4f}" if se is not None else "")
        if key in comparison:
            r = comparison[key]
            change = f"{r['change']:+.4f}" + (f" ± {r['uncertainty']:.4f}" if r["uncertainty"] is not None else "")
            line += f"   {labels[1]} {r['first']:8.4f}   change {change}  {verdict(r)}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m longalign_rl.evaluate") -> int:
    args = build_parser(prog).parse_args(argv)
    from longalign_rl.arguments import check_device, check_output_folder
    from longalign_rl.console import quiet_libraries
    from longalign_rl.hooks import load_metric_hooks
    from longalign_rl.pipeline import load
    from longalign_rl.prompts import load_prompts
    from longalign_rl.registry import get_reward
    from longalign_rl.outputs import save_images, write_prompt_list
    from longalign_rl.validation import compare

    quiet_libraries(verbose=False)
    try:
        check_device(args.device)
        if args.out is not None:
            check_output_folder(args.out)
        cfg = run_config(args.run)
        prompts = load_prompts(args.prompts, key="--prompts")[: args.n]
        hooks = load_metric_hooks(args.metrics if args.metrics is not None else (cfg.run.metrics if cfg else ()))
        reward = None
        name = args.reward or (cfg.reward.name if cfg else None)
        if name and not args.no_reward:
            kwargs = args.reward_kwargs if args.reward_kwargs is not None else (
                dict(cfg.reward.kwargs) if cfg and name == cfg.reward.name else {})
            reward = get_reward(name, **kwargs)
        against = args.against
        if against == "base":
            if cfg is None:
                raise ValueError("--against base needs a run directory (its model.pretrained is the base)")
            against = cfg.model.pretrained
        pipes = [(Path(args.run).name or args.run,
                  load(args.run, checkpoint=args.checkpoint, device=args.device, t5=args.t5, last=args.last))]
        if against:
            label = Path(against).name or against
            like = args.run if cfg is not None else None  # sampled and encoded as the run is
            pipes.append((label if label != pipes[0][0] else f"{label}-against",
                          load(against, device=args.device, like=like)))
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if reward is not None and hasattr(reward, "to"):
        reward = reward.to(pipes[0][1].device)
    seeds = [args.seed + i for i in range(len(prompts))]
    result = {"run": args.run, "prompts": len(prompts), "prompt_source": args.prompts, "seeds": seeds,
              "reward": name if reward is not None else None, "models": []}
    outputs = []
    try:
        for label, pipe in pipes:  # everything is scored and checked before anything is written
            images, values = score_model(pipe, prompts, seeds, reward, hooks, args)
            check_scores(images, values, label)
            outputs.append((label, pipe, images, values))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for label, pipe, images, values in outputs:
        d = pipe.longalign
        result["models"].append({"label": label, "source": d["source"], "weights": d["weights"],
                                 "settings": {k: d[k] for k in ("num_steps", "guidance_scale", "resolution", "max_tokens")},
                                 "values": {k: [float(x) for x in v.tolist()] for k, v in values.items()}})
        if args.out:
            save_images(images, args.out / label)
    if len(pipes) == 2:  # compare() sets the last record against the first
        first, last = ({"step": 0, "prompts": len(prompts), "values": m["values"]} for m in result["models"][::-1])
        result["comparison"] = compare([first, last])
    print(format_table(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_prompt_list(args.out / "prompts.txt", prompts, seeds)
        (args.out / "evaluation.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"every value in {args.out / 'evaluation.json'}, the images in {args.out}/<model>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
