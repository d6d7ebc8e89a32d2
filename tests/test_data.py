import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from privileges import ran_without_override

from edgestar.data.images import (Preprocessing, calibration_inputs, evaluation_set, list_images, load_array,
                                  load_rgb, preprocess_image, read_batches, save_nhwc, scan_image_folder)
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


# --------------------------------------------------------------------------- evaluation with a label file

def _flat_folder(root, names):
    """Tiny PNGs with the given file names directly in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (i * 40 % 256, 0, 0)).save(root / name, format="PNG")
    return root


def _one_line_error(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_label_file_with_class_names(tmp_path):
    root = _flat_folder(tmp_path / "val", ["b.png", "a 1.png", "c.png"])
    (tmp_path / "labels.txt").write_text("a 1.png dog\n./b.png cat\nc.png dog\n")
    folder = evaluation_set(str(root), labels=tmp_path / "labels.txt")
    assert folder.classes == ["cat", "dog"]  # sorted by name, as for class folders
    assert [(p.name, label) for p, label in folder.samples] == [("a 1.png", 1), ("b.png", 0), ("c.png", 1)]
    assert folder.labels_source == "label file: file name and class name per line"
    assert not folder.indexed_labels and folder.label_file == tmp_path / "labels.txt"


def test_label_file_with_class_indices_uses_them_as_given(tmp_path):
    root = _flat_folder(tmp_path / "val", ["x.png", "y.png"])
    (tmp_path / "labels.txt").write_text("x.png 4\ny.png 0\n")
    folder = evaluation_set(str(root), labels=tmp_path / "labels.txt")
    assert folder.classes == ["0", "1", "2", "3", "4"]
    assert [label for _, label in folder.samples] == [4, 0]
    assert folder.labels_source == "label file: file name and class index per line"
    assert folder.indexed_labels


def test_label_file_one_index_per_line_follows_sorted_file_names(tmp_path):
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (3, 1, 2)]
    root = tmp_path / "val"
    root.mkdir()
    for name in names:
        Image.new("RGB", (8, 8)).save(root / name, format="JPEG")
    (tmp_path / "gt.txt").write_text("7\n0\n2\n")
    folder = evaluation_set(str(root), labels=tmp_path / "gt.txt")
    assert [(p.name[-7:], label) for p, label in folder.samples] == [
        ("01.JPEG", 7), ("02.JPEG", 0), ("03.JPEG", 2)]
    assert folder.classes == [str(i) for i in range(8)]
    assert folder.labels_source == "label file: one class index per line, images in sorted file-name order"
    assert len(evaluation_set(str(root), labels=tmp_path / "gt.txt", samples=2)) == 2


def test_label_file_tolerates_bom_crlf_comments_and_blank_lines(tmp_path):
    root = _flat_folder(tmp_path / "val", ["a.png", "b.png"])
    text = "\ufeff# file class\r\n\r\na.png 1\r\n   \r\nb.png 0\r\n"
    (tmp_path / "labels.txt").write_bytes(text.encode())
    folder = evaluation_set(str(root), labels=tmp_path / "labels.txt")
    assert [label for _, label in folder.samples] == [1, 0] and folder.notes == []


@pytest.mark.parametrize("text,expected", [
    ("a.png cat\nb.png cat\nzzz.png dog\n", r"names 1 file\(s\) that are not images in .*: zzz.png"),
    ("a.png cat\n", r"1 image\(s\) in .* have no label in .*labels.txt: b.png"),
    ("a.png cat\nb.png\n", r"line 2: 'b.png' has one field"),
    ("0\ncat\n", r"line 2: 'cat' is not a class index"),
    ("0\n-1\n", r"line 2: class index -1 is negative"),
    ("a.png 1\nb.png -3\n", r"line 2: class index -3 is negative"),
    ("", r"holds no labels"),
    ("# only a comment\n\n", r"holds no labels"),
    ("0\n1\n2\n", r"has 3 labels but .* has 2 images"),
    ("a.png 1\nb.png cat\n", r"mixes class indices \(line 1\) and class names \(line 2\)"),
    ("a.png 1\nb.png 2\na.png 1\n", r"labels a.png twice \(lines 1 and 3\)"),
])
def test_label_file_errors_are_one_line(tmp_path, text, expected):
    root = _flat_folder(tmp_path / "val", ["a.png", "b.png"])
    (tmp_path / "labels.txt").write_text(text)
    with pytest.raises(DataError, match=expected) as exc_info:
        evaluation_set(str(root), labels=tmp_path / "labels.txt")
    _one_line_error(exc_info)


def test_label_file_that_is_missing_or_not_text(tmp_path):
    root = _flat_folder(tmp_path / "val", ["a.png"])
    with pytest.raises(DataError, match="label file .*nope.txt does not exist"):
        evaluation_set(str(root), labels=tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"a.png \xff\xfe\n")
    with pytest.raises(DataError, match="is not UTF-8 text"):
        evaluation_set(str(root), labels=tmp_path / "bin.txt")


def test_label_file_with_class_folders_is_refused(image_folder, tmp_path):
    (tmp_path / "labels.txt").write_text("0\n")
    expected = "has class sub-folders with images \\(a, b\\) and a label file"
    with pytest.raises(DataError, match=expected) as exc_info:
        evaluation_set(str(image_folder), labels=tmp_path / "labels.txt")
    _one_line_error(exc_info)


def test_flat_folder_without_label_file_says_to_give_one(tmp_path):
    root = _flat_folder(tmp_path / "val", ["a.png", "b.png"])
    with pytest.raises(DataError, match="no class sub-folders .* holds 2 images directly: .*label file"):
        evaluation_set(str(root))


def test_indices_that_never_use_class_0_get_a_note(tmp_path):
    root = _flat_folder(tmp_path / "val", ["a.png", "b.png"])
    (tmp_path / "gt.txt").write_text("1\n1000\n")  # ILSVRC2012 devkit IDs are 1..1000
    folder = evaluation_set(str(root), labels=tmp_path / "gt.txt")
    assert len(folder.classes) == 1001
    assert len(folder.notes) == 1 and "never uses class 0" in folder.notes[0]


def test_class_folders_report_their_labels_source(image_folder):
    folder = evaluation_set(str(image_folder))
    assert folder.labels_source == "class folders" and not folder.indexed_labels and folder.notes == []


# --------------------------------------------------------------------------- calibration arrays

def test_float64_array_is_refused_with_what_to_do(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    np.save(tmp_path / "f64.npy", x)
    with pytest.raises(DataError, match=r"f64.npy is float64; .*x.astype\(np.float32\)") as exc_info:
        calibration_inputs(str(tmp_path / "f64.npy"), Preprocessing(8), samples=None)
    _one_line_error(exc_info)


@pytest.mark.parametrize("dtype,shape,shown", [(np.float64, (4, 3, 8, 8), "0.0"),
                                               (np.float32, (4, 3, 8, 8), "0.0"),
                                               (np.uint8, (4, 8, 8, 3), "0")])
def test_constant_array_is_refused(tmp_path, dtype, shape, shown):
    np.save(tmp_path / "zeros.npy", np.zeros(shape, dtype))
    with pytest.raises(DataError, match=rf"calibration array .*zeros.npy is constant \(all {shown}\): "
                                        "it carries no ranges"):
        calibration_inputs(str(tmp_path / "zeros.npy"), Preprocessing(8), samples=None)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_array_is_refused(tmp_path, bad):
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    x[1, 2, 3, 4] = bad
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(DataError, match=r"bad.npy contains 1 NaN or infinite value"):
        load_array(tmp_path / "bad.npy", Preprocessing(8))


def test_unnormalized_float_arrays_get_a_note(tmp_path):
    pre = Preprocessing(8)
    rng = np.random.default_rng(0)
    cases = {"unit.npy": (rng.random((3, 3, 8, 8)),
                          "likely pixels scaled to \\[0, 1\\] but not normalized"),
             "raw.npy": (rng.random((3, 3, 8, 8)) * 255, "likely raw 0..255 pixels stored as float"),
             "good.npy": (rng.uniform(-2.0, 2.2, (3, 3, 8, 8)), None)}
    for name, (x, expected) in cases.items():
        np.save(tmp_path / name, x.astype(np.float32))
        _, info = calibration_inputs(str(tmp_path / name), pre, samples=3)
        if expected is None:
            assert info["notes"] == []
        else:
            assert len(info["notes"]) == 1 and re.search(expected, info["notes"][0]), info["notes"]


def test_load_array_warns_when_no_notes_list_is_given(tmp_path):
    np.save(tmp_path / "unit.npy", np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32))
    with pytest.warns(UserWarning, match="not normalized"):
        load_array(tmp_path / "unit.npy", Preprocessing(8))


def test_more_bad_array_files(tmp_path):
    pre = Preprocessing(8)
    with open(tmp_path / "both.npy", "wb") as f:  # np.savez would add .npz to a file name
        np.savez(f, a=np.zeros(3))
    with pytest.raises(DataError, match="is an .npz archive"):
        load_array(tmp_path / "both.npy", pre)
    np.save(tmp_path / "nhwc.npy", np.ones((2, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="looks channels-last"):
        load_array(tmp_path / "nhwc.npy", pre)
    np.save(tmp_path / "none.npy", np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="holds no images"):
        load_array(tmp_path / "none.npy", pre)


def test_calibration_records_requested_and_notes_shortfall(image_folder, tmp_path):
    pre = Preprocessing(8)
    small = tmp_path / "small"
    for i in range(2):
        (small / "c").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 100, 50, 50)).save(small / "c" / f"{i}.png")
    x, info = calibration_inputs(str(small), pre, samples=300)
    assert len(x) == 2 and info["count"] == 2 and info["requested"] == 300
    assert info["notes"] == ["only 2 calibration images (300 asked for): "
                             "INT8 ranges from so few images are unreliable"]
    _, info = calibration_inputs(str(image_folder), pre, samples=4)
    assert info["requested"] == 4 and info["count"] == 4 and info["notes"] == []


# --------------------------------------------------------------------------- robust image decoding

def _png_bytes(width, height, bit_depth, color_type, rows: bytes) -> bytes:
    """A minimal PNG by hand: Pillow cannot write 16-bit RGB, and a bomb needs only a header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_zero_byte_image_is_named(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="cannot read image .*empty.jpg") as exc_info:
        load_rgb(tmp_path / "empty.jpg")
    _one_line_error(exc_info)


def test_16bit_rgb_png(tmp_path):
    row = b"\x00" + struct.pack(">HHH", 65535, 32768, 0) * 4  # filter byte, then 4 pixels
    (tmp_path / "rgb16.png").write_bytes(_png_bytes(4, 2, 16, 2, row * 2))
    px = np.asarray(load_rgb(tmp_path / "rgb16.png"))
    assert px.shape == (2, 4, 3) and tuple(px[0, 0]) == (255, 128, 0)


def test_cmyk_jpeg_keeps_its_colours(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    r, g, b = np.asarray(load_rgb(tmp_path / "cmyk.jpg"))[8, 8].astype(int)
    assert r > 200 and g < 50 and b < 50


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_animation_gives_its_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / f"anim.{fmt}", save_all=True, append_images=frames[1:], duration=100)
    assert getattr(Image.open(tmp_path / f"anim.{fmt}"), "n_frames", 1) == 2
    r, g, b = np.asarray(load_rgb(tmp_path / f"anim.{fmt}"))[4, 4].astype(int)
    assert r > 200 and b < 50


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers turn it 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    px = np.asarray(load_rgb(tmp_path / "rot.jpg")).astype(int)
    assert px.shape == (20, 10, 3)  # portrait, as viewers show it
    assert px[2, 5, 0] > 200 and px[17, 5, 2] > 200  # red on top, blue below


def test_decompression_bomb_is_a_one_line_error(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    # Only the header claims 100000 x 100000 pixels: Pillow refuses it before decoding.
    (tmp_path / "bomb.png").write_bytes(_png_bytes(100_000, 100_000, 1, 0, b""))
    with pytest.raises(DataError, match="image .*bomb.png is too large to decode safely") as exc_info:
        load_rgb(tmp_path / "bomb.png")
    _one_line_error(exc_info)
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's guard left as it was


def test_image_between_one_and_two_times_the_pixel_limit_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (12, 12)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: Pillow only warns
    with pytest.raises(DataError, match="big.png is too large to decode safely"):
        load_rgb(tmp_path / "big.png")


def test_unreadable_image_and_folder(tmp_path, image_folder, request):
    if ran_without_override(request):  # as root: in a child that file modes stop
        return
    path = _save(tmp_path / "locked.png", Image.new("RGB", (4, 4)))
    path.chmod(0)
    with pytest.raises(DataError, match="cannot read image .*locked.png: Permission denied"):
        load_rgb(path)
    (image_folder / "b").chmod(0)
    try:
        with pytest.raises(DataError, match="cannot read folder .*b: Permission denied"):
            scan_image_folder(image_folder)
    finally:
        (image_folder / "b").chmod(0o755)


def test_symlink_loops_end_and_count_each_image_once(image_folder):
    (image_folder / "a" / "self").symlink_to(image_folder / "a")
    (image_folder / "a" / "up").symlink_to(image_folder)
    (image_folder / "b" / "deeper").mkdir()
    (image_folder / "b" / "deeper" / "back").symlink_to(image_folder / "b")
    folder = scan_image_folder(image_folder)
    assert folder.classes == ["a", "b"]
    assert [label for _, label in folder.samples] == [0, 0, 0, 1, 1, 1]
    assert len(list_images(image_folder)) == 6


def test_symlinked_folders_inside_a_class_are_followed(image_folder, tmp_path):
    _flat_folder(tmp_path / "more", ["m1.png", "m2.png"])
    (image_folder / "a" / "more").symlink_to(tmp_path / "more")
    folder = scan_image_folder(image_folder)
    assert sum(1 for _, label in folder.samples if label == 0) == 5


def test_class_folder_linking_back_to_the_data_set_is_refused(image_folder):
    (image_folder / "loop").symlink_to(image_folder)
    with pytest.raises(DataError, match="class folder loop links to a folder that is already part"):
        scan_image_folder(image_folder)


def test_empty_class_folders_keep_their_index_and_get_a_note(image_folder):
    (image_folder / "a2_empty").mkdir()
    (image_folder / "a3_text").mkdir()
    (image_folder / "a3_text" / "readme.txt").write_text("x")
    folder = scan_image_folder(image_folder)
    assert folder.classes == ["a", "a2_empty", "a3_text", "b"]
    assert [label for _, label in folder.samples] == [0, 0, 0, 3, 3, 3]  # b keeps index 3
    assert len(folder.notes) == 2
    assert "a2_empty (class 1) of the image folder is empty" in folder.notes[0]
    assert "a3_text (class 2) of the image folder holds 1 file(s) but none is an image" in folder.notes[1]


def test_images_outside_class_folders_get_a_note(image_folder):
    _save(image_folder / "stray.png", Image.new("RGB", (4, 4)))
    folder = scan_image_folder(image_folder)
    assert len(folder) == 6 and len(folder.notes) == 1 and "stray.png" in folder.notes[0]


def test_broken_links_to_images_get_a_note(image_folder, tmp_path):
    (image_folder / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    notes = []
    assert len(list_images(image_folder, notes=notes)) == 6
    assert len(notes) == 1 and "1 broken link(s)" in notes[0] and "gone.png" in notes[0]
