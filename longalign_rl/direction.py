"""Compute the corpus direction v of a CLIP-type reward (docs/method.md 2.3, direction = corpus).

    python -m longalign_rl.direction --reward hpsv2 --prompts prompts.jsonl --out hps_direction.safetensors

v = the normalised mean, over the prompt corpus, of the reward model's pooled text
embeddings t (the same t the reward computes, so the reward's `segment_pooling` must be
the same here as in training: pass it in --reward-kwargs). The file holds the tensor
"direction" [D] and metadata naming the reward and the number of prompts; the reward reads
it with direction="corpus", direction_path=<file>.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from longalign_rl.arguments import Parser, at_least, check_device, check_output_folder, json_object


def corpus_direction(reward, prompts: list[str], batch_size: int) -> torch.Tensor:
    """normalise(mean of t over `prompts`), computed `batch_size` prompts at a time."""
    total = sum(reward.text_embeddings(prompts[i : i + batch_size]).sum(0) for i in range(0, len(prompts), batch_size))
    return F.normalize(total, dim=0)


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from longalign_rl.prompts import load_prompts
    from longalign_rl.registry import get_reward

    parser = Parser(prog="python -m longalign_rl.direction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="a registered reward name or 'package.module:Factory'")
    parser.add_argument("--reward-kwargs", type=json_object, default={}, help="JSON object of the reward's keyword arguments")
    parser.add_argument("--prompts", required=True, help="'demo', a .txt file (one prompt a line) or a .jsonl file")
    parser.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    parser.add_argument("--batch-size", type=at_least(1), default=64, help="prompts per text-encoder call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    try:
        check_device(args.device)
        if args.out.is_dir():
            raise ValueError(f"--out {args.out}: is a folder; name the .safetensors file to write")
        check_output_folder(args.out.parent, "--out")
        prompts = load_prompts(args.prompts, key="--prompts")
        reward = get_reward(args.reward, **args.reward_kwargs).to(args.device)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not hasattr(reward, "text_embeddings"):
        parser.error(f"reward {args.reward!r} has no text_embeddings(prompts): only CLIP-type rewards have a direction")

    direction = corpus_direction(reward, prompts, args.batch_size)
    if not bool(torch.isfinite(direction).all()):
        print(f"error: the direction of reward {args.reward!r} over {len(prompts)} prompts holds NaN or infinite "
              "values (its text embeddings are not finite); nothing was written", file=sys.stderr)
        return 1
    metadata = {"reward": args.reward, "reward_kwargs": json.dumps(args.reward_kwargs), "num_prompts": str(len(prompts))}
    save_file({"direction": direction.cpu().contiguous()}, args.out, metadata=metadata)
    print(f"wrote {args.out}: direction [{direction.numel()}] of reward {args.reward!r} over {len(prompts)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
