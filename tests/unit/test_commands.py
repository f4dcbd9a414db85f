"""Every command's bad input (issue 22, item 1): generate, evaluate and import-reference
range-check their arguments before loading anything, check every file they read (header,
size, finite values, JSON), probe where they write, and refuse non-finite results: one
line `error: ...`, exit 2 (or 1 for a result that is not finite), nothing written."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from longalign_rl import cli, evaluate, generate
from longalign_rl.arguments import check_device
from tests.unit.test_pipeline import run_dir  # noqa: F401 (the fixture: a run directory with lora/ and a checkpoint)
from tests.unit.test_reference_import import save_adapter

UNWRITABLE = "/proc/longalign-out"  # a folder nobody can write in, root included


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("options, message", [
    (["--steps", "-5"], "argument --steps: must be >= 1, got -5"),
    (["--guidance", "-3"], "argument --guidance: must be >= 1, got -3"),
    (["--guidance", "nan"], "argument --guidance: must be a finite number, got nan"),
    (["--resolution", "30"], "argument --resolution: must be a multiple of 8, got 30"),
    (["--resolution", "0"], "argument --resolution: must be >= 8, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--out", UNWRITABLE], f"--out {UNWRITABLE}: cannot write in /proc"),
])
def test_generate_refuses_bad_arguments_before_loading(tmp_path, capsys, options, message):
    argv = ["tiny", "a red cube.", "--out", str(tmp_path / "out"), *options]
    with pytest.raises(SystemExit) as exit_info:  # argparse's own path: our Parser.error
        code = generate.main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_generate_refuses_an_out_that_is_a_file_and_cuda_without_a_gpu(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "images.png"
    blocker.write_text("not a folder")
    assert generate.main(["tiny", "a red cube.", "--out", str(blocker)]) == 2
    assert "--out" in one_line_error(capsys) and blocker.read_text() == "not a folder"
    assert generate.main(["tiny", "a red cube.", "--out", str(blocker / "sub")]) == 2
    assert f"its parent {blocker} is a file" in one_line_error(capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generate.main(["tiny", "a red cube.", "--out", str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert "--device cuda: this machine has no CUDA GPU" in one_line_error(capsys)
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("gpu0")


def damaged(run_dir, tmp_path, how):
    """A copy of the run whose lora/ file is truncated or holds NaN."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (lora,) = (copy / "lora").glob("*.safetensors")
    if how == "truncated":
        data = lora.read_bytes()
        lora.write_bytes(data[: len(data) // 2])
    else:
        state = load_file(lora)
        name = sorted(state)[0]
        state[name] = torch.full_like(state[name], float("nan"))
        save_file(state, lora)
    return copy, lora


@pytest.mark.parametrize("how, message", [("truncated", "(truncated or corrupt)"), ("nan", "holds NaN or infinite")])
def test_generate_and_evaluate_name_a_damaged_lora_file(run_dir, tmp_path, capsys, how, message):  # noqa: F811
    copy, lora = damaged(run_dir, tmp_path, how)
    assert generate.main([str(copy), "a red cube.", "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert str(lora) in err and message in err and not (tmp_path / "out").exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube.\n")
    assert evaluate.main([str(copy), "--prompts", str(prompts), "--out", str(tmp_path / "ev")]) == 2
    assert message in one_line_error(capsys) and not (tmp_path / "ev").exists()


def test_generate_refuses_images_that_are_not_finite(run_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    from longalign_rl.pipeline import LongPrompts

    monkeypatch.setattr(LongPrompts, "generate", lambda self, prompts, seeds, **kw:
                        torch.full((len(prompts), 3, 64, 64), float("nan")))
    assert generate.main([str(run_dir), "a red cube.", "--out", str(tmp_path / "out")]) == 1
    assert "1 of 1 images hold NaN or infinite pixels" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    (["--n", "0"], "argument --n: must be >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--reward-kwargs", "[1]"], "argument --reward-kwargs: must be a JSON object"),
    (["--reward-kwargs", "{x"], "argument --reward-kwargs: not valid JSON"),
])
def test_evaluate_refuses_bad_arguments(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["tiny", "--prompts", "demo", *options])
    assert exit_info.value.code == 2 and message in one_line_error(capsys)


def test_evaluate_refuses_an_out_that_is_a_file_and_scores_that_are_nan(run_dir, tmp_path, capsys):  # noqa: F811
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube.\na blue ball.\n")
    blocker = tmp_path / "ev"
    blocker.write_text("a file")
    assert evaluate.main([str(run_dir), "--prompts", str(prompts), "--out", str(blocker)]) == 2
    assert "--out" in one_line_error(capsys) and blocker.read_text() == "a file"
    code = evaluate.main([str(run_dir), "--prompts", str(prompts), "--out", str(tmp_path / "ev2"), "--reward",
                          "tests.plugins.my_reward:broken", "--reward-kwargs", '{"how": "nan"}'])
    assert code == 1
    assert "reward is NaN or infinite for 2 of 2 prompts" in one_line_error(capsys)
    assert not (tmp_path / "ev2").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "adapter weights: "),
    ("nan", "holds NaN or infinite values"),
    ("json", "adapter config: "),
    ("config", "does not describe a TextAdapter"),
])
def test_import_reference_names_a_damaged_adapter_folder(tmp_path, capsys, damage, message):
    folder = tmp_path / "adapter"
    save_adapter(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "nan":
        state = load_file(weights)
        state = {k: torch.full_like(v, float("inf")) for k, v in state.items()}
        save_file(state, weights)
    elif damage == "json":
        (folder / "config.json").write_text('{"in_dim": 16,')
    else:
        (folder / "config.json").write_text('{"_class_name": "TextAdapter", "in_dim": "sixteen"}')
    out = tmp_path / "out"
    assert cli.main(["import-reference", "--base", "tiny", "--adapter", str(folder), "--out", str(out)]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_import_reference_probes_its_output_place(tmp_path, capsys):
    folder = tmp_path / "adapter"
    save_adapter(folder)
    assert cli.main(["import-reference", "--base", "tiny", "--adapter", str(folder), "--out",
                     f"{UNWRITABLE}/imported"]) == 2
    assert "cannot write in /proc" in one_line_error(capsys)


def test_direction_checks_its_arguments_and_output(tmp_path, capsys):
    base = ["direction", "--reward", "tiny_clip", "--prompts", "demo"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--out", str(tmp_path / "d.safetensors"), "--batch-size", "0"])
    assert exit_info.value.code == 2 and "--batch-size: must be >= 1" in one_line_error(capsys)
    assert cli.main([*base, "--out", str(tmp_path)]) == 2
    assert "is a folder" in one_line_error(capsys)
    assert cli.main([*base, "--out", f"{UNWRITABLE}/d.safetensors"]) == 2
    assert "cannot write in /proc" in one_line_error(capsys)
    assert cli.main(["direction", "--reward", "no_such_reward", "--prompts", "demo", "--out",
                     str(tmp_path / "d.safetensors")]) == 2
    assert "no_such_reward" in one_line_error(capsys) and not (tmp_path / "d.safetensors").exists()
