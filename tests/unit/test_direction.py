"""`python -m longalign_rl.direction` and the reward's direction="corpus" (docs/method.md 2.3)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longalign_rl.direction import main
from rewards.decomposed import decomposed_score
from rewards.tiny import tiny_clip

PROMPTS = [
    "A red cube on a table. A blue ball beside it.",
    "A green tree in a field at noon.",
    "An old man reading a newspaper on a park bench; pigeons at his feet.",
    "A bowl of ramen with a soft-boiled egg.",
    "A lighthouse on a cliff in a storm! Waves crash below.",
]


@pytest.fixture
def direction_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n\n" + "\n".join(PROMPTS[3:]) + "\n")  # a blank line is skipped
    out = tmp_path / "direction.safetensors"
    # batch size 2 over 5 prompts: the sum runs over uneven chunks
    assert main(["--reward", "tiny_clip", "--reward-kwargs", '{"seed": 1}', "--prompts", str(prompts), "--out", str(out),
          "--batch-size", "2"]) == 0  # fmt: skip
    return out


def test_direction_is_the_unit_mean_text_embedding(direction_file):
    v = load_file(direction_file)["direction"]
    torch.testing.assert_close(v.norm(), torch.tensor(1.0))
    expected = F.normalize(tiny_clip(seed=1).text_embeddings(PROMPTS).mean(0), dim=0)
    torch.testing.assert_close(v, expected)
    with safe_open(direction_file, "pt") as f:
        metadata = f.metadata()
    assert metadata["reward"] == "tiny_clip" and metadata["num_prompts"] == "5"
    assert json.loads(metadata["reward_kwargs"]) == {"seed": 1}


def test_reward_uses_the_corpus_direction(direction_file):
    reward = tiny_clip(seed=1, direction="corpus", direction_path=str(direction_file))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = PROMPTS[:2]
    out = reward(images, prompts)
    v = load_file(direction_file)["direction"]
    expected, relevant, _ = decomposed_score(reward.image_embeddings(images), reward.text_embeddings(prompts), v, 0.3)
    torch.testing.assert_close(out.total, expected)
    torch.testing.assert_close(out.components["text_relevant"], relevant)
    # Not the same as the direction of this batch of two prompts.
    assert not torch.allclose(out.total, tiny_clip(seed=1)(images, prompts).total)


def test_missing_or_foreign_direction_file_is_an_error(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        tiny_clip(direction="corpus", direction_path=str(missing))
    wrong_dim = tmp_path / "wrong_dim.safetensors"
    save_file({"direction": F.normalize(torch.ones(48), dim=0)}, wrong_dim)
    with pytest.raises(ValueError, match="has shape \\(48,\\).*dimension 32"):
        tiny_clip(direction="corpus", direction_path=str(wrong_dim))
    not_unit = tmp_path / "not_unit.safetensors"
    save_file({"direction": torch.ones(32)}, not_unit)
    with pytest.raises(ValueError, match="not a finite unit vector"):
        tiny_clip(direction="corpus", direction_path=str(not_unit))
