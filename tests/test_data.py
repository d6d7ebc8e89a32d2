import numpy as np
import pytest
from PIL import Image

from edgestar.data.images import (Preprocessing, calibration_inputs, evaluation_set, load_array, load_rgb,
                                  preprocess_image, read_batches, save_nhwc, scan_image_folder)
from edgestar.errors import DataError, InputError


def _save(path, img, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode,fmt", [("L", "png"), ("LA", "png"), ("RGBA", "png"), ("P", "png"),
                                      ("CMYK", "jpeg"), ("1", "png"), ("RGB", "webp")])
def test_modes_become_rgb(tmp_path, mode, fmt):
    img = Image.new("RGB", (20, 10), (200, 100, 50)).convert(mode)
    path = _save(tmp_path / f"x.{fmt}", img)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 3)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * 756)
    path = _save(tmp_path / "p.png", img, transparency=0)
    px = np.asarray(load_rgb(path))
    assert px.shape == (8, 8, 3) and tuple(px[0, 0]) == (10, 20, 30)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = np.full((6, 6), 32768, dtype=np.uint16)
    path = _save(tmp_path / "g16.png", Image.fromarray(arr))
    assert Image.open(path).mode.startswith("I")
    px = np.asarray(load_rgb(path))
    assert px.shape == (6, 6, 3) and abs(int(px[0, 0, 0]) - 128) <= 1  # mid-grey, not white


def test_truncated_image_is_named(tmp_path):
    path = _save(tmp_path / "cut.jpg", Image.new("RGB", (64, 64), (1, 2, 3)))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="cut.jpg"):
        load_rgb(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("hello")
    with pytest.raises(DataError, match="cannot read image .*fake.png"):
        load_rgb(path)


def test_preprocess_resize_and_center_crop():
    img = Image.new("RGB", (300, 200), (255, 0, 0))
    pre = Preprocessing(224)
    x = preprocess_image(img, pre)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    expected_red = (1.0 - pre.mean[0]) / pre.std[0]
    assert np.allclose(x[0], expected_red, atol=1e-5)


def test_preprocess_small_images_upscaled():
    x = preprocess_image(Image.new("RGB", (32, 32)), Preprocessing(64, crop_pct=1.0))
    assert x.shape == (3, 64, 64)


def test_scan_image_folder(image_folder):
    folder = scan_image_folder(image_folder)
    assert folder.classes == ["a", "b"] and len(folder) == 6
    assert [label for _, label in folder.samples] == [0, 0, 0, 1, 1, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        scan_image_folder(tmp_path / "empty")


def test_calibration_from_folder_and_npy(image_folder, tmp_path):
    pre = Preprocessing(32, crop_pct=1.0)
    x, info = calibration_inputs(str(image_folder), pre, samples=4)
    assert x.shape == (4, 3, 32, 32) and info["count"] == 4
    raw = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "raw.npy", raw)
    x2, info2 = calibration_inputs(str(tmp_path / "raw.npy"), pre, samples=None)
    assert x2.shape == (5, 3, 32, 32) and info2["kind"] == "npy"
    np.save(tmp_path / "pre.npy", x2)
    x3, _ = calibration_inputs(str(tmp_path / "pre.npy"), pre, samples=3)
    assert x3.shape == (3, 3, 32, 32)


def test_bad_arrays(tmp_path):
    pre = Preprocessing(32)
    np.save(tmp_path / "wrong.npy", np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(DataError, match="16x16 images; the model takes 32x32"):
        load_array(tmp_path / "wrong.npy", pre)
    np.save(tmp_path / "odd.npy", np.zeros((2, 7), np.float32))
    with pytest.raises(DataError, match="expected uint8"):
        load_array(tmp_path / "odd.npy", pre)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read array"):
        load_array(tmp_path / "junk.npy", pre)


def test_empty_calibration_folder(tmp_path):
    (tmp_path / "calib").mkdir()
    with pytest.raises(DataError, match="contains no image files"):
        calibration_inputs(str(tmp_path / "calib"), Preprocessing(32), samples=10)


def test_demo_set_is_shipped():
    folder = evaluation_set("demo")
    assert len(folder.classes) == 10 and len(folder) == 1000
    x, info = calibration_inputs("demo", Preprocessing(32, crop_pct=1.0), samples=20)
    assert x.shape == (20, 3, 32, 32) and info["count"] == 20


def test_eval_samples_subset_is_deterministic():
    a = evaluation_set("demo", samples=50, seed=1).samples
    b = evaluation_set("demo", samples=50, seed=1).samples
    assert a == b and len({label for _, label in a}) > 5
    with pytest.raises(InputError):
        evaluation_set("demo", samples=0)


def test_nhwc_file_streams_back_in_batches(tmp_path):
    x = np.random.default_rng(0).standard_normal((7, 3, 5, 4)).astype(np.float32)
    save_nhwc(tmp_path / "c.npy", x, chunk=3)
    assert np.array_equal(np.load(tmp_path / "c.npy"), x.transpose(0, 2, 3, 1))
    parts = list(read_batches(tmp_path / "c.npy", 2))
    assert [len(p) for p in parts] == [2, 2, 2, 1]
    assert np.array_equal(np.concatenate(parts), x.transpose(0, 2, 3, 1))
