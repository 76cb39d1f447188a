"""Tests for cmjax.data: sources, transforms, the sharded loader, its iterator's state restored
(as grain's checkpoint handler does), TFDS without TensorFlow, and host-local -> global batches
on a 4-device CPU mesh."""

import io
import json
import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
from PIL import Image

from cmjax import data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _indexed_source(n=32, size=12):
    """Random RGB images with label == index, so batches say which records they hold."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return data.NumpySource(images, labels=np.arange(n))


def _labels(loader):
    return np.concatenate([b["label"] for b in loader])


def _restored(loader, state: bytes):
    """A fresh iterator over ``loader`` set to ``state`` (what grain's checkpoint handler does on
    restore, see cmjax.training.run_checkpoints)."""
    iterator = iter(loader)
    iterator.set_state(state)
    return iterator


def _run_python(code, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


# --------------------------------------------------------------------------------------------
# Sources.


def test_image_folder_recursive_sorted_and_converted_to_rgb(tmp_path):
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    gray = np.array([[0, 100], [200, 255]], np.uint8)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # Opaque: colour kept.
    rgba[1, 1] = (10, 20, 30, 0)  # Transparent: composited onto white.
    _save(tmp_path / "z.png", rgb)
    _save(tmp_path / "a" / "b" / "deep.PNG", rgb[::-1])  # Upper-case extension, two levels down.
    _save(tmp_path / "a" / "gray.bmp", gray)
    _save(tmp_path / "m_rgba.png", rgba, "RGBA")
    (tmp_path / "a" / "notes.txt").write_text("not an image")

    src = data.ImageFolderSource(tmp_path)

    rel = [os.path.relpath(p, tmp_path).replace(os.sep, "/") for p in src.paths]
    assert rel == ["a/b/deep.PNG", "a/gray.bmp", "m_rgba.png", "z.png"]
    assert len(src) == 4
    assert data.ImageFolderSource(str(tmp_path)).paths == src.paths  # Deterministic.
    records = [src[i] for i in range(len(src))]
    for r in records:
        assert r["image"].dtype == np.uint8 and r["image"].ndim == 3 and r["image"].shape[2] == 3
    np.testing.assert_array_equal(records[0]["image"], rgb[::-1])
    assert records[0]["path"] == str(tmp_path / "a" / "b" / "deep.PNG")
    np.testing.assert_array_equal(records[1]["image"], np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(records[2]["image"][0, 0], [10, 20, 30])
    np.testing.assert_array_equal(records[2]["image"][1, 1], [255, 255, 255])
    np.testing.assert_array_equal(records[3]["image"], rgb)


def test_image_folder_custom_extensions(tmp_path):
    _save(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8))
    _save(tmp_path / "y.bmp", np.zeros((2, 2, 3), np.uint8))
    src = data.ImageFolderSource(tmp_path, extensions=("bmp",))
    assert [os.path.basename(p) for p in src.paths] == ["y.bmp"]


def test_image_folder_empty_raises_naming_the_folder(tmp_path):
    empty = tmp_path / "empty_dataset"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty_dataset"):
        data.ImageFolderSource(empty)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        data.ImageFolderSource(tmp_path / "missing_dir")


def test_image_folder_refuses_names_that_are_not_regular_files(tmp_path):
    """A FIFO (opening it would block the loader) or a dangling link named like an image: one
    line naming the first, counting the rest, before any image is read."""
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "c.jpg")
    with pytest.raises(ValueError, match=r"b\.png: not a regular file .*and 1 more like it in the image folder") as e:
        data.ImageFolderSource(tmp_path)
    assert "\n" not in str(e.value)


def test_corrupt_image_fails_naming_the_file(tmp_path):
    _save(tmp_path / "good.png", np.full((8, 8, 3), 7, np.uint8))
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[:60])
    src = data.ImageFolderSource(tmp_path)
    assert len(src) == 3  # Listing does not open files; reading does.

    with pytest.raises(OSError, match="garbage.png"):
        src[0]
    np.testing.assert_array_equal(src[1]["image"], np.full((8, 8, 3), 7, np.uint8))
    with pytest.raises(OSError, match="truncated.png"):
        src[2]
    # Not skipped inside the loader either: the training run fails naming the file.
    loader = data.make_train_loader(src, global_batch_size=3, image_size=8, seed=0,
                                    num_epochs=1, shard_by_host=False)
    with pytest.raises(Exception, match=r"garbage\.png|truncated\.png"):
        list(loader)


def test_numpy_source_and_validation():
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    src = data.NumpySource(images, labels=[5, 6])
    assert len(src) == 2
    assert src[1]["image"].shape == (3, 3, 1) and src[1]["label"] == 6
    with pytest.raises(ValueError, match="uint8"):
        data.NumpySource(images.astype(np.float32))
    with pytest.raises(ValueError, match="labels"):
        data.NumpySource(images, labels=[1])


def test_digits_images_are_the_sklearn_digits():
    from sklearn.datasets import load_digits

    digits = data.digits_images()
    assert digits.shape == (1797, 8, 8, 1) and digits.dtype == np.uint8
    assert digits.min() == 0 and digits.max() == 255
    ref = load_digits().images
    np.testing.assert_array_equal(digits[..., 0] == 255, ref == 16)
    np.testing.assert_array_equal(digits[..., 0] == 0, ref == 0)
    big = data.digits_images(size=16)
    assert big.shape == (1797, 16, 16, 1) and big.dtype == np.uint8
    assert abs(big[:50].astype(float).mean() - digits[:50].astype(float).mean()) < 10


# --------------------------------------------------------------------------------------------
# Transforms.


def test_random_crop_resizes_shorter_side_then_crops_a_window():
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    resized = data._resize_shorter_side(image, 10)
    assert resized.shape == (10, 15, 3)
    crop = data.RandomCrop(10)
    lefts = set()
    for seed in range(20):
        out = crop.random_map({"image": image, "label": 3}, np.random.default_rng(seed))["image"]
        assert out.shape == (10, 10, 3) and out.dtype == np.uint8
        matches = [x for x in range(6) if np.array_equal(out, resized[:, x:x + 10])]
        assert matches, "crop is not a window of the resized image"
        lefts.add(matches[0])
    assert len(lefts) > 2  # The offset is random ...
    again = crop.random_map({"image": image}, np.random.default_rng(7))["image"]
    np.testing.assert_array_equal(  # ... and fixed by the rng.
        again, crop.random_map({"image": image}, np.random.default_rng(7))["image"])
    centre = data.CenterCrop(10).map({"image": image})["image"]
    np.testing.assert_array_equal(centre, resized[:, 2:12])


def test_crop_grayscale_and_upscale():
    gray = np.random.default_rng(2).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    out = data.RandomCrop(16).random_map({"image": gray}, np.random.default_rng(0))["image"]
    assert out.shape == (16, 16, 1)
    # A square image already at the target size passes through untouched.
    same = data.RandomCrop(8).random_map({"image": gray}, np.random.default_rng(0))["image"]
    np.testing.assert_array_equal(same, gray)


def test_random_flip_flips_exactly_when_the_rng_says_so():
    image = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    flip = data.RandomFlip()
    flipped = 0
    for seed in range(16):
        out = flip.random_map({"image": image}, np.random.default_rng(seed))["image"]
        expect_flip = np.random.default_rng(seed).random() < 0.5
        np.testing.assert_array_equal(out, image[:, ::-1] if expect_flip else image)
        flipped += expect_flip
        out2 = flip.random_map({"image": image}, np.random.default_rng(seed))["image"]
        np.testing.assert_array_equal(out, out2)
    assert 0 < flipped < 16
    # Seed 0's first draw is 0.637 (no flip); seed 2's is 0.261 (flip).
    np.testing.assert_array_equal(
        flip.random_map({"image": image}, np.random.default_rng(2))["image"][:, 0], image[:, 4])


def test_to_float_range_and_channels():
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], np.uint8)
    out = data.ToFloat(3).map({"image": rgb, "label": 4, "path": "x.png"})
    assert set(out) == {"image", "label"}  # Strings are dropped, labels kept.
    img = out["image"]
    assert img.dtype == np.float32 and img.shape == (1, 3, 3)
    assert img.min() >= -1.0 and img.max() <= 1.0
    np.testing.assert_array_equal(img[0, 0], [-1, -1, -1])
    np.testing.assert_array_equal(img[0, 1], [1, 1, 1])
    gray = data.ToFloat(1).map({"image": rgb})["image"]
    assert gray.shape == (1, 3, 1)
    np.testing.assert_allclose(gray[0, :, 0], [-1.0, 1.0, round(0.299 * 255) / 127.5 - 1],
                               atol=1e-6)
    g = np.array([[[0], [128]]], np.uint8)
    three = data.ToFloat(3).map({"image": g})["image"]
    assert three.shape == (1, 2, 3)
    np.testing.assert_allclose(three[0, 1], [128 / 127.5 - 1] * 3, atol=1e-6)
    with pytest.raises(ValueError):
        data.ToFloat(2)


# --------------------------------------------------------------------------------------------
# The loader.


def test_loader_batches_shapes_and_covers_the_epoch():
    src = _indexed_source(n=35)
    loader = data.make_train_loader(src, global_batch_size=8, image_size=8, seed=0,
                                    num_epochs=1, shard_by_host=False)
    batches = list(loader)
    assert len(batches) == 4  # 35 // 8; the short last batch is dropped.
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (8, 8, 8, 3) and b["image"].dtype == np.float32
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    labels = np.concatenate([b["label"] for b in batches])
    assert len(set(labels.tolist())) == 32
    assert not np.array_equal(labels, np.sort(labels))  # Shuffled.


def test_loader_shards_are_disjoint_and_cover_the_epoch():
    src = _indexed_source(n=32)

    def shard(i):
        loader = data.make_train_loader(
            src, global_batch_size=8, image_size=8, seed=3, num_epochs=1,
            shard_options=grain.sharding.ShardOptions(i, 2, drop_remainder=True))
        batches = list(loader)
        assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)  # Per-host batch 8 // 2.
        return np.concatenate([b["label"] for b in batches])

    host0, host1 = shard(0), shard(1)
    assert len(host0) == len(host1) == 16
    assert set(host0.tolist()).isdisjoint(host1.tolist())
    assert sorted(host0.tolist() + host1.tolist()) == list(range(32))


def test_loader_is_deterministic_for_a_seed():
    src = _indexed_source(n=32)

    def first_batches(seed):
        loader = data.make_train_loader(src, global_batch_size=8, image_size=8, seed=seed,
                                        shard_by_host=False)
        it = iter(loader)
        return [next(it) for _ in range(5)]  # Crosses into the second epoch.

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not all(np.array_equal(x["label"], z["label"]) for x, z in zip(a, c))
    # Epochs are reshuffled: epoch 2 does not repeat epoch 1's order.
    assert not np.array_equal(a[4]["label"], a[0]["label"])


def test_loader_rejects_indivisible_global_batch():
    with pytest.raises(ValueError, match="divisible"):
        data.make_train_loader(_indexed_source(), global_batch_size=7, image_size=8, seed=0,
                               shard_options=grain.sharding.ShardOptions(0, 2, True))


def test_loader_on_digits_grayscale():
    loader = data.make_train_loader(data.NumpySource(data.digits_images()),
                                    global_batch_size=16, image_size=8, seed=0, channels=1,
                                    shard_by_host=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 8, 8, 1)
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0


def test_iterator_state_restore_gives_the_same_batches():
    src = _indexed_source(n=32)

    def loader():
        return data.make_train_loader(src, global_batch_size=8, image_size=8, seed=5,
                                      shard_by_host=False)

    it = iter(loader())
    for _ in range(3):
        next(it)
    state = json.dumps(json.loads(it.get_state().decode())).encode()  # Survives a JSON checkpoint.
    expected = [next(it) for _ in range(4)]  # Crosses the epoch boundary at batch 4.

    restored = _restored(loader(), state)
    for want in expected:
        got = next(restored)
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_array_equal(got["image"], want["image"])  # Same crops and flips.
    # A fresh iterator is not already there: the state is what moved it.
    assert not np.array_equal(next(iter(loader()))["label"], expected[0]["label"])
    # A state from another stream (different seed) is refused rather than misapplied.
    other = data.make_train_loader(src, global_batch_size=8, image_size=8, seed=6,
                                   shard_by_host=False)
    with pytest.raises(ValueError, match="[Ss]ampler"):
        _restored(other, state)


def test_loader_with_worker_processes_and_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(8):
        _save(tmp_path / f"d{i % 2}" / f"{i}.png", rng.integers(0, 256, (10, 14, 3), np.uint8))
    loader = data.make_train_loader(data.ImageFolderSource(tmp_path), global_batch_size=4,
                                    image_size=8, seed=0, worker_count=1, shard_by_host=False)
    it = iter(loader)
    first = next(it)
    assert first["image"].shape == (4, 8, 8, 3) and set(first) == {"image"}
    state = it.get_state()
    want = next(it)
    got = next(_restored(loader, state))
    np.testing.assert_array_equal(got["image"], want["image"])


# --------------------------------------------------------------------------------------------
# TFDS, without TensorFlow.


def test_tfds_mock_data_through_data_source():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20):
        src = data.tfds_source("mnist", "train")
        assert len(src) == 20
        record = src[0]
        assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
        for channels in (1, 3):
            loader = data.make_train_loader(src, global_batch_size=4, image_size=16, seed=0,
                                            channels=channels, shard_by_host=False)
            batch = next(iter(loader))
            assert batch["image"].shape == (4, 16, 16, channels)
            assert batch["label"].shape == (4,)
            assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_tfds_prepared_array_record_dataset_without_tensorflow(tmp_path):
    """A real TFDS dataset (ArrayRecord files, PNG-encoded images) is prepared, then read back
    through `tfds_source` + the loader, and tensorflow is never imported.

    Runs as a script: TFDS cannot locate a builder's code when it is defined inside a package
    module such as `tests.test_data` (it then needs the `importlib_resources` backport).
    """
    out = _run_python(f"""
        import io, json, sys

        import numpy as np
        import tensorflow_datasets as tfds
        from PIL import Image
        from cmjax import data

        images = np.random.default_rng(0).integers(0, 256, (12, 10, 14, 3), dtype=np.uint8)

        class CmjaxTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({{
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.Scalar(np.int64)}}))

            def _split_generators(self, dl_manager):
                return {{"train": self._generate_examples()}}

            def _generate_examples(self):
                for i, image in enumerate(images):
                    buf = io.BytesIO()  # PIL encodes, so TFDS needs no TF to encode.
                    Image.fromarray(image).save(buf, format="PNG")
                    yield i, {{"image": buf.getvalue(), "label": i}}

        CmjaxTinyImages(data_dir={str(tmp_path)!r}, file_format="array_record"
                        ).download_and_prepare()

        # The training side knows only the name and data_dir (the builder is unregistered).
        src = data.tfds_source("cmjax_tiny_images", "train", data_dir={str(tmp_path)!r})
        for i in range(len(src)):
            r = src[i]
            np.testing.assert_array_equal(r["image"], images[r["label"]])
        loader = data.make_train_loader(src, global_batch_size=4, image_size=8, seed=0,
                                        num_epochs=1, shard_by_host=False)
        batches = list(loader)
        print(json.dumps({{"len": len(src), "shapes": [list(b["image"].shape) for b in batches],
                          "labels": sorted(int(i) for b in batches for i in b["label"]),
                          # Where TF is installed, this says the path never imported it.
                          "tf_imported": "tensorflow" in sys.modules}}))
    """)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["len"] == 12
    assert result["shapes"] == [[4, 8, 8, 3]] * 3
    assert result["labels"] == list(range(12))
    assert not result["tf_imported"]


# --------------------------------------------------------------------------------------------
# Host-local -> global batch on a 4-device mesh.


def test_to_global_batch_on_four_cpu_devices():
    out = _run_python("""
        import jax
        import numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from cmjax import data

        assert jax.device_count() == 4, jax.devices()
        images = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
        src = data.NumpySource(images, labels=np.arange(32))
        loader = data.make_train_loader(src, global_batch_size=8, image_size=8, seed=0)
        local = next(iter(loader))
        mesh = jax.make_mesh((4,), ("data",))
        sharding = NamedSharding(mesh, P("data"))
        batch = data.to_global_batch(local, sharding)
        img, lab = batch["image"], batch["label"]
        assert isinstance(img, jax.Array) and img.shape == (8, 8, 8, 3), img.shape
        assert img.dtype == np.float32 and lab.shape == (8,)
        assert img.sharding == sharding and lab.sharding == sharding
        shards = sorted(img.addressable_shards, key=lambda s: s.index[0].start)
        assert len(shards) == 4 and {s.device for s in shards} == set(jax.devices())
        for k, s in enumerate(shards):
            assert s.data.shape == (2, 8, 8, 3)
            np.testing.assert_array_equal(np.asarray(s.data), local["image"][2 * k:2 * k + 2])
        np.testing.assert_array_equal(np.asarray(lab), local["label"])
        print("OK")
    """, env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert out.strip().splitlines()[-1] == "OK"
