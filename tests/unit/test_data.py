"""Stage 1's data sources without Ray: folders, JSONL and CSV manifests, import-path
generators (a test module's and ShapesWorld's), the image transform, and errors that name
the file and line."""

import json
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from longalign_rl.config import ConfigError, DataConfig, load_config
from longalign_rl.data import (
    DataSourceError, GlobalOrder, Pair, check_pair, check_source, generate_rows, load_pairs, read_pairs, to_training_image,
)


def write_image(path, size=(40, 30), colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# ---------------------------------------------------------------- folders


def test_folder_pairs_images_with_their_captions_subfolders_included(tmp_path):
    write_image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("A red square. It is alone.\n")
    write_image(tmp_path / "sub" / "a.jpg", colour=(0, 0, 255))
    (tmp_path / "sub" / "a.txt").write_text("A blue square.")
    (tmp_path / "notes.md").write_text("not data")
    pairs = read_pairs(str(tmp_path))
    assert [(p.image, p.caption) for p in pairs] == [
        (str((tmp_path / "b.png").resolve()), "A red square. It is alone."),
        (str((tmp_path / "sub" / "a.jpg").resolve()), "A blue square."),
    ]


def test_folder_errors_name_the_image_without_caption_and_the_empty_caption(tmp_path):
    write_image(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    write_image(tmp_path / "lonely.png")
    write_image(tmp_path / "blank.png")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(DataSourceError) as e:
        read_pairs(str(tmp_path))
    message = str(e.value)
    assert "2 bad entries" in message
    assert "lonely.png: no caption file lonely.txt" in message
    assert "blank.txt: empty caption" in message


# ---------------------------------------------------------------- manifests


@pytest.mark.parametrize("name", ["pairs.jsonl", "PAIRS.JSONL"])  # suffixes are case-insensitive
def test_jsonl_manifest_paths_are_relative_to_the_manifest(tmp_path, name):
    write_image(tmp_path / "images" / "x.png")
    absolute = write_image(tmp_path / "elsewhere" / "y.png")
    manifest = tmp_path / name
    manifest.write_text(json.dumps({"image": "images/x.png", "caption": " A red square. "}) + "\n\n"
                        + json.dumps({"image": str(absolute), "caption": "Another."}) + "\n")
    pairs = read_pairs(str(manifest))
    assert [p.caption for p in pairs] == ["A red square.", "Another."]
    assert pairs[0].image == str((tmp_path / "images" / "x.png").resolve())
    assert pairs[1].image == str(absolute.resolve())


def test_jsonl_manifest_with_other_column_names(tmp_path):
    write_image(tmp_path / "x.png")
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps({"file": "x.png", "text": "A caption."}) + "\n")
    pairs = read_pairs(str(manifest), image_column="file", caption_column="text")
    assert [p.caption for p in pairs] == ["A caption."]
    with pytest.raises(DataSourceError, match="line 1: column 'image' is missing"):
        read_pairs(str(manifest))


def test_jsonl_errors_name_the_manifest_and_every_bad_line(tmp_path):
    write_image(tmp_path / "x.png")
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"image": "x.png", "caption": "good"}),
        "not json",
        json.dumps({"image": "missing.png", "caption": "gone"}),
        json.dumps({"image": "x.png"}),
        json.dumps(["x.png", "a list"]),
        json.dumps({"image": "x.png", "caption": 3}),
    ]) + "\n")
    with pytest.raises(DataSourceError) as e:
        read_pairs(str(manifest))
    message = str(e.value)
    assert str(manifest) in message and "5 bad entries" in message
    assert "line 2: not JSON" in message
    assert "line 3: image 'missing.png' (column 'image') does not exist" in message
    assert "line 4: column 'caption' is missing or empty" in message
    assert "line 5: not a JSON object" in message
    assert "line 6: column 'caption'" in message
    assert "line 1" not in message


def test_csv_manifest_and_its_errors(tmp_path):
    write_image(tmp_path / "x.png")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text('image,caption\nx.png,"A red square, then\na second line."\nx.png,Plain.\n')
    pairs = read_pairs(str(manifest))
    assert [p.caption for p in pairs] == ["A red square, then\na second line.", "Plain."]

    manifest.write_text("image,caption\nx.png,fine\nnope.png,gone\nx.png,\n")
    with pytest.raises(DataSourceError) as e:
        read_pairs(str(manifest))
    assert "line 3: image 'nope.png'" in str(e.value) and "line 4: column 'caption'" in str(e.value)

    manifest.write_text("path,text\nx.png,fine\n")
    with pytest.raises(DataSourceError, match=r"pairs\.csv.*no column 'image'.*data\.image_column"):
        read_pairs(str(manifest))


def test_a_missing_or_unusable_source_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataSourceError, match="nowhere.jsonl.*does not exist"):
        read_pairs(str(tmp_path / "nowhere.jsonl"))
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(DataSourceError, match=r"pairs\.txt.*\.jsonl or \.csv"):
        read_pairs(str(tmp_path / "pairs.txt"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataSourceError, match="no image-caption pairs"):
        read_pairs(str(tmp_path / "empty.jsonl"))


# ---------------------------------------------------------------- generators

GENERATOR = '''
import numpy as np


def pairs(n=3, value=7):
    for i in range(n):
        yield np.full((16, 24, 3), value + i, dtype=np.uint8), f"Caption number {i}. It is long."


def broken():
    return [(np.zeros((8, 8, 3), np.uint8), "fine"), (np.zeros((8, 8), np.uint8), "no channels")]
'''


@pytest.fixture
def generator_module(tmp_path, monkeypatch):
    (tmp_path / "my_pairs.py").write_text(textwrap.dedent(GENERATOR))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_pairs"
    sys.modules.pop("my_pairs", None)


def test_shapesworld_generator_gives_training_rows():
    data = DataConfig(source="shapesworld.plugin:pairs", kwargs={"n": 5, "seed": 1, "image_size": 48}, resolution=32)
    assert check_source(data) is None  # a generator: nothing read on the driver
    rows = generate_rows(data.source, data.kwargs, data.resolution)
    images, captions = rows["image"], list(rows["caption"])
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.9  # bright shapes on black
    assert all(c.startswith("This image is a grid of two rows") for c in captions)
    again = generate_rows(data.source, data.kwargs, data.resolution)
    assert np.array_equal(again["image"], images)  # seeded


def test_import_path_generator_gives_its_rows_in_order(generator_module):
    source = f"{generator_module}:pairs"
    assert check_source(DataConfig(source=source, kwargs={"n": 5})) is None
    rows = generate_rows(source, {"n": 5, "value": 100}, 8)
    assert len(rows["caption"]) == 5 and rows["caption"][4] == "Caption number 4. It is long."
    assert rows["image"].shape == (5, 3, 8, 8)
    assert np.allclose(rows["image"][2], 102 / 255)  # item 2: value 100 + 2
    with pytest.raises(DataSourceError, match="gave no pairs"):
        generate_rows(source, {"n": 0}, 8)


def test_generator_errors_name_the_source_kwargs_or_item(generator_module):
    with pytest.raises(DataSourceError, match="no_such_module"):
        check_source(DataConfig(source="no_such_module:pairs"))
    with pytest.raises(DataSourceError, match="data.source 'my_pairs:nope'.*no attribute 'nope'"):
        check_source(DataConfig(source=f"{generator_module}:nope"))
    with pytest.raises(DataSourceError, match="data.kwargs.*colour"):
        check_source(DataConfig(source=f"{generator_module}:pairs", kwargs={"colour": 1}))
    # A generator's own `validate` runs on the driver too: values, not only names, are checked.
    with pytest.raises(DataSourceError, match="data.kwargs.*not a ShapesWorld config.*grid"):
        check_source(DataConfig(source="shapesworld.plugin:pairs", kwargs={"grid": 7}))
    with pytest.raises(DataSourceError, match=r"'my_pairs:broken', item 1: expected \(uint8 \[H, W, 3\]"):
        generate_rows(f"{generator_module}:broken", {}, 8)


def test_check_pair_refuses_wrong_dtypes_and_empty_captions():
    image = np.zeros((4, 4, 3), np.uint8)
    assert check_pair((image, " a cat "), 0, "g")[1] == "a cat"
    for bad in [(image.astype(np.float32), "a"), (image, ""), (image, 3), image, (image, "a", "b")]:
        with pytest.raises(DataSourceError, match="item 5"):
            check_pair(bad, 5, "g")


# ---------------------------------------------------------------- images


def test_training_image_resizes_the_shorter_side_and_crops_the_centre():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255  # a white band in the middle half of the width
    out = to_training_image(image, 8)
    assert out.shape == (3, 8, 8) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # 20 x 40 -> 8 x 16, the centre 8 x 8 is the band's middle: white
    assert np.allclose(out[:, :, 2:6], 1.0, atol=0.02)
    tall = to_training_image(np.full((50, 10, 3), 128, np.uint8), 16)
    assert tall.shape == (3, 16, 16) and np.allclose(tall, 128 / 255, atol=1 / 255)


def old_training_image(image, resolution):
    """to_training_image as it was before data.resize existed, to check the default is unchanged."""
    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    pil = Image.fromarray(image)
    if pil.size != size:
        pil = pil.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    pil = pil.crop((left, top, left + resolution, top + resolution))
    return np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0


def test_bilinear_resize_is_the_references_torchvision_transform(tmp_path):
    """data.resize: bilinear gives the reference's stage-1 transform exactly (Resize(R,
    bilinear), CenterCrop(R), ToTensor on the PIL image); 30 x 50 -> 16: its long side is
    truncated to 26 px where bicubic rounds to 27."""
    from torchvision import transforms

    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    reference = transforms.Compose([transforms.Resize(16, interpolation=transforms.InterpolationMode.BILINEAR),
                                    transforms.CenterCrop(16), transforms.ToTensor()])
    expected = reference(Image.fromarray(image)).numpy()
    got = to_training_image(image, 16, "bilinear")
    assert got.shape == (3, 16, 16) and got.dtype == np.float32
    assert np.array_equal(got, expected)
    default = to_training_image(image, 16)
    assert np.array_equal(default, old_training_image(image, 16))  # unchanged
    assert np.abs(default - expected).max() > 0.05
    Image.fromarray(image).save(tmp_path / "a.png")  # lossless: the same pixels
    rows = load_pairs([Pair(str(tmp_path / "a.png"), "x")], 16, "bilinear")
    assert np.array_equal(rows["image"][0], expected)
    with pytest.raises(ConfigError, match="data.resize"):
        load_config(None, ["data.resize=nearest"])


def test_load_pairs_reads_files_and_names_an_unreadable_one(tmp_path):
    a = write_image(tmp_path / "a.png", size=(16, 16), colour=(0, 255, 0))
    rgba = tmp_path / "b.png"
    Image.new("RGBA", (32, 16), (0, 0, 255, 10)).save(rgba)
    rows = load_pairs([Pair(str(a), "x"), Pair(str(rgba), "y")], 8)
    assert rows["image"].shape == (2, 3, 8, 8) and list(rows["caption"]) == ["x", "y"]
    assert np.allclose(rows["image"][0, 1], 1.0) and np.allclose(rows["image"][1, 2], 1.0)  # green, blue
    broken = tmp_path / "c.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataSourceError, match="c.png: cannot be read"):
        load_pairs([Pair(str(broken), "z")], 8)


def test_check_source_reads_a_manifest_on_the_driver(tmp_path):
    write_image(tmp_path / "x.png")
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps({"img": "x.png", "txt": "A caption."}) + "\n")
    pairs = check_source(DataConfig(source=str(manifest), image_column="img", caption_column="txt"))
    assert len(pairs) == 1 and pairs[0].caption == "A caption."


def test_global_order_gives_every_split_of_a_step_the_same_pairs():
    """The pairs of a step's global batch depend on the step alone: cut into 4 x 1, 2 x 2 or
    1 x 4 chunks they are the same pairs in the same order."""
    order = GlobalOrder(n=10, global_batch=4, seed=3, shuffle=True)
    assert order.steps_per_epoch == 2  # 2 pairs of each epoch are left out
    for step in range(6):
        whole = order.pairs(step, 0, 4)
        assert [i for c in range(4) for i in order.pairs(step, c, 1)] == whole
        assert order.pairs(step, 0, 2) + order.pairs(step, 2, 2) == whole
    epoch0 = order.pairs(0, 0, 4) + order.pairs(1, 0, 4)
    assert len(set(epoch0)) == 8  # no pair twice in an epoch
    assert epoch0 != order.pairs(2, 0, 4) + order.pairs(3, 0, 4)  # another order in epoch 1
    assert order.epoch_of(3) == 1 and order.epoch_of(4) == 2
    again = GlobalOrder(n=10, global_batch=4, seed=3, shuffle=True)
    assert again.pairs(5, 1, 3) == order.pairs(5, 1, 3)  # a pure function of the seed
    assert GlobalOrder(10, 4, 4, True).pairs(0, 0, 4) != order.pairs(0, 0, 4)
    assert GlobalOrder(10, 4, 3, False).pairs(1, 0, 4) == [4, 5, 6, 7]  # unshuffled: source order
    with pytest.raises(IndexError):
        order.pairs(0, 3, 2)


def test_a_manifests_pairs_load_by_index_each_image_with_its_caption(tmp_path):
    """What a stage-1 worker loads for its chunk of a step: the pairs it names, in its order."""
    from longalign_rl.training.denoising import PairSource, source_spec

    lines = []
    for i in range(6):
        Image.new("RGB", (24, 16), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"Red level {i}."}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    data = DataConfig(source=str(tmp_path / "pairs.jsonl"), resolution=8)
    source = PairSource(source_spec(data, check_source(data)), data)
    assert source.n == 6
    rows = source.load([4, 1, 5])
    assert list(rows["caption"]) == ["Red level 4.", "Red level 1.", "Red level 5."]
    assert rows["image"].shape == (3, 3, 8, 8)
    for image, level in zip(rows["image"], [4, 1, 5]):
        assert abs(float(image[0].mean()) - 40 * level / 255) < 1e-6
