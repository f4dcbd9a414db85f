"""Checkpoint contents, written by every worker into one folder that Ray Train merges.

    weights.safetensors   trainable weights (LoRA or UNet), rank 0
    state.json            the counters of TrainerState (step; stage 2's prompt position;
                          stage 1's epoch and pairs used in it), rank 0
    rng/rank{r}.pt        torch, numpy and Python RNG states of worker r
    deepspeed/state/...   DeepSpeed's optimiser and LR-scheduler state (each rank its
                          ZeRO partition; DeepSpeed also keeps its own copy of the
                          trainable weights there, which `load` restores with it)

A checkpoint becomes visible only after Ray Train has persisted every worker's files, so
a run killed while writing leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

WEIGHTS = "weights.safetensors"
STATE = "state.json"
DEEPSPEED_TAG = "state"  # not "latest": DeepSpeed writes a file of that name beside the tag


@dataclass
class TrainerState:
    step: int = 0              # optimiser steps done
    prompt_position: int = 0   # stage 2: prompts handed out (PromptOrder position)
    epoch: int = 0             # stage 1: the epoch in progress (0-based)
    samples_in_epoch: int = 0  # stage 1: pairs of that epoch used, all workers together


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: Path, engine, weights: dict, state: TrainerState, rank: int) -> None:
    """Every rank calls this (DeepSpeed's save is collective)."""
    engine.save_checkpoint(str(directory / "deepspeed"), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    (directory / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), directory / "rng" / f"rank{rank}.pt")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS))
        (directory / STATE).write_text(json.dumps(asdict(state)))


def load(directory: Path, engine, rank: int) -> TrainerState:
    """Restore weights, optimiser, scheduler and this rank's RNG; return the counters."""
    path, _ = engine.load_checkpoint(str(directory / "deepspeed"), tag=DEEPSPEED_TAG, load_module_strict=False)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed state in checkpoint {directory}")
    rng = directory / "rng" / f"rank{rank}.pt"
    if rng.exists():  # absent when the world size changed; the counters still resume
        _set_rng_state(torch.load(rng, weights_only=False))
    # A counter missing from an older checkpoint keeps its default.
    return TrainerState(**json.loads((directory / STATE).read_text()))
