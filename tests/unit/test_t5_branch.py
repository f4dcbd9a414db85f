"""The T5 branch of the reference release (issue 13, encoding/t5.py): the TextAdapter's
architecture and parameter names are the reference's (LN -> GEGLU feed-forward -> LN ->
GEGLU feed-forward, 1024 -> 896 -> 768), so an authors' adapter folder loads; its tokens
follow the CLIP segment tokens (240 + 240 = 480); the adapter carries a graph (stage 1
trains it), the encoders never do; the trained adapter travels with the LoRA's weights.
End to end (stage 1 then stage 2, and the inference helper): tests/e2e/test_reference_mode.py."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from longalign_rl.config import ConfigError, LoRAConfig, load_config
from longalign_rl.encoding import SegmentEncoder
from longalign_rl.encoding.t5 import T5Branch, TextAdapter, load_adapter, load_t5
from longalign_rl.lora import ADAPTER, detach_adapter, load_trainable_state_dict, make_trainable, trainable_state_dict
from longalign_rl.models import load_model

PROMPTS = ["A red cube on the left. A blue ball on the right!", "One green square."]


def reference_adapter(x, p):
    """The documented architecture, written out: LN, GEGLU (x * gelu(gate)), linear; twice."""
    def feed_forward(x, prefix):
        h, gate = F.linear(x, p[f"{prefix}.net.0.proj.weight"], p[f"{prefix}.net.0.proj.bias"]).chunk(2, dim=-1)
        return F.linear(h * F.gelu(gate), p[f"{prefix}.net.2.weight"], p[f"{prefix}.net.2.bias"])

    x = F.layer_norm(x, x.shape[-1:], p["norm1.weight"], p["norm1.bias"])
    x = feed_forward(x, "ff1")
    x = F.layer_norm(x, x.shape[-1:], p["norm2.weight"], p["norm2.bias"])
    return feed_forward(x, "ff2")


def test_the_adapter_has_the_reference_architecture_and_names():
    with torch.device("meta"):  # the released sizes, without allocating them
        full = TextAdapter(in_dim=1024, int_dim=896, out_dim=768)
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert shapes == {
        "norm1.weight": (1024,), "norm1.bias": (1024,),
        "ff1.net.0.proj.weight": (2 * 4096, 1024), "ff1.net.0.proj.bias": (2 * 4096,),
        "ff1.net.2.weight": (896, 4096), "ff1.net.2.bias": (896,),
        "norm2.weight": (896,), "norm2.bias": (896,),
        "ff2.net.0.proj.weight": (2 * 3584, 896), "ff2.net.0.proj.bias": (2 * 3584,),
        "ff2.net.2.weight": (768, 3584), "ff2.net.2.bias": (768,),
    }
    torch.manual_seed(0)
    small = TextAdapter(in_dim=12, int_dim=10, out_dim=8).eval()
    with torch.no_grad():
        for p in small.parameters():
            p.normal_()  # the LayerNorms too, so that every parameter is checked
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(small(x), reference_adapter(x, small.state_dict()))
    small.train()  # the reference's feed-forward dropout (0.1) acts while it trains
    assert not torch.equal(small(x), small(x))


def test_an_adapter_folder_in_the_released_layout_loads(tmp_path):
    """config.json with the reference's keys and a safetensors file of its parameter names."""
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in TextAdapter(in_dim=12, int_dim=10, out_dim=8).state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "TextAdapter", "_diffusers_version": "0.25.0",
                                                      "in_dim": 12, "int_dim": 10, "out_dim": 8}))
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    adapter = load_adapter(tmp_path, in_dim=12, out_dim=8)
    for k, v in adapter.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="maps 12 -> 8.*takes 16"):
        load_adapter(tmp_path, in_dim=12, out_dim=16)
    with pytest.raises(FileNotFoundError, match="t5.adapter"):
        load_adapter(tmp_path / "missing", in_dim=12, out_dim=8)


@pytest.fixture(scope="module")
def t5_parts():
    cfg = load_config("configs/tiny.yaml", ["t5.encoder=tiny", "t5.max_tokens=16", "t5.adapter_dim=24"])
    return load_model(cfg)


def test_the_tiny_t5_tokenises_like_t5_and_loads_offline():
    tokenizer, encoder = load_t5("tiny")
    ids = tokenizer(["a red cube", ""], max_length=24, padding="max_length", truncation=True).input_ids
    assert ids[1] == [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * 23  # "" is </s> then padding
    n = len(tokenizer("a red cube", add_special_tokens=False).input_ids)  # word pieces, then </s>, then padding
    assert 0 < n < 23 and ids[0][n] == tokenizer.eos_token_id and ids[0][n + 1:] == [tokenizer.pad_token_id] * (23 - n)
    assert max(max(i) for i in ids) < encoder.config.vocab_size
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    _, again = load_t5("tiny")  # the same weights in every process
    assert all(torch.equal(a, b) for a, b in zip(encoder.parameters(), again.parameters()))


def test_the_t5_tokens_follow_the_clip_segment_tokens(t5_parts):
    t5: T5Branch = t5_parts.t5
    encoder = SegmentEncoder(t5_parts.tokenizer, t5_parts.text_encoder, max_tokens=24, t5=t5)
    clip_only = SegmentEncoder(t5_parts.tokenizer, t5_parts.text_encoder, max_tokens=24)
    with torch.no_grad():
        out = encoder(PROMPTS)
        uncond = encoder.uncond(2)
    assert out.shape == (2, 24 + 16, t5_parts.unet.config.cross_attention_dim)
    torch.testing.assert_close(out[:, :24], clip_only(PROMPTS))
    # the whole prompt, 16 T5 tokens, no attention mask, through the adapter
    ids = t5.tokenizer(PROMPTS, max_length=16, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = t5.adapter(t5.encoder(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(out[:, 24:], expected)
    with torch.no_grad():
        torch.testing.assert_close(uncond, encoder([""]).expand(2, -1, -1))
    long = " ".join(["a red cube on the left and a blue ball."] * 20)
    with torch.no_grad():  # a caption past 16 T5 tokens is cut there, as the reference's 240
        assert encoder([long]).shape[1] == 40


def test_the_adapter_carries_a_graph_and_travels_with_the_lora(t5_parts):
    import copy

    parts = copy.deepcopy(t5_parts)
    adapter = parts.t5.adapter
    cfg = LoRAConfig(rank=2, alpha=2.0, dropout=0.0)
    params = make_trainable(parts.unet, cfg, adapter)
    assert getattr(parts.unet, ADAPTER) is adapter
    assert {id(p) for p in adapter.parameters()} <= {id(p) for p in params}
    assert not any("text_adapter" in n and "lora" in n for n, _ in parts.unet.named_parameters())  # no LoRA on it
    encoder = SegmentEncoder(parts.tokenizer, parts.text_encoder, max_tokens=24, t5=parts.t5)
    out = encoder(PROMPTS)
    out.sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())
    assert not any(p.requires_grad for p in parts.t5.encoder.parameters())
    assert not any(p.requires_grad for p in parts.text_encoder.parameters())

    state = trainable_state_dict(parts.unet, cfg)
    assert {k for k in state if k.startswith("text_adapter.")} == {f"text_adapter.{k}" for k in adapter.state_dict()}
    changed = {k: v + 1 if k.startswith("text_adapter.") else v for k, v in state.items()}
    load_trainable_state_dict(parts.unet, changed, cfg)
    torch.testing.assert_close(adapter.norm1.bias, state["text_adapter.norm1.bias"] + 1)
    with detach_adapter(parts.unet) as detached:
        assert detached is adapter and not hasattr(parts.unet, ADAPTER)
        with pytest.raises(ValueError, match="T5 adapter"):
            load_trainable_state_dict(parts.unet, state, cfg)
    assert getattr(parts.unet, ADAPTER) is adapter


def test_the_pipeline_encodes_with_the_t5_branch():
    from longalign_rl.pipeline import load

    pipe = load("tiny", t5="tiny")
    assert pipe.longalign["t5"] == "tiny" and pipe.longalign["t5_tokens"] == 240
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    assert embeds.shape[1] == negative.shape[1] == 480
    images = pipe.generate(PROMPTS[:1], seeds=[0], resolution=32, num_inference_steps=2, output_type="pt")
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_t5_config_keys_are_checked():
    with pytest.raises(ConfigError, match="t5.adapter"):
        load_config(None, ["t5.adapter=some/folder"])
    with pytest.raises(ConfigError, match="t5.max_tokens"):
        load_config(None, ["t5.encoder=tiny", "t5.max_tokens=0"])
    with pytest.raises(ConfigError, match="t5.adapter_lr"):
        load_config(None, ["t5.encoder=tiny", "t5.adapter_lr=0"])


def test_real_weights_load_from_a_local_folder(tmp_path):
    """t5.encoder as a folder (a downloaded google-t5/t5-large has this layout)."""
    tokenizer, encoder = load_t5("tiny")
    encoder.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    tokenizer2, encoder2 = load_t5(str(tmp_path / "t5"))
    ids = tokenizer2(PROMPTS, max_length=16, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, tokenizer(PROMPTS, max_length=16, padding="max_length", truncation=True,
                                      return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(encoder2(input_ids=ids).last_hidden_state, encoder(input_ids=ids).last_hidden_state)
    assert not encoder2.training and not any(p.requires_grad for p in encoder2.parameters())


def test_a_t5_folder_without_weights_is_named_in_the_error(tmp_path):
    """transformers' OSError becomes a ValueError naming the folder (commands exit 2 on it)."""
    tokenizer, encoder = load_t5("tiny")
    encoder.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    (tmp_path / "t5" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"'.*t5' cannot be loaded as a T5 encoder \(t5.encoder\) \(a local folder\)"):
        load_t5(str(tmp_path / "t5"))


def test_full_fine_tuning_exports_the_unet_without_the_adapter(t5_parts, tmp_path):
    import copy

    from diffusers import UNet2DConditionModel

    from longalign_rl.lora import export_adapter, export_for_diffusers

    parts = copy.deepcopy(t5_parts)
    cfg = LoRAConfig(enabled=False)
    make_trainable(parts.unet, cfg, parts.t5.adapter)
    state = trainable_state_dict(parts.unet, cfg)
    assert any(k.startswith("text_adapter.") for k in state)
    export_for_diffusers(parts.unet, cfg, tmp_path / "unet")
    export_adapter(parts.unet, tmp_path / "text_adapter")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert set(unet.state_dict()) == {k for k in state if not k.startswith("text_adapter.")}
    adapter = TextAdapter.from_pretrained(tmp_path / "text_adapter")
    for k, v in adapter.state_dict().items():
        assert torch.equal(v, state[f"text_adapter.{k}"])
    assert getattr(parts.unet, ADAPTER) is parts.t5.adapter  # still attached after the export


@pytest.mark.parametrize("damage, message", [
    ("no_weights", "has no weights"),
    ("bad_json", "t5.encoder: .*config.json is not valid JSON"),
    ("truncated", r"t5.encoder: .*model.safetensors: \d+ bytes, but its header describes"),
    ("wide_adapter", "takes 24-wide inputs, but the T5 encoder .* gives 32"),
])
def test_the_driver_names_a_broken_t5_folder_or_an_adapter_that_does_not_fit(tmp_path, damage, message):
    """Issue 22: these passed the driver's check; the sampler actors then died, and the run
    ended after its retries with `no sampler actor answered (ActorDiedError, ...)`."""
    from longalign_rl import preflight
    from longalign_rl.encoding.t5 import TextAdapter

    tokenizer, encoder = load_t5("tiny")
    folder = tmp_path / "t5"
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    overrides = [f"t5.encoder={folder}", "model.pretrained=tiny"]
    if damage == "no_weights":
        (folder / "model.safetensors").unlink()
    elif damage == "bad_json":
        (folder / "config.json").write_text('{"d_model": 32,')
    elif damage == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:-64])
    else:
        TextAdapter(in_dim=24, int_dim=8, out_dim=32).save_pretrained(tmp_path / "adapter")
        overrides.append(f"t5.adapter={tmp_path / 'adapter'}")
    assert encoder.config.d_model == 32
    with pytest.raises(ConfigError, match=message):
        preflight.check_t5(load_config(None, overrides))
