"""The bad-input and fault matrix of issue 22, run as a user would: each case is a command
of the package in a subprocess, timed, with its exit code and the last line it printed.

    python scripts/fault_matrix.py --work /tmp/matrix [--repo DIR] [--only NAME ...] [--timeout 300]

--repo runs another checkout's code (an older commit, for the "before" column), with this
repo's Python. Prints a markdown table: case | exit | seconds | last line. Needs about 20
minutes on 2 CPUs (a tiny run to damage, then each case; a case that hangs is killed at
--timeout). Every case builds what it needs under --work; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

TINY = ["--config", "configs/tiny.yaml", "run.validation_size=0", "run.eval_every=100", "run.image_every=100"]
GRPO_ACTORS = ["algorithm.name=grpo", "reward.num_actors=1", "reward.num_cpus=0", "train.steps=2",
               "run.validation_size=0"]


class Exploit:
    def __reduce__(self):
        return (print, ("a crafted pickle ran",))


def python(repo: Path, *args: str, env: dict | None = None, timeout: float = 300) -> tuple[int | str, float, str]:
    start = time.monotonic()
    merged = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(repo), **(env or {})}
    try:
        done = subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=timeout,
                              env={k: v for k, v in merged.items() if v is not None})  # None: unset
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, out = f"killed at {timeout:g} s", (e.stdout or b"").decode() + (e.stderr or b"").decode()
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith(("\x1b", "("))]
    return code, time.monotonic() - start, lines[-1].strip() if lines else ""


def train(repo, *args, **kw):
    return python(repo, "-m", "longalign_rl.train", *args, **kw)


def tiny_run(repo: Path, work: Path) -> Path:
    """A 4-step tiny run with checkpoints at 2 and 4 (made once)."""
    run = work / "runs" / "base"
    if not (run / "checkpoint_000004").is_dir():
        shutil.rmtree(run, ignore_errors=True)
        code, _, last = train(repo, *TINY, "train.steps=4", "run.checkpoint_every=2", f"run.output_dir={work / 'runs'}",
                              "run.name=base", timeout=600)
        assert code == 0, last
    return run


def copy_run(repo, work, name, damage=None) -> Path:
    target = work / "runs" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(tiny_run(repo, work), target)
    if damage:
        damage(target)
    return target


def checkpoint(run: Path, step: int) -> Path:
    return run / f"checkpoint_{step:06d}"


def refused_at_load(run: Path) -> None:
    """Step 4's optimiser state: a crafted pickle, its manifest updated (it verifies)."""
    folder = checkpoint(run, 4)
    optim = next((folder / "deepspeed").rglob("*optim_states.pt"))
    optim.write_bytes(pickle.dumps({"optimizer_state_dict": Exploit()}))
    name = str(optim.relative_to(folder))
    for manifest in (folder / "manifest").glob("rank*.json"):
        data = json.loads(manifest.read_text())
        if name in data["files"]:
            data["files"][name] = {"bytes": optim.stat().st_size, "sha256": hashlib.sha256(optim.read_bytes()).hexdigest()}
            manifest.write_text(json.dumps(data))


def nan_lora(run: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    (path,) = (run / "lora").glob("*.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}, path)


def truncate(path: Path, keep: int = -64) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def adapter(work: Path, name: str, out_dim: int = 32, damage=None) -> Path:
    from longalign_rl.encoding.t5 import TextAdapter

    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    TextAdapter(in_dim=32, int_dim=8, out_dim=out_dim).save_pretrained(folder)
    if damage:
        damage(folder)
    return folder


def nan_adapter(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}, path)


def last_lr(run: Path) -> str:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return f"; metrics: lr {records[-1]['lr']:g} at step {records[-1]['step']}"


def steps(run: Path) -> str:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return f"; metrics.jsonl steps: {[r['step'] for r in records]}"


def config_line(repo: Path, run: Path, timeout: float):
    """`config --resume RUN`: its exit code, and the line of lora.rank it shows."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "longalign_rl.cli", "config", "--resume", str(run)], cwd=repo,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(repo)})
    shown = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith(("lora.rank", "error"))]
    return done.returncode, time.monotonic() - start, shown[0] if shown else ""


def two_runs_one_name(repo: Path, work: Path, timeout: float):
    """Two new runs with one run.name, the second started 3 s after the first."""
    out = work / "runs"
    shutil.rmtree(out / "twice", ignore_errors=True)
    args = [sys.executable, "-m", "longalign_rl.train", *TINY, "train.steps=2", f"run.output_dir={out}", "run.name=twice"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(repo)}
    first = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    result = python(repo, *args[1:], timeout=timeout)
    first.wait(timeout=timeout)
    return result[0], result[1], f"{result[2]} (the first run: exit {first.returncode})"


def cases(repo: Path, work: Path, new: bool) -> dict:
    """name -> a function of the timeout returning (exit, seconds, last line)."""
    out = str(work / "out")
    prompts = work / "prompts.txt"
    prompts.write_text("A red circle. A blue square.\nA green triangle.\n")
    gen = lambda *a, run=None, **kw: lambda t: python(  # noqa: E731
        repo, "-m", "longalign_rl.generate", str(run or tiny_run(repo, work)), "a red cube.", *a, timeout=t, **kw)
    ev = lambda *a, run=None: lambda t: python(  # noqa: E731
        repo, "-m", "longalign_rl.evaluate", str(run or tiny_run(repo, work)), "--prompts", str(prompts), *a, timeout=t)
    imp = lambda folder, o=None: lambda t: python(  # noqa: E731
        repo, "-m", "longalign_rl.reference_import", "--base", "tiny", "--adapter", str(folder()), "--out",
        o or str(work / "imported"), timeout=t)
    resume = lambda name, damage, *a, report=None: lambda t: (  # noqa: E731
        lambda run: (lambda r: (r[0], r[1], r[2] + (report(run) if report and r[0] == 0 else "")))(
            train(repo, "--resume", str(run), *a, timeout=t)))(copy_run(repo, work, name, damage))
    file = work / "a_file"
    file.write_text("not a folder")
    no_key = {"HOME": str(work), "WANDB_API_KEY": None, "WANDB_MODE": None, "WANDB_CONFIG_DIR": str(work / "wandb_cfg")}
    return {
        "generate --steps -5": gen("--steps", "-5", "--out", out),
        "generate --guidance nan": gen("--guidance", "nan", "--out", out),
        "generate --guidance -3": gen("--guidance", "-3", "--out", out),
        "generate --resolution 30": gen("--resolution", "30", "--out", out),
        "generate --batch-size 0": gen("--batch-size", "0", "--out", out),
        "generate --out an existing file": gen("--out", str(file)),
        "generate --out /proc/x (unwritable)": gen("--out", "/proc/x"),
        "generate --device cuda (no GPU)": gen("--device", "cuda", "--out", out),
        "generate, lora/ file truncated": gen("--out", out, run=copy_run(
            repo, work, "lora_cut", lambda r: truncate(next((r / "lora").glob("*.safetensors"))))),
        "generate, lora/ weights NaN": gen("--out", out, run=copy_run(repo, work, "lora_nan", nan_lora)),
        "evaluate --n 0": ev("--n", "0"),
        "evaluate --out an existing file": ev("--out", str(file)),
        "evaluate --batch-size 0": ev("--batch-size", "0"),
        "evaluate, a reward that scores NaN": ev("--reward", "tests.plugins.my_reward:broken", "--reward-kwargs",
                                                 '{"how": "nan"}'),
        "import-reference, adapter safetensors truncated": imp(lambda: adapter(
            work, "a_cut", damage=lambda f: truncate(f / "diffusion_pytorch_model.safetensors"))),
        "import-reference, adapter config.json invalid": imp(lambda: adapter(
            work, "a_json", damage=lambda f: (f / "config.json").write_text('{"in_dim": 32,'))),
        "import-reference, adapter weights NaN": imp(lambda: adapter(work, "a_nan", damage=nan_adapter)),
        "import-reference --out /proc/x (unwritable)": imp(lambda: adapter(work, "a_ok"), "/proc/x/imported"),
        "train run.report_to=[wandb], no API key": lambda t: train(
            repo, *TINY, "run.report_to=[wandb]", f"run.output_dir={work / 'runs'}", "run.name=wb", env=no_key,
            timeout=t),
        "train, T5 adapter too narrow for the UNet": lambda t: train(
            repo, *TINY, "t5.encoder=tiny", f"t5.adapter={adapter(work, 'narrow', out_dim=7)}",
            f"run.output_dir={work / 'runs'}", "run.name=t5", timeout=t),
        "train, reward calls sys.exit in its actor (grpo)": lambda t: train(
            repo, *GRPO_ACTORS, "reward.name=tests.plugins.my_reward:Crashing", "reward.kwargs={how: exit, after: 1}",
            f"run.output_dir={work / 'runs'}", "run.name=actor_exit", timeout=t),
        "train, reward blocks in its actor (grpo)": lambda t: train(
            repo, *GRPO_ACTORS, "reward.name=tests.plugins.my_reward:Crashing", "reward.kwargs={how: block, after: 1}",
            *(["reward.timeout_s=30"] if new else []), f"run.output_dir={work / 'runs'}", "run.name=actor_block",
            timeout=t),
        "train, reward calls sys.exit in a trainer worker": lambda t: train(
            repo, "reward.name=tests.plugins.my_reward:Crashing", "reward.kwargs={how: exit, after: 1}",
            "train.steps=3", "run.validation_size=0", f"run.output_dir={work / 'runs'}", "run.name=worker_exit",
            timeout=t),
        "train, reward blocks in a trainer worker": lambda t: train(
            repo, "reward.name=tests.plugins.my_reward:Crashing", "reward.kwargs={how: block, after: 1}",
            "train.steps=3", "run.validation_size=0", "run.max_failures=0", *(["train.step_timeout_s=30"] if new else []),
            f"run.output_dir={work / 'runs'}", "run.name=worker_block", timeout=t),
        "train, a stale RAY_ADDRESS": lambda t: train(
            repo, *TINY, f"run.output_dir={work / 'runs'}", "run.name=stale", env={"RAY_ADDRESS": "127.0.0.1:6399"},
            timeout=t),
        "train, two runs with one run.name 3 s apart": lambda t: two_runs_one_name(repo, work, t),
        "train run.name=../../x": lambda t: train(repo, *TINY, f"run.output_dir={work / 'runs'}", "run.name=../../x",
                                                  timeout=t),
        "--resume RUN train.steps=6 train.lr=5e-4": resume("lr", None, "train.steps=6", "train.lr=5e-4", report=last_lr),
        "--resume RUN --config FILE": resume("cfg", None, "--config", "configs/tiny.yaml", "train.steps=6"),
        "--resume RUN train.steps=2 (run at step 4)": resume("back", None, "train.steps=2"),
        "config --resume RUN (the run's lora.rank is 4)": lambda t: config_line(repo, tiny_run(repo, work), t),
        "--resume, metrics.jsonl's last line cut": resume("cut", lambda r: truncate(r / "metrics.jsonl", -40),
                                                          "train.steps=6", report=steps),
        "--resume, Ray's checkpoint record damaged": resume(
            "snap", lambda r: (r / "checkpoint_manager_snapshot.json").write_text('{"ray_version": "2.60.0", "chec'),
            "train.steps=6", report=steps),
        "--resume, newest checkpoint folder deleted": resume(
            "deleted", lambda r: shutil.rmtree(checkpoint(r, 4)), "train.steps=6", report=steps),
        "--resume, config.yaml empty": resume("empty", lambda r: (r / "config.yaml").write_text(""), "train.steps=6"),
        "--resume, newest checkpoint verifies but is refused at load": resume(
            "refused", refused_at_load, "train.steps=6", report=steps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a folder for the runs and files the cases make")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose code runs (default: this one)")
    parser.add_argument("--only", nargs="*", help="cases whose name contains one of these")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a case is killed (a hang)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    repo = args.repo.resolve()
    new = (repo / "longalign_rl" / "arguments.py").is_file()
    print("| case | exit | seconds | last line |\n|---|---|---|---|", flush=True)
    for name, case in cases(repo, args.work.resolve(), new).items():
        if args.only and not any(o in name for o in args.only):
            continue
        shutil.rmtree(args.work / "out", ignore_errors=True)
        shutil.rmtree(args.work / "imported", ignore_errors=True)
        code, seconds, last = case(args.timeout)
        last = last.replace("|", "\\|").replace(str(args.work.resolve()), "WORK")
        print(f"| {name} | {code} | {seconds:.0f} | {last[:300]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
