import numpy as np
import pytest
from conftest import make_image_folder, make_npz
from PIL import Image

from xfeat.config import DEFAULT_GROUP_PATTERN, DataSpec
from xfeat.data import carve_validation, load_dataset, patient_groups
from xfeat.data.images import array_to_rgb, read_image_file
from xfeat.errors import ConfigError, DataError, ImageReadError


def test_folder_layout_classes_and_non_images_ignored(image_folder):
    ds = load_dataset(image_folder)
    assert ds.class_names == ["NORMAL", "PNEUMONIA"]
    assert set(ds.splits) == {"train", "val", "test"}
    all_ids = [i for sp in ds.splits.values() for i in sp.ids]
    assert not any(i.endswith((".txt", ".DS_Store")) for i in all_ids)
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 32  # 16 per class, carved
    assert len(ds.splits["test"]) == 12
    assert ds.splits["test"].ids[0] == "test/NORMAL/IM-0000-0000.png"


@pytest.mark.parametrize("mode", ["L", "JPEG", "RGBA", "P", "I;16"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    root = make_image_folder(tmp_path / mode, n_train=4, n_test=0, modes=(mode,))
    ds = load_dataset(DataSpec(root, val_fraction=0.5))
    im = ds.splits["train"].read_image(0)
    assert im.mode == "RGB" and np.asarray(im).shape == (40, 48, 3)
    assert np.asarray(im).max() > 200  # the bright square survived the conversion


def test_16bit_array_is_rescaled_not_clipped():
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    out = np.asarray(array_to_rgb(arr))
    assert out.shape == (2, 2, 3) and out[0, 0, 0] == 0 and out[1, 1, 0] == 255


def test_carved_val_is_stratified_grouped_and_seeded(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=40, n_test=4)
    a = load_dataset(DataSpec(root, val_fraction=0.25, split_seed=1))
    b = load_dataset(DataSpec(root, val_fraction=0.25, split_seed=1))
    c = load_dataset(DataSpec(root, val_fraction=0.25, split_seed=2))
    val, train = a.splits["val"], a.splits["train"]
    assert val.ids == b.splits["val"].ids
    assert val.ids != c.splits["val"].ids
    assert np.bincount(val.labels).tolist() == [10, 10]  # 25% of 40 per class
    groups_val = set(patient_groups(val.ids, DEFAULT_GROUP_PATTERN))
    groups_train = set(patient_groups(train.ids, DEFAULT_GROUP_PATTERN))
    assert groups_val and not groups_val & groups_train
    assert all(i.startswith("train/") for i in val.ids)  # never from test
    assert a.split_info["val"] == "carved from train"
    assert a.fingerprint != c.fingerprint  # the split recipe is part of the identity


def test_kermany_patient_ids():
    ids = [
        "train/PNEUMONIA/person12_bacteria_3.jpeg",
        "train/PNEUMONIA/person12_virus_9.jpeg",
        "train/NORMAL/IM-0115-0001.jpeg",
        "train/NORMAL/NORMAL2-IM-0381-0001.jpeg",
        "train/NORMAL/odd.jpeg",
    ]
    assert patient_groups(ids, DEFAULT_GROUP_PATTERN) == [
        "person12",
        "person12",
        "IM-0115",
        "NORMAL2-IM-0381",
        "train/NORMAL/odd.jpeg",
    ]


def test_carve_validation_keeps_groups_whole():
    labels = np.array([0] * 20 + [1] * 20)
    groups = [f"g{i // 4}" for i in range(40)]
    mask = carve_validation(labels, groups, 0.2, seed=0)
    for g in set(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        assert mask[rows].all() or not mask[rows].any()


def test_tiny_val_is_merged_and_recarved(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=30, n_val=2, n_test=2)
    ds = load_dataset(root)
    assert ds.split_info["merged_tiny_val"] == 4
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 64


def test_large_given_val_is_kept(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=4, n_val=26, n_test=2)
    ds = load_dataset(root)
    assert ds.split_info == {"val": "given"} and len(ds.splits["val"]) == 52


def test_fingerprint_follows_content(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=6, n_test=2)
    before = load_dataset(root).fingerprint
    assert load_dataset(root).fingerprint == before
    target = next((root / "test" / "NORMAL").iterdir())
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(target)
    assert load_dataset(root).fingerprint != before


def test_missing_root_and_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "flat" / "NORMAL").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/ folder"):
        load_dataset(tmp_path / "flat")


def test_class_missing_from_a_split(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=4, n_test=2)
    for p in (root / "test" / "PNEUMONIA").iterdir():
        p.unlink()
    (root / "test" / "PNEUMONIA").rmdir()
    with pytest.raises(DataError, match=r"split 'test'.*missing \['PNEUMONIA'\]"):
        load_dataset(root)


def test_empty_class_names_accepted_extensions(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=4, n_test=2)
    (root / "train" / "VIRAL").mkdir()
    (root / "test" / "VIRAL").mkdir()
    (root / "train" / "VIRAL" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"VIRAL has no images; accepted extensions: .jpg"):
        load_dataset(root)


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageReadError, match="bad.jpeg") as err:
        read_image_file(bad)
    assert err.value.path == str(bad)


def test_npz_grayscale_and_rgb(tmp_path):
    for channels in (1, 3):
        ds = load_dataset(make_npz(tmp_path / f"c{channels}.npz", channels=channels))
        assert ds.class_names == ["0", "1"]
        assert ds.split_info["merged_tiny_val"] == 8  # 8 val images < TINY_VAL_SIZE
        im = ds.splits["train"].read_image(0)
        assert im.mode == "RGB" and im.size == (28, 28)
        assert ds.splits["test"].ids[:2] == ["test/000000", "test/000001"]


def test_npz_without_val_is_carved(tmp_path):
    path = make_npz(tmp_path / "x.npz", n=(40, 0, 8))
    assert "val_images" not in np.load(path).files
    ds = load_dataset(DataSpec(path, val_fraction=0.2))
    assert len(ds.splits["val"]) == 8 and len(ds.splits["train"]) == 32


def test_npz_label_errors(tmp_path):
    path = make_npz(tmp_path / "x.npz")
    data = dict(np.load(path))
    data["test_labels"] = data["test_labels"].copy()
    data["test_labels"][0] = -1
    np.savez(path, **data)
    with pytest.raises(DataError, match=r"test_labels contains -1"):
        load_dataset(path)
    data["test_labels"][0] = 0
    data["class_names"] = np.array(["normal"])  # one name, labels up to 1
    np.savez(path, **data)
    with pytest.raises(DataError, match=r"train_labels contains 1, out of range for 1 classes"):
        load_dataset(path)


def test_npz_missing_keys(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="expected at least train_images and train_labels"):
        load_dataset(path)


def test_other_file_type_is_rejected(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("a,b")
    with pytest.raises(DataError, match=r"neither a label table \(.csv, .tsv, .jsonl\) nor an .npz"):
        load_dataset(path)


def test_bad_recipe_values():
    with pytest.raises(ConfigError, match="val_fraction=1.5"):
        DataSpec("d", val_fraction=1.5)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        DataSpec("d", group_pattern="(")
    with pytest.raises(ConfigError, match="split_seed=-1"):
        DataSpec("d", split_seed=-1)


def test_data_spec_round_trips_and_refuses_newer_records(tmp_path):
    spec = DataSpec(tmp_path, val_fraction=0.2, split_seed=3, group_pattern="")
    assert spec.group_pattern is None and spec.source == str(tmp_path)
    record = spec.to_dict()
    assert record["version"] == DataSpec.VERSION and DataSpec.from_dict(record) == spec
    assert DataSpec.coerce(str(tmp_path)) == DataSpec(str(tmp_path))
    assert DataSpec.coerce(spec) is spec
    with pytest.raises(ConfigError, match="newer xfeat"):
        DataSpec.from_dict({**record, "version": DataSpec.VERSION + 1})
    with pytest.raises(ConfigError, match="expected a folder"):
        DataSpec.coerce(3)
