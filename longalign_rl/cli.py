"""`longalign-rl`, the one command the package installs:

    longalign-rl train [--config FILE] [--resume RUN] [key=value ...]   a run (python -m longalign_rl.train)
    longalign-rl generate RUN "prompt" ... --out DIR                   images from a run's model (or any model)
    longalign-rl evaluate RUN --prompts FILE [--against base]          score it on held-out prompts
    longalign-rl smoke [--config FILE] [--size tiny|real] [key=value ...]   a config as shipped, 2 steps, sizes swapped
    longalign-rl config [--config FILE | --resume RUN] [key=value ...]  every key: type, default, value, meaning
    longalign-rl rewards                                               the rewards it knows, with their arguments
    longalign-rl direction ...                                         a CLIP-type reward's corpus direction
    longalign-rl import-reference [--lora FILE] [--adapter DIR] --out DIR   the authors' checkpoints, converted

`python -m longalign_rl.train` (and .generate, .evaluate, .direction, .reference_import) keep
working; these are the same functions.
"""

from __future__ import annotations

import sys

USAGE = __doc__.split("\n\n")[1]


def list_rewards_text() -> str:
    """Each registered reward with the keyword arguments its factory takes."""
    from longalign_rl.registry import find_reward, list_rewards, reward_keywords

    lines = []
    for name in list_rewards():
        try:
            found = reward_keywords(find_reward(name))
            args = "(any keyword arguments)" if found is None else ", ".join(found) or "(no arguments)"
        except Exception as e:  # a plugin that cannot load is listed with why
            args = f"(cannot load: {type(e).__name__}: {e})"
        lines.append(f"{name:<16} {args}")
    lines.append("or any 'package.module:Factory' (reward.name)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "train":
        from longalign_rl.train import main as train

        return train(rest)
    if command in ("generate", "evaluate"):
        import importlib

        return importlib.import_module(f"longalign_rl.{command}").main(rest, prog=f"longalign-rl {command}")
    if command == "import-reference":
        from longalign_rl.reference_import import main as import_reference

        return import_reference(rest, prog="longalign-rl import-reference")
    if command == "smoke":
        from longalign_rl.smoke import main as smoke

        return smoke(rest, prog="longalign-rl smoke")
    if command == "config":
        from longalign_rl.train import main as train

        return train(["--print-config", *rest])
    if command == "rewards":
        print(list_rewards_text())
        return 0
    if command == "direction":
        from longalign_rl.direction import main as direction

        return direction(rest)
    print(f"usage: longalign-rl COMMAND ...\n{USAGE}", file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
