"""The ShapesWorld CLIP reward (shapesworld/clip_reward.py) and its trainer
(shapesworld/clip_train.py): training lowers the loss and repeats from its seed,
the shipped weights rank true captions above one-cell-changed ones through the registry,
and a missing weights folder says how to make it."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from longalign_rl.encoding.segments import split_sentences
from longalign_rl.encoding.tokenizer import build_clip_tokenizer
from longalign_rl.registry import get_reward
from shapesworld import WorldConfig, caption, cell_sentences, make_dataset, to_tensor
from shapesworld.clip_train import (
    TrainConfig,
    build_model,
    labels,
    mismatched,
    sentence_bank,
    tokenize,
    train,
)
from rewards.decomposed import ClipTypeReward
from shapesworld.clip_reward import DEFAULT_WEIGHTS, shapes_clip

WORLD = WorldConfig()
# A few steps of small batches: seconds on one thread.
TINY_RUN = dict(batch_size=32, warmup_steps=5, log_every=10, calibrate_steps=2)


def test_sentence_bank_indexes_each_cells_true_sentence():
    bank = sentence_bank(WORLD)
    assert len(bank) == 1 + 4 * 21 and len(set(bank)) == len(bank)
    for _, _, scene in make_dataset(WORLD, 20, seed=3):
        truth = cell_sentences(scene, WORLD)
        assert [bank[1 + k * 21 + a] for k, a in enumerate(labels(scene, WORLD))] == truth


def test_training_tokens_padded_to_the_longest_embed_as_the_77_token_window():
    model = build_model(seed=1).eval()
    tokenizer, texts = build_clip_tokenizer(), sentence_bank(WORLD)[:6]
    short = tokenize(tokenizer, texts)
    full = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    assert short["input_ids"].shape[1] < 77
    with torch.no_grad():
        a = model.get_text_features(**short).pooler_output
        b = model.get_text_features(input_ids=full.input_ids, attention_mask=full.attention_mask).pooler_output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_short_training_lowers_the_loss_and_saves_a_loadable_reward(tmp_path):
    metrics = train(tmp_path, TrainConfig(steps=20, **TINY_RUN))
    history = metrics["train"]["history"]
    assert [row["step"] for row in history] == [1, 10, 20]
    assert history[-1]["cell"] < history[0]["cell"] - 0.1  # per-cell cross-entropy starts at ln 21 = 3.04
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "model.safetensors").values())
    reward = shapes_clip(str(tmp_path), text_irrelevant_weight=0.5)
    assert isinstance(reward, ClipTypeReward) and reward.text_irrelevant_weight == 0.5
    assert next(reward.backend.parameters()).dtype == torch.float32
    assert reward.backend.image_mean.tolist() == [0.5, 0.5, 0.5]


def test_training_repeats_from_its_seed_and_step_count(tmp_path):
    def weights(folder, seed):
        train(folder, TrainConfig(seed=seed, steps=3, **TINY_RUN))
        return load_file(folder / "model.safetensors")

    a, b, c = weights(tmp_path / "a", 0), weights(tmp_path / "b", 0), weights(tmp_path / "c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual_projection.weight"], c["visual_projection.weight"])


def test_shipped_reward_ranks_true_captions_above_one_changed_cell():
    if not (DEFAULT_WEIGHTS / "model.safetensors").is_file():
        pytest.fail(f"no shipped weights in {DEFAULT_WEIGHTS}: run python -m shapesworld.clip_train")
    reward = get_reward("shapes_clip", text_irrelevant_weight=0.3)
    assert isinstance(reward, ClipTypeReward) and reward.text_irrelevant_weight == 0.3
    data = make_dataset(WORLD, 64, seed=11)
    images = torch.stack([to_tensor(image) for image, _, _ in data])
    rng = np.random.default_rng(5)
    true = [text for _, text, _ in data]
    wrong = [caption(mismatched(scene, WORLD, rng, "colour"), WORLD) for _, _, scene in data]
    right_out, wrong_out = reward(images, true), reward(images, wrong)
    assert [len(s) for s in right_out.segment_scores] == [5] * len(data)  # preamble + 4 cells
    assert (right_out.total > wrong_out.total).float().mean() >= 0.85
    # The changed cell's own segment score drops; the other cells' segments are unchanged text.
    pairs = [(split_sentences(a), split_sentences(b)) for a, b in zip(true, wrong)]
    changed = [next(k for k in range(1, 5) if a[k] != b[k]) for a, b in pairs]
    drops = [r[k] > w[k] for r, w, k in zip(right_out.segment_scores, wrong_out.segment_scores, changed)]
    assert np.mean(drops) >= 0.85


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="clip_train --out"):
        get_reward("shapes_clip", weights=str(tmp_path))
