"""Convert the LongAlign authors' released checkpoints (luping-liu/LongAlign) into this
project's formats (issue 13; docs/reference_import.md).

    python -m longalign_rl.reference_import --lora s28750_lora_vis.pt --adapter s28750_adapter/ --merge --out S1
    python -m longalign_rl.reference_import --base S1/model --lora sd15-reward-3750.pt --merge --out S2

The reference's formats, as documented by its authors:
- its LoRA file (stage 1 `s{step}_lora_vis.pt`, stage 2 `sd15-reward-3750.pt`) is
  `torch.save` of a flat list of float16 tensors [up_0, down_0, up_1, down_1, ...], one
  (up, down) pair per wrapped layer, scale 1 (delta W = up @ down). Its injector wraps every
  nn.Linear and nn.Conv2d under a module of class ResnetBlock2D, (Cross)Attention or GEGLU,
  in the order of `reference_lora_layers`. A Linear's pair is up [out, r], down [r, in]; a
  Conv2d's down is a conv with the wrapped conv's kernel [r, in, kh, kw] and its up a 1x1
  conv [out, r, 1, 1]: exactly peft's lora_B / lora_A.
- its adapter folder (`s{step}_adapter/`) is a diffusers `save_pretrained` folder of
  `TextAdapter` (encoding/t5.py): config.json and diffusion_pytorch_model.safetensors (or an
  older pickled diffusion_pytorch_model.bin).

DIR receives lora/ (what `pipe.load_lora_weights(DIR / "lora")` loads: peft names, float32,
rank = alpha so the scale stays 1), text_adapter/ (safetensors), with --merge model/ (the
base with the LoRA merged into its UNet, plus model/text_adapter/: the imported adapter,
else the base folder's own, and model/sampling.json: the authors' sample.py's sampler and
prompt handling, the defaults of `longalign-rl generate`; a model folder for
`model.pretrained`), and import.json. A
pickle is only ever read with `torch.load(weights_only=True)`. Pure torch, diffusers and
peft: no ray, no deepspeed.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from longalign_rl.arguments import Parser, check_output_folder
from longalign_rl.config import LoRAConfig
from longalign_rl.encoding.t5 import ADAPTER_FOLDER, TextAdapter
from longalign_rl.lora import export_for_diffusers, load_trainable_state_dict, make_trainable, merge_lora
from longalign_rl.lora import trainable_state_dict
from longalign_rl.models import load_components, save_model_folder
from longalign_rl.pipeline import SAMPLING_FILE
from longalign_rl.outputs import LORA, MODEL

# The classes under which the reference's injector wraps every Linear and Conv2d
# ("CrossAttention" is the name of diffusers' attention class before 0.15).
REFERENCE_BLOCKS = ("ResnetBlock2D", "CrossAttention", "Attention", "GEGLU")
LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)
# How the authors' sample.py samples (pipeline.py reads it from model/sampling.json): diffusers'
# UniPCMultistepScheduler.from_config of SD v1.5's scheduler, which names no timestep spacing,
# so UniPC's own linspace (999, 959, ..., 40); 25 steps, guidance 7.5; prompts split by its
# rule and cleaned by its tokenizer, 240 CLIP tokens; with an adapter, T5-large's 240 tokens.
REFERENCE_SAMPLING = {"scheduler": "unipc", "config": {
    "sampler": {"num_steps": 25, "guidance_scale": 7.5, "timestep_spacing": "linspace"},
    "prompts": {"split": "reference", "clean_text": True, "max_tokens": 240}}}
REFERENCE_T5 = {"encoder": "google-t5/t5-large", "max_tokens": 240}


def reference_lora_layers(unet) -> list[tuple[str, torch.nn.Module]]:
    """The layers the reference wraps, in its order: for each module of `unet.modules()`
    (pre-order) whose class is in REFERENCE_BLOCKS, each Linear / Conv2d of its
    `named_modules()`. Paths are the UNet's (peft's) module names. A plain UNet only."""
    if getattr(unet, "_hf_peft_config_loaded", False):
        raise ValueError("reference_lora_layers: this UNet already holds a LoRA adapter; pass the plain base UNet")
    layers = []
    for block_path, block in unet.named_modules():
        if type(block).__name__ in REFERENCE_BLOCKS:
            layers += [(f"{block_path}.{path}", sub) for path, sub in block.named_modules()
                       if path and isinstance(sub, LAYER_TYPES)]
    paths = [path for path, _ in layers]
    if len(set(paths)) != len(paths):
        raise ValueError("reference_lora_layers: blocks of the reference's classes are nested in this UNet, "
                         "so its layer order is not defined")
    return layers


def load_weights_only(path: str | Path):
    """`torch.load(path, weights_only=True)` on the CPU, with errors that say what is wrong:
    a file that needs any other Python object is refused, never unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise ValueError(f"{path}: not a readable torch.save file ({e})") from None
        found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed| Please|\n|$)", str(e))
        raise ValueError(
            f"{path}: refused for safety: it holds Python objects other than tensors and plain containers "
            f"({found.group(1).strip() if found else 'not allowed by weights_only'}), and unpickling those can run "
            "arbitrary code; this import reads pickles only with torch.load(weights_only=True)") from None
    except Exception as e:  # a truncated or foreign file: KeyError, RuntimeError, EOFError ...
        raise ValueError(f"{path}: not a readable torch.save file ({type(e).__name__}: {e})") from None


def _expected_shapes(layer: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(up, down) weight shapes of a reference LoRA pair on `layer`."""
    if isinstance(layer, torch.nn.Conv2d):
        return (layer.out_channels, rank, 1, 1), (rank, layer.in_channels, *layer.kernel_size)
    return (layer.out_features, rank), (rank, layer.in_features)


def read_reference_lora(path: str | Path, unet) -> tuple[dict[str, torch.Tensor], int]:
    """The reference LoRA file at `path` as peft's state dict for `unet`'s layers
    ("<layer>.lora_A.weight" = down, "<layer>.lora_B.weight" = up, float32), and its rank.
    ValueError when the file is not a list of (up, down) pairs that fits `unet`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference LoRA file {str(path)!r} does not exist")
    layers = reference_lora_layers(unet)
    tensors = load_weights_only(path)
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
        got = type(tensors).__name__ if not isinstance(tensors, (list, tuple)) else \
            f"a list holding {sorted({type(t).__name__ for t in tensors})}"
        raise ValueError(f"{path}: not a reference LoRA file: expected a list of tensors [up_0, down_0, up_1, ...], "
                         f"got {got}")
    if len(tensors) % 2:
        raise ValueError(f"{path}: {len(tensors)} tensors, an odd number: a reference LoRA file holds (up, down) pairs")
    if len(tensors) // 2 != len(layers):
        raise ValueError(f"{path}: {len(tensors) // 2} (up, down) pairs, but the base UNet has {len(layers)} layers "
                         "that the reference wraps; the file may be for another base model")
    rank = tensors[1].shape[0] if tensors and tensors[1].ndim else 0
    state = {}
    for i, ((name, layer), up, down) in enumerate(zip(layers, tensors[0::2], tensors[1::2])):
        expected = _expected_shapes(layer, rank)
        if (tuple(up.shape), tuple(down.shape)) != expected or rank < 1:
            raise ValueError(f"{path}: pair {i} ({name}): up {tuple(up.shape)}, down {tuple(down.shape)}; expected "
                             f"up {expected[0]}, down {expected[1]} (rank {rank}, from pair 0)")
        if not (up.is_floating_point() and down.is_floating_point()
                and bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
            raise ValueError(f"{path}: pair {i} ({name}) is not floating point or holds NaN or infinite values")
        state[f"{name}.lora_A.weight"] = down.float()
        state[f"{name}.lora_B.weight"] = up.float()
    return state, rank


def read_reference_adapter(folder: str | Path) -> TextAdapter:
    """The reference's adapter folder as a float32 `TextAdapter`: its config.json and
    diffusion_pytorch_model.safetensors, else .bin (weights_only); every weight must fit."""
    from safetensors.torch import load_file

    from longalign_rl.arguments import check_json_file, check_weights_file

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} holds no config.json of a TextAdapter")
    check_json_file(folder / "config.json", "adapter config")
    safetensors, pickled = folder / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model.bin"
    if safetensors.is_file():
        check_weights_file(safetensors, "adapter weights")
        state = load_file(safetensors)
    elif pickled.is_file():
        state = load_weights_only(pickled)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{pickled}: not a state dict (names -> tensors), got {type(state).__name__}")
        for name, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"adapter weights: {pickled}: tensor {name!r} holds NaN or infinite values")
    else:
        raise FileNotFoundError(f"adapter folder {str(folder)!r} holds neither {safetensors.name} nor {pickled.name}")
    try:
        adapter = TextAdapter.from_config(TextAdapter.load_config(folder))
    except (TypeError, ValueError, KeyError, OSError) as e:
        raise ValueError(f"adapter config: {folder / 'config.json'} does not describe a TextAdapter "
                         f"({type(e).__name__}: {e})") from None
    result = adapter.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{folder}: the weights do not fit its config.json's TextAdapter: missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return adapter.float().eval()


def import_reference(base: str, out: str | Path, *, lora: str | Path | None = None, adapter: str | Path | None = None,
                     merge: bool = False, seed: int = 0) -> dict:
    """Convert a reference LoRA file and/or adapter folder for the base model `base` (a
    `model.pretrained` value; its UNet fixes the layers) into `out` (see the module
    docstring). Everything is read and checked before anything is written, and `out`
    appears whole or not at all. Returns what was written (also out/import.json)."""
    out = Path(out)
    if lora is None and adapter is None:
        raise ValueError("nothing to import: give the reference's LoRA file (--lora) and/or its adapter folder (--adapter)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty: an import writes a new folder and never overwrites")
    if lora is not None and not Path(lora).is_file():
        raise FileNotFoundError(f"--lora {str(lora)!r}: no such file")
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"--adapter {str(adapter)!r}: no such folder")
    check_output_folder(out.parent, "--out")  # the new folder is made beside it, then renamed

    parts = load_components(base, seed=seed)
    state, rank = read_reference_lora(lora, parts.unet) if lora is not None else (None, None)
    text_adapter = read_reference_adapter(adapter) if adapter is not None else None
    if text_adapter is not None and text_adapter.config.out_dim != parts.unet.config.cross_attention_dim:
        raise ValueError(f"--adapter {adapter}: maps to {text_adapter.config.out_dim} dimensions, but the UNet of "
                         f"{base!r} cross-attends to {parts.unet.config.cross_attention_dim}")
    layers = [path for path, _ in reference_lora_layers(parts.unet)]
    model_adapter = text_adapter
    if merge and model_adapter is None and (Path(base) / ADAPTER_FOLDER / "config.json").is_file():
        model_adapter = read_reference_adapter(Path(base) / ADAPTER_FOLDER)  # the base's own stays with it

    summary = {"base": base, "lora_source": str(lora) if lora is not None else None,
               "adapter_source": str(adapter) if adapter is not None else None,
               "layers": len(layers) if state else None, "rank": rank,
               "lora": str(out / LORA) if state else None,
               "text_adapter": str(out / ADAPTER_FOLDER) if text_adapter is not None else None,
               "model": str(out / MODEL) if merge else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        if state:
            # rank = alpha: peft's scale alpha / rank is the reference's 1
            cfg = LoRAConfig(enabled=True, rank=rank, alpha=float(rank), dropout=0.0, target_modules=tuple(layers))
            make_trainable(parts.unet, cfg)
            names = set(trainable_state_dict(parts.unet, cfg))
            if names != set(state):
                raise RuntimeError(f"peft names these LoRA weights differently: {sorted(names ^ set(state))[:3]}")
            load_trainable_state_dict(parts.unet, state, cfg)
            export_for_diffusers(parts.unet, cfg, tmp / LORA)
        if text_adapter is not None:
            text_adapter.save_pretrained(tmp / ADAPTER_FOLDER, safe_serialization=True)
        if merge:
            if state:
                merge_lora(parts.unet)
            save_model_folder(parts, tmp / MODEL)  # as stage 1 writes its model/
            if model_adapter is not None:
                model_adapter.save_pretrained(tmp / MODEL / ADAPTER_FOLDER, safe_serialization=True)
            sampling = {**REFERENCE_SAMPLING, "config": {**REFERENCE_SAMPLING["config"],
                                                         **({"t5": REFERENCE_T5} if model_adapter is not None else {})}}
            (tmp / MODEL / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2) + "\n")
        (tmp / "import.json").write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def build_parser(prog: str = "python -m longalign_rl.reference_import") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="the base model the checkpoint was trained on: a diffusers folder or hub id "
                             "(default: SD v1.5, the reference's)")
    parser.add_argument("--lora", type=Path, metavar="FILE",
                        help="the reference's LoRA file (s{step}_lora_vis.pt, sd15-reward-3750.pt)")
    parser.add_argument("--adapter", type=Path, metavar="DIR", help="the reference's adapter folder (s{step}_adapter/)")
    parser.add_argument("--merge", action="store_true",
                        help="also write DIR/model: the base with the LoRA merged (and the adapter), for stage 2")
    parser.add_argument("--out", required=True, type=Path, help="a new folder for the converted files")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m longalign_rl.reference_import") -> int:
    args = build_parser(prog).parse_args(argv)
    from longalign_rl.console import quiet_libraries

    quiet_libraries(verbose=False)
    try:
        summary = import_reference(args.base, args.out, lora=args.lora, adapter=args.adapter, merge=args.merge)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["lora"]:
        print(f"LoRA: {summary['layers']} layers at rank {summary['rank']} -> {summary['lora']}")
    if summary["text_adapter"]:
        print(f"adapter -> {summary['text_adapter']}")
    if summary["model"]:
        print(f"merged model -> {summary['model']} (model.pretrained: {summary['model']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
