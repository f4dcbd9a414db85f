"""Prompt sources (built-in demo prompts, .txt, .jsonl) and the seeded, resumable prompt order."""

import json

import pytest

from longalign_rl.encoding.tokenizer import token_counter
from longalign_rl.encoding.tokenizer import build_clip_tokenizer
from longalign_rl.prompts import DEMO_PROMPTS, PromptFileError, PromptOrder, load_prompts


# ------------------------------------------------------------------------- sources


def test_demo_prompts_are_long():
    prompts = load_prompts("demo")
    assert len(prompts) >= 8
    assert len(set(prompts)) == len(prompts)
    count = token_counter(build_clip_tokenizer())
    for prompt in prompts:
        # well over CLIP's 75 word tokens: the reason segment encoding exists
        assert count(prompt) >= 85, (count(prompt), prompt[:60])
        assert prompt == prompt.strip() and "\n" not in prompt
    assert load_prompts(str(DEMO_PROMPTS)) == prompts


def test_txt_file_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n  first prompt. \n\n\t\nsecond prompt\r\n   \nthird, with a comma\n\n")
    assert load_prompts(str(path)) == ["first prompt.", "second prompt", "third, with a comma"]


def test_txt_file_without_final_newline_and_with_utf8(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("un café au lait\n猫が寝ている 😀", encoding="utf-8")
    assert load_prompts(str(path)) == ["un café au lait", "猫が寝ている 😀"]


@pytest.mark.parametrize("name", ["p.jsonl", "P.JSONL", "p.JsonL"])
def test_jsonl_file(tmp_path, name):
    """The suffix is read case-insensitively: a P.JSONL file's raw lines are not prompts (issue 10)."""
    path = tmp_path / name
    lines = [json.dumps({"prompt": "a red cube", "id": 1}), "", json.dumps({"prompt": "  a blue ball \n", "x": [1]}),
             "   ", json.dumps({"prompt": "un café"}, ensure_ascii=False)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_prompts(str(path)) == ["a red cube", "a blue ball", "un café"]


def test_jsonl_line_text_is_not_treated_as_a_prompt_in_a_txt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('{"prompt": "a red cube"}\n')
    assert load_prompts(str(path)) == ['{"prompt": "a red cube"}']


def test_malformed_jsonl_lines_are_reported_together_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([
        json.dumps({"prompt": "a good one"}).encode(),  # 1
        b'{"prompt": "caf\xe9"}',                        # 2: Latin-1, not UTF-8
        b'{"prompt": "unclosed',                         # 3: not JSON
        json.dumps({"text": "no prompt key"}).encode(),  # 4
        json.dumps({"prompt": 5}).encode(),              # 5: not a string
        json.dumps(["prompt", "a list"]).encode(),       # 6: not an object
        b"",                                             # 7: blank, fine
        json.dumps({"prompt": "   "}).encode(),          # 8: empty prompt
        json.dumps({"prompt": "another good one"}).encode(),  # 9
    ]) + b"\n")
    with pytest.raises(PromptFileError) as e:
        load_prompts(str(path))
    message = str(e.value)
    assert "bad.jsonl" in message and "6 bad line(s)" in message
    assert "line 2: not UTF-8" in message
    assert "line 3: not JSON" in message
    assert 'line 4: no "prompt" string' in message
    assert 'line 5: no "prompt" string' in message
    assert 'line 6: no "prompt" string' in message
    assert "line 8: empty prompt" in message
    for good in ("line 1:", "line 7:", "line 9:"):
        assert good not in message


def test_non_utf8_line_in_a_txt_file_is_reported(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\n\xff\xfe broken\nfine again\n\x80\n")
    with pytest.raises(PromptFileError, match=r"2 bad line\(s\)") as e:
        load_prompts(str(path))
    assert "line 2: not UTF-8" in str(e.value) and "line 4: not UTF-8" in str(e.value)
    assert "line 1:" not in str(e.value) and "line 3:" not in str(e.value)


def test_many_bad_lines_are_summarised(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n" * 25)
    with pytest.raises(PromptFileError, match=r"25 bad line\(s\)") as e:
        load_prompts(str(path))
    assert "line 20:" in str(e.value) and "line 21:" not in str(e.value)
    assert "and 5 more" in str(e.value)


def test_missing_file_error_names_it(tmp_path):
    missing = str(tmp_path / "nowhere.txt")
    with pytest.raises(PromptFileError, match="nowhere.txt.*does not exist"):
        load_prompts(missing)
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(str(tmp_path))  # a directory


@pytest.mark.parametrize("name, text", [("blank.txt", "\n   \n\t\n"), ("empty.txt", ""), ("blank.jsonl", "\n \n")])
def test_all_blank_file_errors(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PromptFileError, match=rf"{name}.*holds no prompts"):
        load_prompts(str(path))


def test_prompt_file_error_is_a_value_error():
    assert issubclass(PromptFileError, ValueError)


# ------------------------------------------------------------------------- order

PROMPTS = [f"prompt {i}" for i in range(7)]


def test_order_is_deterministic_for_a_seed():
    a = PromptOrder(PROMPTS, seed=3, shuffle=True).batch(0, 30)
    b = PromptOrder(PROMPTS, seed=3, shuffle=True).batch(0, 30)
    c = PromptOrder(PROMPTS, seed=4, shuffle=True).batch(0, 30)
    assert a == b
    assert a != c


def test_every_prompt_appears_once_per_epoch():
    order = PromptOrder(PROMPTS, seed=0, shuffle=True)
    epochs = [order.batch(e * len(PROMPTS), len(PROMPTS)) for e in range(5)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(PROMPTS)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs
    assert any(e != PROMPTS for e in epochs)  # actually shuffled


def test_batch_equals_concatenation_of_smaller_batches():
    """Resumability: a batch is a pure function of its position."""
    order = PromptOrder(PROMPTS, seed=11, shuffle=True)
    whole = order.batch(0, 40)
    for sizes in ([40], [1] * 40, [3, 5, 7, 2, 9, 14], [13, 13, 14]):
        fresh = PromptOrder(PROMPTS, seed=11, shuffle=True)
        pieces, pos = [], 0
        for n in sizes:
            pieces += fresh.batch(pos, n)
            pos += n
        assert pieces == whole, sizes
    # resuming at an arbitrary position, in a new object, after visiting other epochs
    resumed = PromptOrder(PROMPTS, seed=11, shuffle=True)
    resumed.batch(33, 3)
    assert resumed.batch(17, 9) == whole[17:26]
    assert resumed.batch(5, 2) == whole[5:7]


def test_batch_larger_than_the_prompt_list():
    order = PromptOrder(["a", "b"], seed=0, shuffle=True)
    batch = order.batch(0, 6)
    assert len(batch) == 6
    for i in range(0, 6, 2):
        assert sorted(batch[i : i + 2]) == ["a", "b"]


def test_no_shuffle_gives_file_order():
    order = PromptOrder(PROMPTS, seed=5, shuffle=False)
    assert order.batch(0, 7) == PROMPTS
    assert order.batch(5, 4) == PROMPTS[5:] + PROMPTS[:2]
    assert order.batch(21, 3) == PROMPTS[:3]


def test_order_does_not_touch_the_global_random_state():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    PromptOrder(PROMPTS, seed=1, shuffle=True).batch(0, 20)
    assert random.random() == expected
