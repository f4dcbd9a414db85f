"""Paper-exact scoring (issue 13): the reference's prompt split and image crop as options of
ClipTypeReward, and the `denscore` preset loaded from the format its weights are published in."""

import pytest
import torch
import torch.nn.functional as F

from longalign_rl.encoding.segments import split_reference
from longalign_rl.encoding.tokenizer import build_clip_tokenizer
from longalign_rl.registry import find_reward, get_reward, reward_keywords
from rewards.decomposed import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipBackend
from rewards.tiny import TINY_HF_CLIP, tiny_clip, tiny_openclip

# "3.5" is cut by the reference's split (not by ours); a bare "!" is cut by ours only.
PROMPT = "A cat sits on 3.5 books! It looks up. Is it raining?"
# One sentence of 100 one-token words: the reference's split keeps it as one piece, and the
# text encoder then keeps only its first 75 words.
LONG_SENTENCE = " ".join("red blue green white black grey pink gold".split()[i % 8] for i in range(100))


def images(n=2, size=(64, 64), seed=0):
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def pixel_backend(size):
    """A backend with only the pixel side (no model): enough for `preprocess`."""
    return ClipBackend(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, embed_dim=8)


def reference_pixels(x, seed, side, size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """The reference's preprocessing written out: under `seed`, torch.randint draws the top
    then the left offset (as torchvision's RandomCrop does), one crop for the batch, a
    bilinear antialiased resize, then normalisation."""
    torch.manual_seed(seed)
    top = torch.randint(0, x.shape[-2] - side + 1, (1,)).item()
    left = torch.randint(0, x.shape[-1] - side + 1, (1,)).item()
    crop = x[..., top : top + side, left : left + side]
    resized = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    return (resized - mean) / std, (top, left)


def old_center_preprocess(backend, x):
    """ClipBackend.preprocess as it was before crop= existed, to check it is unchanged."""
    h, w = backend.image_size
    height, width = x.shape[-2:]
    scale = max(h / height, w / width)
    size = (max(h, round(height * scale)), max(w, round(width * scale)))
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    x = x[..., top : top + h, left : left + w]
    return (x - backend.image_mean[:, None, None]) / backend.image_std[:, None, None]


@pytest.fixture(scope="module", params=["tiny_clip", "tiny_openclip"])
def factory(request):
    return {"tiny_clip": tiny_clip, "tiny_openclip": tiny_openclip}[request.param]


# --- split="reference" ---------------------------------------------------------------------


def test_reference_split_scores_the_reference_segments(factory):
    reward = factory(split="reference")
    assert reward.segments(PROMPT) == split_reference(PROMPT)
    assert reward.segments(PROMPT) != factory().segments(PROMPT)
    # The prompt's t is the mean of those segments' embeddings.
    expected = reward.backend.encode_texts(split_reference(PROMPT)).mean(0)
    torch.testing.assert_close(reward.text_embeddings([PROMPT])[0], expected)


def test_an_over_long_reference_piece_is_cut_to_its_first_75_tokens(factory):
    reward = factory(split="reference", text_irrelevant_weight=1.0)
    assert reward.backend.count_tokens(LONG_SENTENCE) == 100
    assert len(factory().segments(LONG_SENTENCE)) == 2  # the default split keeps every word
    assert reward.segments(LONG_SENTENCE) == [LONG_SENTENCE + "."]

    x = images(1)
    out = reward(x, [LONG_SENTENCE])
    cut = " ".join(LONG_SENTENCE.split()[:75])
    expected = reward.image_embeddings(x) @ reward.backend.encode_texts([cut])[0]
    torch.testing.assert_close(out.components["score"], expected)


# --- crop="reference" ----------------------------------------------------------------------


def test_reference_crop_is_a_seeded_random_crop_then_a_bilinear_resize():
    backend = pixel_backend(32)
    x = images(size=(64, 80))  # not square: the side comes from the shorter side, 63 = round(64 * 504 / 512)
    torch.manual_seed(3)
    got = backend.preprocess(x, crop="reference")
    expected, offset = reference_pixels(x, seed=3, side=63, size=32)
    assert offset != (0, 0)  # a seed whose crop is not at the corner, so a wrong offset shows
    assert torch.equal(got, expected)


def test_on_512_px_the_reference_crop_is_torchvisions_504_crop():
    from torchvision import transforms

    reference = transforms.Compose([
        transforms.RandomCrop((504, 504)),
        transforms.Resize((224, 224)),
        transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ])
    x = images(size=(512, 512))
    torch.manual_seed(0)
    expected = reference(x)
    torch.manual_seed(0)
    got = pixel_backend(224).preprocess(x, crop="reference")
    torch.testing.assert_close(got, expected)
    hand, _ = reference_pixels(x, seed=0, side=504, size=224)
    torch.testing.assert_close(got, hand)


def test_from_504_px_up_the_reference_crop_is_torchvisions_fixed_504_crop():
    """The reference crops 504 px whatever the image size: on 520 x 700 (where 504/512 of the
    short side would be 512) the crop equals torchvision's RandomCrop((504, 504)) under the
    same seed; under 504 px it keeps 504/512 of the short side (the tests above: 63 of 64)."""
    from torchvision import transforms

    reference = transforms.Compose([
        transforms.RandomCrop((504, 504)),
        transforms.Resize((32, 32)),
        transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ])
    x = images(size=(520, 700))
    torch.manual_seed(5)
    expected = reference(x)
    torch.manual_seed(5)
    got = pixel_backend(32).preprocess(x, crop="reference")
    torch.testing.assert_close(got, expected)
    hand, offset = reference_pixels(x, seed=5, side=504, size=32)
    assert offset != (0, 0)
    torch.testing.assert_close(got, hand)
    proportional, _ = reference_pixels(x, seed=5, side=512, size=32)  # what 504/512 of 520 px gives
    assert (got - proportional).abs().max() > 1e-2


def test_the_default_crop_is_unchanged():
    backend = pixel_backend(32)
    for size in [(32, 32), (48, 64), (100, 30), (16, 16)]:
        x = images(size=size)
        assert torch.equal(backend.preprocess(x), old_center_preprocess(backend, x))
    reward = tiny_clip()
    x = images()
    expected = reward.backend.encode_images(old_center_preprocess(reward.backend, x))
    torch.testing.assert_close(reward.image_embeddings(x), expected)


def test_reference_crop_gradient_reaches_the_cropped_pixels_only():
    reward = tiny_clip(crop="reference")
    x = images().requires_grad_()
    torch.manual_seed(4)
    reward(x, [PROMPT, "A red boat."]).total.sum().backward()
    _, (top, left) = reference_pixels(x.detach(), seed=4, side=63, size=32)
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[top : top + 63, left : left + 63] = True
    grad = x.grad.abs().sum(dim=(0, 1))
    assert torch.isfinite(grad).all()
    assert (grad[inside] > 0).all() and (grad[~inside] == 0).all()


# --- kwargs --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error", [({"split": "foo"}, "split must be one of"),
                                           ({"crop": "foo"}, "crop must be one of")])
def test_bad_split_or_crop_names_the_keyword(kwargs, error):
    with pytest.raises(ValueError, match=error):
        get_reward("tiny_openclip", **kwargs)
    with pytest.raises(ValueError, match="crop must be one of"):
        pixel_backend(32).preprocess(images(), crop="random")


@pytest.mark.parametrize("name", ["clip", "pickscore", "denscore", "hpsv2", "tiny_clip", "tiny_openclip",
                                  "shapes_clip", "shapes_pref"])
def test_every_clip_type_preset_takes_split_and_crop(name):
    assert {"split", "crop"} <= set(reward_keywords(find_reward(name)))


# --- the denscore preset -------------------------------------------------------------------


def test_denscore_loads_the_real_format_and_scores_as_its_clip_model(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    # Denscore is published as a transformers CLIPModel, its processor as a tokenizer and
    # image-processor folder: both written here for a tiny random model.
    torch.manual_seed(5)
    model = CLIPModel(CLIPConfig(**TINY_HF_CLIP)).eval().requires_grad_(False)
    model_dir, processor_dir = tmp_path / "Denscore", tmp_path / "processor"
    model.save_pretrained(model_dir)
    tokenizer = build_clip_tokenizer()
    tokenizer.save_pretrained(processor_dir)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not OpenAI's, to see that they are read
    CLIPImageProcessor(image_mean=mean, image_std=std).save_pretrained(processor_dir)

    reward = get_reward("denscore", model=str(model_dir), processor=str(processor_dir),
                        split="reference", crop="reference", text_irrelevant_weight=0.3)
    prompts = [PROMPT, "A red boat. A blue sail? " + LONG_SENTENCE]
    x = images().requires_grad_()
    torch.manual_seed(6)
    out = reward(x, prompts)

    # By hand, from the CLIPModel's own feature functions.
    pixels, _ = reference_pixels(x.detach(), seed=6, side=63, size=32, mean=mean, std=std)
    f = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    t = []
    for prompt in prompts:
        tokens = tokenizer(split_reference(prompt), padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt")
        features = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        t.append(F.normalize(features.pooler_output, dim=-1).mean(0))
    t = torch.stack(t)
    v = F.normalize(t.mean(0), dim=0)  # the batch direction
    text_relevant = (f * (t - (t @ v)[:, None] * v)).sum(-1)
    text_irrelevant = (t @ v) * (f @ v)
    torch.testing.assert_close(out.total.detach(), text_relevant + 0.3 * text_irrelevant)

    out.total.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.parameters())
