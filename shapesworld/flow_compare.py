"""LongAlign on the ShapesWorld flow model (issue 26), through the product: every run is
`python -m longalign_rl.train` (sampler actors, DeepSpeed workers, checkpoints), every
model is evaluated on held-out captions by the exact checker.

    python -m shapesworld.flow_compare --out /tmp/flow            # 3 seeds, 43 min on 2 cores
    python -m shapesworld.flow_compare --out /tmp/x --quick        # one seed, 2 steps each (tests)

The model is `shapesworld-flow`, an SD3-class transformer without T5 pretrained on captions
cut at 77 tokens (shapesworld/pretrain_flow.py): cells 3-4 are past its window.
1. Stage 1, seeds 0-2: configs/shapesworld_flow_stage1.yaml from `shapesworld-flow` (segment
   encoding, the flow-matching loss, a LoRA merged into model/); the base and each stage-1
   model evaluated with the segment encoding (the base with the truncated, pipeline one too).
2. Stage 2, seeds 0-2, from `shapesworld-flow-partial` (the same stage 1 stopped early, late
   shapes partly right), evaluated at every checkpoint:
   reward_backprop  configs/shapesworld_flow.yaml: shapes_clip (decomposed, w = 0.3),
                    gradients through the last 2 of 10 Euler steps, 16 samples per step,
                    24 steps: 384 samples, evaluated at 12 and 24
   flow_grpo        Flow-GRPO-Fast: the exact checker on sentences 3-4 as the reward (not
                    differentiable), the SDE (noise level 0.7) on the first 2 of the 10
                    steps only, the ODE after them (algorithm.sde_window), so each sample
                    trains 2 steps; groups of 8 from one starting noise (shared_start), 128
                    samples per update, on-policy, lr 2e-3, 10 updates: 1,280 samples
Writes results.json, report.md (both tables; the samples each method needs for the same
gain) and curves.png. Resumable: finished runs and their evaluations are kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from longalign_rl.outputs import CONFIG, MODEL, read_metrics
from shapesworld.pg_compare import Method, _ms, figure, report
from shapesworld.sweep import EVAL_SEED, Sweep, checkpoints, evaluate_weights, launch

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE = "shapesworld-flow"
START = "shapesworld-flow-partial"
STAGE1 = Method("stage1", ("--config", str(CONFIGS / "shapesworld_flow_stage1.yaml")), steps=256, checkpoint_every=128,
                samples_per_step=32)
REWARD_BACKPROP = Method("reward_backprop", ("--config", str(CONFIGS / "shapesworld_flow.yaml")), steps=24,
                         checkpoint_every=12, samples_per_step=16)
FLOW_GRPO = Method("flow_grpo", ("--config", str(CONFIGS / "shapesworld_flow.yaml"), "algorithm.name=grpo",
                                 "reward.name=shapes_exact", "reward.kwargs={positions: [3, 4]}", "sampler.eta=0.7",
                                 "algorithm.sde_window=[0, 0.2]", "algorithm.timestep_fraction=1.0",
                                 "algorithm.group_size=8", "algorithm.shared_start=true", "train.max_policy_lag=0",
                                 "train.batch_size=16", "train.grad_accum=4", "train.lr=2e-3"),
                   steps=10, checkpoint_every=5, samples_per_step=128)


@dataclass(frozen=True)
class FlowCompare:
    stage1: Method = STAGE1
    methods: tuple[Method, ...] = (REWARD_BACKPROP, FLOW_GRPO)
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_captions: int = 128
    eval_steps: int = 10
    guidance: float = 5.0

    @classmethod
    def quick(cls) -> "FlowCompare":
        def small(m: Method) -> Method:  # two steps, one micro-step per worker
            accum = int(dict(o.split("=", 1) for o in m.overrides if "=" in o).get("train.grad_accum", 1))
            return replace(m, overrides=(*m.overrides, "train.grad_accum=1"), steps=2, checkpoint_every=1,
                           samples_per_step=m.samples_per_step // accum)

        return cls(stage1=small(STAGE1), methods=tuple(small(m) for m in cls.methods), seeds=(0,),
                   eval_captions=4, eval_steps=3)

    def sweep(self) -> Sweep:
        return Sweep(eval_captions=self.eval_captions, eval_steps=self.eval_steps, guidance=self.guidance)


def train_run(method: Method, seed: int, runs: Path) -> Path:
    """One run of the product, in its own process; its config names the model it starts from."""
    return launch([*method.overrides, f"train.seed={seed}", f"train.steps={method.steps}",
                   f"run.checkpoint_every={method.checkpoint_every}", "run.keep_checkpoints=0",
                   "run.validation_size=0",  # every model is evaluated on held-out captions here
                   f"run.image_every={method.steps}"], f"{method.name}_s{seed}", runs)


def finished(run_dir: Path, method: Method) -> bool:
    return max(checkpoints(run_dir), default=0) == method.steps


def run_or_keep(method: Method, seed: int, runs: Path) -> Path:
    run_dir = runs / f"{method.name}_s{seed}"
    if not finished(run_dir, method):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir = train_run(method, seed, runs)
    return run_dir


def evaluate_model(model: str | Path, c: FlowCompare, prompts: list[str],
                   encodings: tuple[str, ...] = ("truncated", "segment")) -> dict:
    """A whole model (a name or a diffusers folder) under each encoding."""
    from longalign_rl.models import load_components
    from shapesworld.evaluate import evaluate

    parts = load_components(str(model))
    return {encoding: evaluate(parts, encoding, prompts, seed=EVAL_SEED, num_steps=c.eval_steps,
                               guidance_scale=c.guidance)[1] for encoding in encodings}


def run_compare(c: FlowCompare, out: Path, log=print) -> dict:
    import yaml

    from shapesworld.evaluate import draw_captions
    from shapesworld.world import WorldConfig

    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    prompts = draw_captions(WorldConfig(), c.eval_captions, seed=EVAL_SEED)
    began = time.perf_counter()
    kept = earlier(out, c)
    results = {"settings": asdict(c), "stage1": [], "runs": [], "start_stochastic": {},
               "base": kept.get("base") or evaluate_model(BASE, c, prompts),
               "start": kept.get("start") or evaluate_weights(None, {}, c.sweep(), prompts, start=START)}
    for seed in c.seeds:
        t = time.perf_counter()
        run_dir = run_or_keep(c.stage1, seed, runs)
        held, seconds = kept.get(("stage1", seed)) or (evaluate_model(run_dir / MODEL, c, prompts, ("segment",)), None)
        results["stage1"].append({"seed": seed, "held_out": held, "metrics": read_metrics(run_dir),
                                  "seconds": seconds or round(time.perf_counter() - t, 1)})
        log(f"stage 1 seed {seed}: {time.perf_counter() - t:.0f} s; segment {held['segment']}")
    for method in c.methods:
        for seed in c.seeds:
            t = time.perf_counter()
            run_dir = run_or_keep(method, seed, runs)
            lora = yaml.safe_load((run_dir / CONFIG).read_text())["lora"]
            metrics = read_metrics(run_dir)
            held_out, seconds = kept.get((method.name, seed)) or ({
                step: evaluate_weights(folder / "weights.safetensors", lora, c.sweep(), prompts, start=START)
                for step, folder in checkpoints(run_dir).items()}, None)
            results["runs"].append({"method": method.name, "seed": seed, "metrics": metrics,
                                    "held_out": {str(k): v for k, v in held_out.items()}, "held_out_stochastic": {},
                                    "train_seconds": round(sum(m["time/step"] for m in metrics), 1),
                                    "seconds": seconds or round(time.perf_counter() - t, 1)})
            log(f"{method.name} seed {seed}: {time.perf_counter() - t:.0f} s; held-out shapes at the last checkpoint "
                f"{[round(x, 2) for x in held_out[max(held_out)]['shape']]}")
            (out / "results.partial.json").write_text(json.dumps(results, indent=1) + "\n")
    # the whole comparison's wall clock: this call's, plus what the kept runs took in the calls that made them
    results["seconds"] = round(time.perf_counter() - began + sum(v[1] for k, v in kept.items() if isinstance(k, tuple)), 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write(results, out)
    return results


def earlier(out: Path, c: FlowCompare) -> dict:
    """The evaluations an interrupted comparison with the same settings left in
    results.partial.json: "base", "start", and (held-out results, seconds) of ("stage1",
    seed) and (method, seed), each kept only while its run is finished (the runs themselves
    are kept by run_or_keep)."""
    partial = out / "results.partial.json"
    if not partial.is_file():
        return {}
    saved = json.loads(partial.read_text())
    now = json.loads(json.dumps(asdict(c)))  # as saved: tuples are lists
    same = all(saved["settings"][k] == v for k, v in now.items() if k not in ("stage1", "methods"))
    if not same:
        return {}
    kept = {"base": saved["base"], "start": saved["start"]}
    methods = {m.name: m for m in (c.stage1, *c.methods)}
    settings = {m["name"]: m for m in (saved["settings"]["stage1"], *saved["settings"]["methods"])}
    current = {m["name"]: m for m in (now["stage1"], *now["methods"])}

    def unchanged(name: str, seed: int) -> bool:
        return (name in methods and settings.get(name) == current[name]
                and finished(out / "runs" / f"{name}_s{seed}", methods[name]))

    for r in saved["stage1"]:
        if unchanged("stage1", r["seed"]):
            kept[("stage1", r["seed"])] = (r["held_out"], r["seconds"])
    for r in saved["runs"]:
        if unchanged(r["method"], r["seed"]):
            kept[(r["method"], r["seed"])] = ({int(k): v for k, v in r["held_out"].items()}, r["seconds"])
    return kept


def stage1_table(results: dict) -> str:
    lines = ["| model, encoding | " + " | ".join(f"colour {i}" for i in range(1, 5)) + " | "
             + " | ".join(f"shape {i}" for i in range(1, 5)) + " | background |", "|---" * 10 + "|"]
    rows = [(f"`{BASE}`, {e}", [results["base"][e]]) for e in ("truncated", "segment")]
    rows.append(("stage 1, segment", [r["held_out"]["segment"] for r in results["stage1"]]))
    for name, held in rows:
        lines.append(f"| {name} | " + " | ".join(_ms([h["colour"][i] for h in held]) for i in range(4)) + " | "
                     + " | ".join(_ms([h["shape"][i] for h in held]) for i in range(4))
                     + f" | {_ms([h['background'] for h in held])} |")
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    seeds = len(results["stage1"])
    text = (f"# The ShapesWorld flow model through the product\n\nStage 1 from `{BASE}` "
            f"({seeds} seed(s), mean ± std; held-out captions, seed {EVAL_SEED}):\n\n" + stage1_table(results)
            + "\n\n" + report(results, START).replace("# Policy gradients against reward backpropagation, "
                                                       "through the product\n\n", "Stage 2: "))
    (out / "report.md").write_text(text)
    figure(results, out / "curves.png", START)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.flow_compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="one seed, 2 steps per run, for tests")
    parser.add_argument("--report", action="store_true", help="only rewrite report.md and curves.png from OUT")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.report:
        write(json.loads((args.out / "results.json").read_text()), args.out)
        return 0
    results = run_compare(FlowCompare.quick() if args.quick else FlowCompare(), args.out)
    print((args.out / "report.md").read_text())
    print(f"done in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
