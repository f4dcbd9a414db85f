"""Import of the authors' released checkpoints (issue 13, item 4): a LoRA file and an
adapter folder written here in the reference's documented layout convert into a diffusers
LoRA, a safetensors adapter and a merged model folder that reproduce a hand-merged UNet;
a pickle is read weights-only; files that do not fit are refused with what is wrong."""

import json

import pytest
import torch

from longalign_rl import cli, reference_import
from longalign_rl.config import REFERENCE_LORA_TARGETS, LoRAConfig
from longalign_rl.encoding.t5 import TextAdapter
from longalign_rl.lora import make_trainable
from longalign_rl.models import CONFIG_DIR, load_components
from longalign_rl.reference_import import import_reference, read_reference_lora, reference_lora_layers

RANK = 4
UNPICKLED = []  # what a malicious pickle's payload appends to when it runs


def _payload_ran():
    UNPICKLED.append(True)


class Payload:
    """An object whose unpickling runs code: weights_only must refuse it before that."""

    def __reduce__(self):
        return _payload_ran, ()


def base_unet():
    return load_components("tiny").unet


def reference_pairs(unet, seed=0):
    """[up_0, down_0, ...] in float16 for the reference's layers, in its order, nonzero ups."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for _, layer in reference_lora_layers(unet):
        if isinstance(layer, torch.nn.Conv2d):
            up = (layer.out_channels, RANK, 1, 1)
            down = (RANK, layer.in_channels, *layer.kernel_size)
        else:
            up, down = (layer.out_features, RANK), (RANK, layer.in_features)
        tensors += [(torch.randn(up, generator=gen) * 0.2).half(), (torch.randn(down, generator=gen) * 0.2).half()]
    return tensors


def merged_by_hand(tensors, unet=None):
    """The UNet (default: the tiny base) with W += up @ down on every reference layer (a
    conv: up after down)."""
    unet = base_unet() if unet is None else unet
    with torch.no_grad():
        for (_, layer), up, down in zip(reference_lora_layers(unet), tensors[0::2], tensors[1::2]):
            up, down = up.float(), down.float()
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight += torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            else:
                layer.weight += up @ down
    return unet


def unet_output(unet):
    gen = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 9, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet.float().eval()(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def save_adapter(folder, safe=True):
    torch.manual_seed(3)
    adapter = TextAdapter(in_dim=16, int_dim=24, out_dim=32)  # out_dim: the tiny UNet's cross-attention
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5)  # not the initial values, so loading is visible
    adapter.save_pretrained(folder, safe_serialization=safe)
    return adapter


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A reference stage-1 output: its LoRA file and its adapter folder."""
    root = tmp_path_factory.mktemp("reference")
    tensors = reference_pairs(base_unet())
    torch.save(tensors, root / "s100_lora_vis.pt")
    adapter = save_adapter(root / "s100_adapter")
    return {"lora": root / "s100_lora_vis.pt", "adapter": root / "s100_adapter", "tensors": tensors,
            "adapter_state": adapter.state_dict()}


@pytest.fixture(scope="module")
def imported(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "out"
    summary = import_reference("tiny", out, lora=reference["lora"], adapter=reference["adapter"], merge=True)
    return out, summary


def test_the_layers_are_the_references_and_those_peft_wraps_with_its_targets():
    unet = base_unet()
    layers = reference_lora_layers(unet)
    paths = [p for p, _ in layers]
    assert len(paths) == len(set(paths)) == 65
    suffixes = [t.split(".") for t in REFERENCE_LORA_TARGETS]
    for path, module in layers:
        assert isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)), path
        assert any(path.split(".")[-len(s):] == s for s in suffixes), path
    # the documented order: each block's layers in module order, blocks in pre-order
    block = "down_blocks.0.attentions.0.transformer_blocks.0."
    assert paths[:12] == [block + n for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                              "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                                              "ff.net.0.proj")] + [
        f"down_blocks.0.resnets.0.{n}" for n in ("conv1", "time_emb_proj", "conv2")]
    shortcut = paths.index("down_blocks.1.resnets.0.conv_shortcut")
    assert paths[shortcut - 3: shortcut] == [f"down_blocks.1.resnets.0.{n}" for n in ("conv1", "time_emb_proj", "conv2")]

    from peft.tuners.lora import LoraLayer

    make_trainable(unet, LoRAConfig(rank=RANK, alpha=RANK, target_modules=REFERENCE_LORA_TARGETS))
    wrapped = {name for name, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == set(paths)

    # SD v1.5's UNet (its architecture, no weights): the reference's 224 layers
    from diffusers import UNet2DConditionModel

    config = json.loads((CONFIG_DIR / "sd15-random" / "unet.json").read_text())
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert len(reference_lora_layers(sd15)) == 224


def test_imported_lora_and_merged_model_reproduce_the_hand_merged_unet(reference, imported):
    from longalign_rl.pipeline import load

    out, summary = imported
    assert (summary["layers"], summary["rank"]) == (65, RANK)
    assert json.loads((out / "import.json").read_text()) == summary
    assert not [p for p in out.parent.iterdir() if p.name != "out"]  # no temporary sibling left
    expected = unet_output(merged_by_hand(reference["tensors"]))
    assert (expected - unet_output(base_unet())).abs().max() > 1e-2  # the LoRA visibly changes the output

    pipe = load("tiny", device="cpu")
    pipe.load_lora_weights(out / "lora")
    torch.testing.assert_close(unet_output(pipe.unet), expected, atol=1e-5, rtol=1e-5)

    merged = load_components(str(out / "model")).unet
    torch.testing.assert_close(unet_output(merged), expected, atol=1e-5, rtol=1e-5)


def test_the_adapter_is_stored_as_safetensors_with_the_same_weights(reference, imported):
    out, _ = imported
    for folder in (out / "text_adapter", out / "model" / "text_adapter"):
        assert [p.name for p in folder.glob("diffusion_pytorch_model.*")] == ["diffusion_pytorch_model.safetensors"]
        state = TextAdapter.from_pretrained(folder).state_dict()
        assert state.keys() == reference["adapter_state"].keys()
        for name, value in reference["adapter_state"].items():
            assert torch.equal(state[name], value), name


def test_a_stage_2_lora_on_the_imported_stage_1_model(reference, imported, tmp_path):
    """As the reference samples: the stage-2 LoRA on SD v1.5 with the stage-1 LoRA merged;
    the merged stage-2 model keeps the stage-1 model's adapter."""
    stage1, _ = imported
    stage2 = reference_pairs(base_unet(), seed=1)
    torch.save(stage2, tmp_path / "sd15-reward-3750.pt")
    import_reference(str(stage1 / "model"), tmp_path / "out", lora=tmp_path / "sd15-reward-3750.pt", merge=True)
    expected = unet_output(merged_by_hand(stage2, merged_by_hand(reference["tensors"])))
    merged = load_components(str(tmp_path / "out" / "model")).unet
    torch.testing.assert_close(unet_output(merged), expected, atol=1e-5, rtol=1e-5)
    state = TextAdapter.from_pretrained(tmp_path / "out" / "model" / "text_adapter").state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference["adapter_state"].items())


def test_a_pickled_adapter_is_read_weights_only(tmp_path):
    original = save_adapter(tmp_path / "adapter", safe=False)
    assert (tmp_path / "adapter" / "diffusion_pytorch_model.bin").is_file()
    summary = import_reference("tiny", tmp_path / "out", adapter=tmp_path / "adapter")
    assert summary["lora"] is None and summary["model"] is None and not (tmp_path / "out" / "lora").exists()
    folder = tmp_path / "out" / "text_adapter"
    assert [p.name for p in folder.glob("diffusion_pytorch_model.*")] == ["diffusion_pytorch_model.safetensors"]
    state = TextAdapter.from_pretrained(folder).state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())

    (tmp_path / "adapter" / "diffusion_pytorch_model.bin").unlink()
    torch.save({"norm1.weight": Payload()}, tmp_path / "adapter" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="refused for safety"):
        import_reference("tiny", tmp_path / "out2", adapter=tmp_path / "adapter")
    assert UNPICKLED == [] and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("case", ["pickle", "too_few", "shape", "not_a_list"])
def test_a_file_that_does_not_fit_is_refused_with_what_is_wrong(case, tmp_path):
    unet = base_unet()
    tensors = reference_pairs(unet)
    paths = [p for p, _ in reference_lora_layers(unet)]
    if case == "pickle":
        content, message = [*tensors, Payload()], r"refused for safety.*weights_only=True"
    elif case == "too_few":
        content, message = tensors[:-2], "64 \\(up, down\\) pairs, but the base UNet has 65 layers.*another base model"
    elif case == "shape":
        tensors[7] = tensors[7][:, :-1]  # pair 3's down loses an input column
        content, message = tensors, f"pair 3 \\({paths[3]}\\).*expected"
    else:
        content, message = {"a": tensors[0]}, "expected a list of tensors"
    torch.save(content, tmp_path / "lora.pt")
    with pytest.raises(ValueError, match=message):
        read_reference_lora(tmp_path / "lora.pt", unet)
    assert UNPICKLED == []


def test_a_failed_write_leaves_no_folder(reference, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(reference_import, "export_for_diffusers", fail)
    with pytest.raises(OSError, match="disk full"):
        import_reference("tiny", tmp_path / "out", lora=reference["lora"])
    assert list(tmp_path.iterdir()) == []


def test_the_command(reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["import-reference", "--base", "tiny", "--lora", str(reference["lora"]), "--adapter",
                     str(reference["adapter"]), "--out", str(out)]) == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "text_adapter" / "config.json").is_file() and not (out / "model").exists()
    assert "65 layers at rank 4" in capsys.readouterr().out

    missing = tmp_path / "missing.pt"
    assert cli.main(["import-reference", "--base", "tiny", "--lora", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert cli.main(["import-reference", "--base", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "--lora" in capsys.readouterr().err
    assert cli.main(["import-reference", "--base", "tiny", "--lora", str(reference["lora"]), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err

    # a base that is neither a folder nor a reachable hub id (no network here): one line, nothing written
    assert cli.main(["import-reference", "--base", "nosuchorg/nosuchmodel", "--lora", str(reference["lora"]),
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "'nosuchorg/nosuchmodel' is not a local folder, not in the hub cache" in err
    assert not (tmp_path / "o").exists()


def test_an_imported_model_samples_as_the_authors_sample_py(reference, tmp_path):
    """model/sampling.json records sample.py's sampler, which `load` (and so `generate`) takes:
    UniPC as UniPCMultistepScheduler.from_config(SD v1.5's PNDMScheduler) builds it, 25 steps,
    guidance 7.5, the reference's split and text cleaning, 240 CLIP + 240 T5 tokens. Without
    the file the model samples as any model folder does."""
    import inspect

    from diffusers import DDIMScheduler, PNDMScheduler, UniPCMultistepScheduler

    from longalign_rl.models import _read_config
    from longalign_rl.pipeline import SAMPLING_FILE, load

    TextAdapter(in_dim=32, int_dim=24, out_dim=32).save_pretrained(tmp_path / "adapter")  # the tiny T5's width
    import_reference("tiny", tmp_path / "out", lora=reference["lora"], adapter=tmp_path / "adapter", merge=True)
    model = tmp_path / "out" / "model"
    recorded = json.loads((model / SAMPLING_FILE).read_text())
    assert recorded["config"]["t5"] == {"encoder": "google-t5/t5-large", "max_tokens": 240}
    pipe = load(str(model), t5="tiny", device="cpu")  # the tiny T5 stands in for T5-large (no download here)

    # the reference: StableDiffusionPipeline.from_pretrained(SD v1.5) holds a PNDMScheduler, then
    sd15 = {**_read_config("tiny", "scheduler"), "skip_prk_steps": True}  # SD v1.5's scheduler_config.json
    theirs = UniPCMultistepScheduler.from_config(PNDMScheduler.from_config(sd15).config)
    assert type(pipe.scheduler) is UniPCMultistepScheduler
    keys = [k for k in inspect.signature(UniPCMultistepScheduler.__init__).parameters if k != "self"]
    assert {k: pipe.scheduler.config[k] for k in keys} == {k: theirs.config[k] for k in keys}
    pipe.scheduler.set_timesteps(25)
    theirs.set_timesteps(25)
    assert torch.equal(pipe.scheduler.timesteps, theirs.timesteps) and pipe.scheduler.timesteps[0] == 999
    d = pipe.longalign
    assert (d["scheduler"], d["num_steps"], d["guidance_scale"], d["max_tokens"], d["t5_tokens"]) == \
        ("unipc", 25, 7.5, 240, 240)
    assert (pipe.segment_encoder.split, pipe.segment_encoder.clean_text) == ("reference", True)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    images = pipe.generate(["A cat &amp; a dog. On a mat?"], seeds=[0], output_type="pt")
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all() and len(calls) == 25

    (model / SAMPLING_FILE).unlink()  # a model folder without it: as before
    plain = load(str(model), t5="tiny", device="cpu")
    assert type(plain.scheduler) is DDIMScheduler and plain.longalign["num_steps"] == 50
    assert (plain.segment_encoder.split, plain.segment_encoder.clean_text) == ("sentences", False)
    for content, message in [({"scheduler": "euler"}, "expected"),
                             ({"scheduler": "unipc", "config": {"sampler": {"num_steps": 0}}}, "sampler.num_steps")]:
        (model / SAMPLING_FILE).write_text(json.dumps(content))
        with pytest.raises(ValueError, match=f"{SAMPLING_FILE}.*{message}"):
            load(str(model), t5="tiny", device="cpu")
