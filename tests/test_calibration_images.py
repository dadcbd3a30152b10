"""Calibration images: a folder of small pictures written here, made into the model's input the way a preset
or explicit options say (geometry, scaling, channel order, layout, labels)."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pfp_onnx.calibration_images import calibration_set, save_npz
from pfp_onnx.data import read_npz, validate
from pfp_onnx.errors import DataError, OptionError
from test_cli import run_cli

Image = pytest.importorskip("PIL.Image")

RED_GREEN = (16, 8)  # width, height: left half red, right half green (no resampling at size 8)


def image_model(dims: list, *, nhwc: bool = False, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """One input 'image' of `dims` feeding a 1x1 Conv (through a Transpose when NHWC, a Cast when integer)."""
    channels = dims[3] if nhwc else dims[1]
    nodes, current = [], "image"
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [current], ["floats"], to=TensorProto.FLOAT))
        current = "floats"
    if nhwc:
        nodes.append(helper.make_node("Transpose", [current], ["nchw"], perm=[0, 3, 1, 2]))
        current = "nchw"
    nodes.append(helper.make_node("Conv", [current, "weight"], ["features"]))
    weight = numpy_helper.from_array(np.ones((4, channels, 1, 1), np.float32), "weight")
    output = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4, "h", "w"])
    graph = helper.make_graph(nodes, "images", [helper.make_tensor_value_info("image", dtype, dims)], [output],
                              [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_image(path, size, colour=None, pixels=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels is None:
        pixels = np.zeros((size[1], size[0], 3), np.uint8)
        pixels[:] = colour
    Image.fromarray(pixels).save(path)
    return path


def red_green(path):
    pixels = np.zeros((RED_GREEN[1], RED_GREEN[0], 3), np.uint8)
    pixels[:, :8] = (255, 0, 0)
    pixels[:, 8:] = (0, 255, 0)
    return write_image(path, RED_GREEN, pixels=pixels)


def test_crop_keeps_the_centre_in_nchw_rgb(tmp_path):
    red_green(tmp_path / "a.png")
    made = calibration_set(tmp_path, image_model(["N", 3, 8, 8]))
    points = made.arrays["image"]
    assert points.shape == (1, 3, 8, 8) and points.dtype == np.float32 and list(made.arrays) == ["image"]
    # the centre 8 of 16 columns: 4 red, then 4 green
    np.testing.assert_array_equal(points[0, 0], np.tile([1, 1, 1, 1, 0, 0, 0, 0], (8, 1)))
    np.testing.assert_array_equal(points[0, 1], np.tile([0, 0, 0, 0, 1, 1, 1, 1], (8, 1)))
    assert not points[0, 2].any()
    assert "centre crop 8x8, pixels scaled to 0–1, RGB" in made.notes[0]


def test_bgr_and_nhwc(tmp_path):
    red_green(tmp_path / "a.png")
    made = calibration_set(tmp_path, image_model(["N", 8, 8, 3], nhwc=True), channels="BGR", pixel_range=255)
    points = made.arrays["image"]
    assert points.shape == (1, 8, 8, 3) and "(NHWC)" in made.notes[0]
    np.testing.assert_array_equal(points[0, :, :4], np.broadcast_to([0, 0, 255], (8, 4, 3)))  # red, as B,G,R
    np.testing.assert_array_equal(points[0, :, 4:], np.broadcast_to([0, 255, 0], (8, 4, 3)))


def test_letterbox_pads_the_short_side_evenly(tmp_path):
    write_image(tmp_path / "wide.png", (16, 8), (255, 255, 255))
    made = calibration_set(tmp_path, image_model(["N", 3, 8, 8]), preset="yolo")
    points = made.arrays["image"][0]
    grey = np.float32(114 / 255)
    np.testing.assert_allclose(points[:, :2], grey)  # 16x8 fitted into 8x8 is 8x4, centred: 2 rows above
    np.testing.assert_allclose(points[:, 2:6], 1.0)
    np.testing.assert_allclose(points[:, 6:], grey)  # and 2 below
    assert "letterboxed into 8x8 (padding 114)" in made.notes[0]


def test_imagenet_preset_normalises(tmp_path):
    write_image(tmp_path / "photo.jpg", (20, 12), (255, 0, 128))
    made = calibration_set(tmp_path, image_model(["N", 3, 8, 8]), preset="imagenet")
    expected = (np.array([255, 0, 128]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(made.arrays["image"][0].mean(axis=(1, 2)), expected, atol=0.03)  # JPEG
    assert "short side resized to 9, centre crop 8x8" in made.notes[0]  # 8 / 0.875, as 256 for 224


def test_grey_models_get_one_channel_and_raw_pixels_keep_their_dtype(tmp_path):
    write_image(tmp_path / "a.png", (8, 8), (200, 200, 200))
    grey = calibration_set(tmp_path, image_model(["N", 1, 8, 8]))
    assert grey.arrays["image"].shape == (1, 1, 8, 8) and ", grey" in grey.notes[0]
    raw = image_model(["N", 8, 8, 3], nhwc=True, dtype=TensorProto.UINT8)
    made = calibration_set(tmp_path, raw, pixel_range=255)
    assert made.arrays["image"].dtype == np.uint8 and (made.arrays["image"] == 200).all()
    with pytest.raises(OptionError, match="raw pixels"):
        calibration_set(tmp_path, raw, preset="imagenet")


def test_labels_from_sub_folders(tmp_path):
    for name, colour in (("dog", (0, 0, 255)), ("cat", (255, 0, 0))):
        for index in range(2):
            write_image(tmp_path / "named" / name / f"{index}.png", (8, 8), colour)
            write_image(tmp_path / "numbered" / ("7" if name == "dog" else "3") / f"{index}.png", (8, 8), colour)
    named = calibration_set(tmp_path / "named", image_model(["N", 3, 8, 8]), labels=True)
    assert named.arrays["labels"].tolist() == [0, 0, 1, 1] and named.classes == ("cat", "dog")
    assert named.arrays["labels"].dtype == np.int64
    assert (named.arrays["image"][:2, 0] == 1).all() and (named.arrays["image"][2:, 2] == 1).all()  # red cats
    assert "0 cat, 1 dog" in named.notes[1]
    numbered = calibration_set(tmp_path / "numbered", image_model(["N", 3, 8, 8]), labels=True)
    assert numbered.arrays["labels"].tolist() == [3, 3, 7, 7] and "are the class ids" in numbered.notes[1]
    write_image(tmp_path / "named" / "loose.png", (8, 8), (0, 0, 0))
    with pytest.raises(DataError, match="sub-folder"):
        calibration_set(tmp_path / "named", image_model(["N", 3, 8, 8]), labels=True)


def test_dynamic_size_needs_an_explicit_size(tmp_path):
    write_image(tmp_path / "a.png", (20, 10), (10, 20, 30))
    model = image_model(["N", 3, "H", "W"])
    with pytest.raises(OptionError, match="--size"):
        calibration_set(tmp_path, model)
    assert calibration_set(tmp_path, model, size=(6, 10)).arrays["image"].shape == (1, 3, 6, 10)
    with pytest.raises(OptionError, match="does not fit"):
        calibration_set(tmp_path, image_model(["N", 3, 8, 8]), size=(6, 10))


def test_unreadable_files_are_skipped_with_a_note_and_a_limit_samples(tmp_path):
    for index in range(5):
        write_image(tmp_path / f"{index}.png", (8, 8), (index, 0, 0))
    (tmp_path / "broken.jpg").write_bytes(b"not a picture")
    made = calibration_set(tmp_path, image_model(["N", 3, 8, 8]))
    assert made.count == 5 and any("skipped 1 file" in note and "broken.jpg" in note for note in made.notes)
    assert calibration_set(tmp_path, image_model(["N", 3, 8, 8]), limit=2, seed=1).count <= 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No image files"):
        calibration_set(tmp_path / "empty", image_model(["N", 3, 8, 8]))


def test_too_few_images_for_the_bound_is_a_warning(tmp_path):
    write_image(tmp_path / "a.png", (8, 8), (1, 2, 3))
    made = calibration_set(tmp_path, image_model(["N", 3, 8, 8]))
    assert made.recommended_points and made.recommended_points > 1
    assert len(made.warnings) == 1 and f"about {made.recommended_points} points" in made.warnings[0]


def test_saved_set_is_what_compress_reads(tmp_path):
    write_image(tmp_path / "images" / "0" / "a.png", (8, 8), (1, 2, 3))
    model = image_model(["N", 3, 8, 8])
    made = calibration_set(tmp_path / "images", model, labels=True)
    save_npz(made, tmp_path / "calib")  # kept as named: numpy would add .npz
    data = validate(read_npz(tmp_path / "calib"), model)
    assert data.count == 1 and data.labels.tolist() == [0]


def test_missing_pillow_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(OptionError, match=r"pip install 'pfp-onnx\[images\]'"):
        calibration_set(tmp_path, image_model(["N", 3, 8, 8]))


def test_calib_command(tmp_path):
    for name in ("cat", "dog"):
        write_image(tmp_path / "images" / name / "a.png", (12, 8), (5, 6, 7))
    model, output = tmp_path / "model.onnx", tmp_path / "calib.npz"
    onnx.save(image_model(["N", 3, "H", "W"]), str(model))
    done = run_cli("calib", tmp_path / "images", "--model", model, "-o", output, "--labels", "--preset",
                   "imagenet", "--size", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {output}\n"
    assert "note: 2 images → 'image' float32 [2, 3, 8, 8] (NCHW)" in done.stderr
    assert "warning: PFP's bound asks for about" in done.stderr
    with np.load(output) as saved:
        assert saved["image"].shape == (2, 3, 8, 8) and saved["labels"].tolist() == [0, 1]
    refused = run_cli("calib", tmp_path / "images", "--model", model, "-o", output)
    assert refused.returncode == 2 and "--size" in refused.stderr and refused.stderr.startswith("Error: ")
