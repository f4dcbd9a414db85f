"""HPSv2 (Wu et al. 2023): an OpenCLIP ViT-H/14 fine-tuned on human preferences. Also the
OpenCLIP backend that `tiny_openclip` uses."""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from rewards.decomposed import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipBackend, ClipTypeReward


class OpenClipBackend(ClipBackend):
    """An open_clip CLIP model with its tokenizer (open_clip's SimpleTokenizer)."""

    def __init__(self, model, tokenizer):
        import open_clip

        # Models built by open_clip.create_model carry their pixel statistics; a bare
        # open_clip.CLIP does not, and then OpenAI's are the ones open_clip would use.
        preprocess = open_clip.get_model_preprocess_cfg(model)
        super().__init__(
            model.visual.image_size,
            preprocess.get("mean", OPENAI_CLIP_MEAN),
            preprocess.get("std", OPENAI_CLIP_STD),
            model.visual.output_dim,
        )
        self.model = model
        self.tokenizer = tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def encode_images(self, pixels):
        return F.normalize(self.model.encode_image(pixels), dim=-1)

    def encode_texts(self, texts):
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.image_mean.device)), dim=-1)


def _checkpoint_file(checkpoint: str) -> str:
    """A local file, or "repo_id:filename" on the Hugging Face hub (downloaded once, cached)."""
    if Path(checkpoint).is_file():
        return checkpoint
    repo_id, _, filename = checkpoint.partition(":")
    if not filename:
        raise FileNotFoundError(f"checkpoint {checkpoint!r} is neither a file nor 'repo_id:filename'")
    from huggingface_hub import hf_hub_download

    from longalign_rl.hub import check_hub_model, unloadable

    check_hub_model(repo_id, None, key="reward.kwargs.checkpoint", filename=filename)
    with unloadable(checkpoint, "an HPSv2 checkpoint (reward.kwargs.checkpoint)"):
        return hf_hub_download(repo_id, filename)


def hpsv2(checkpoint: str = "xswu/HPSv2:HPS_v2_compressed.pt", arch: str = "ViT-H-14", **kwargs) -> ClipTypeReward:
    """HPSv2 score; `kwargs` go to ClipTypeReward (text_irrelevant_weight, ...).

    The checkpoint is a torch file holding {"state_dict": ...} (keys possibly prefixed
    "module.") or a bare state dict; open_clip's loader handles both.
    """
    import open_clip

    model = open_clip.create_model(arch, pretrained=_checkpoint_file(checkpoint))
    return ClipTypeReward(OpenClipBackend(model, open_clip.get_tokenizer(arch)), **kwargs)


def _stand_in(size: str, folder: Path, kwargs: dict) -> tuple[str, dict]:
    """What `longalign-rl smoke` runs instead of the downloaded checkpoint (longalign_rl/smoke.py),
    with the other arguments kept: "tiny" -> tiny_openclip (open_clip's CLIP class, tiny);
    "real" -> hpsv2 itself on a checkpoint of the same architecture with random weights."""
    kept = {k: v for k, v in kwargs.items() if k not in ("checkpoint", "arch")}
    if size == "tiny":
        return "tiny_openclip", kept
    import open_clip
    import torch

    arch = kwargs.get("arch", "ViT-H-14")
    path = folder / f"hpsv2-{arch}-random.pt"
    if not path.is_file():
        torch.manual_seed(0)
        torch.save({"state_dict": open_clip.create_model(arch, pretrained=None).state_dict()}, path)
    return "hpsv2", {**kept, "checkpoint": str(path), "arch": arch}


hpsv2.stand_in = _stand_in
