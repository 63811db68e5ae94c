"""Image message -> RGB conversion: every encoding the node accepts, and every way a message can be malformed."""

from __future__ import annotations

import array
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from pose_estimator.ros import image_conversion as ic
from pose_estimator.ros.image_conversion import (ImageConversionError, compressed_msg_to_rgb8, image_msg_to_numpy,
                                                 image_msg_to_rgb8, msg_to_rgb8)

H, W = 24, 32


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _msg(a: np.ndarray, encoding: str, big: bool = False, pad: int = 0, data_type=array.array):
    """A duck-typed Image (what rosbags and rclpy both look like to the converter)."""
    a = np.ascontiguousarray(a)
    if big:
        a = a.astype(a.dtype.newbyteorder(">"))
    rows = a.reshape(a.shape[0], -1).view(np.uint8)
    if pad:
        rows = np.concatenate([rows, np.full((rows.shape[0], pad), 77, np.uint8)], 1)
    raw = rows.tobytes()
    data = array.array("B", raw) if data_type is array.array else data_type(raw)
    return SimpleNamespace(height=a.shape[0], width=a.shape[1], encoding=encoding, is_bigendian=int(big),
                           step=rows.shape[1], data=data)


@pytest.mark.parametrize("encoding,make", [
    ("rgb8", lambda rgb: rgb),
    ("bgr8", lambda rgb: rgb[..., ::-1]),
    ("8UC3", lambda rgb: rgb[..., ::-1]),
    ("rgba8", lambda rgb: np.dstack([rgb, np.full((H, W), 9, np.uint8)])),
    ("bgra8", lambda rgb: np.dstack([rgb[..., ::-1], np.full((H, W), 9, np.uint8)])),
])
def test_colour_encodings_give_the_same_rgb_pixels(encoding, make):
    rgb = _rgb()
    out = image_msg_to_rgb8(_msg(make(rgb), encoding), backend="numpy")
    assert out.dtype == np.uint8 and out.shape == (H, W, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
def test_mono8_is_replicated_into_three_channels(encoding):
    g = _rgb()[..., 0]
    out = image_msg_to_rgb8(_msg(g, encoding), backend="numpy")
    np.testing.assert_array_equal(out, np.dstack([g, g, g]))


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("big", [False, True])
def test_16bit_mono_scales_like_cv_bridge(encoding, big):
    # cv_bridge: convertTo(CV_8U, 255/65535), i.e. round half away from zero of v/257.
    v = np.array([[0, 128, 129, 257, 385, 386, 32896, 65534, 65535] + [1000] * (W - 9)] * H, np.uint16)
    out = image_msg_to_rgb8(_msg(v, encoding, big=big), backend="numpy")
    expect = np.array([0, 0, 1, 1, 1, 2, 128, 255, 255], np.uint8)
    np.testing.assert_array_equal(out[0, :9, 0], expect)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    # Same as OpenCV's own convertTo (what cv_bridge runs).
    ref = cv2.convertScaleAbs(v.astype(np.float64) * (255.0 / 65535.0))
    np.testing.assert_array_equal(out[..., 1], ref)


def test_16bit_colour_and_passthrough_keep_depth_and_order():
    rgb16 = np.random.default_rng(1).integers(0, 65536, (H, W, 3), dtype=np.uint16)
    raw = image_msg_to_numpy(_msg(rgb16[..., ::-1], "bgr16", big=True))
    assert raw.dtype == np.uint16 and raw.dtype.isnative
    np.testing.assert_array_equal(raw, rgb16[..., ::-1])
    out = image_msg_to_rgb8(_msg(rgb16, "rgb16"), backend="numpy")
    np.testing.assert_array_equal(out, np.rint(rgb16 * (255 / 65535)).astype(np.uint8))


@pytest.mark.parametrize("data_type", [array.array, bytes, bytearray])
def test_row_padding_is_removed(data_type):
    rgb = _rgb(2)
    m = _msg(rgb, "rgb8", pad=13, data_type=data_type)
    assert m.step == W * 3 + 13
    np.testing.assert_array_equal(image_msg_to_rgb8(m, backend="numpy"), rgb)
    g16 = (rgb[..., 0].astype(np.uint16) * 257)
    np.testing.assert_array_equal(image_msg_to_numpy(_msg(g16, "mono16", pad=6)), g16)


def test_bayer_and_yuv_decode_to_rgb():
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[...] = (200, 100, 50)
    bayer = np.zeros((H, W), np.uint8)  # RGGB mosaic of a flat colour
    bayer[0::2, 0::2], bayer[0::2, 1::2], bayer[1::2, 0::2], bayer[1::2, 1::2] = 200, 100, 100, 50
    out = image_msg_to_rgb8(_msg(bayer, "bayer_rggb8"), backend="numpy")
    np.testing.assert_allclose(out[4:-4, 4:-4].reshape(-1, 3).mean(0), (200, 100, 50), atol=2)
    uyvy = np.full((H, W, 2), 128, np.uint8)
    uyvy[..., 1] = 90  # Y
    out = image_msg_to_rgb8(_msg(uyvy, "yuv422"), backend="numpy")
    assert out.shape == (H, W, 3) and abs(int(out[0, 0, 0]) - int(out[0, 0, 2])) <= 1  # neutral chroma -> grey


def test_compressed_png_is_lossless_and_jpeg_close():
    rgb = _rgb(3)
    png = SimpleNamespace(format="rgb8; png compressed bgr8",
                          data=array.array("B", cv2.imencode(".png", rgb[..., ::-1])[1].tobytes()))
    np.testing.assert_array_equal(compressed_msg_to_rgb8(png, backend="numpy"), rgb)
    smooth = cv2.GaussianBlur(rgb, (0, 0), 3)
    jpg = SimpleNamespace(format="jpeg", data=cv2.imencode(".jpg", smooth[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    out = msg_to_rgb8(jpg, backend="numpy")
    assert np.abs(out.astype(int) - smooth).mean() < 3.0


def test_compressed_16bit_png_and_compressed_depth_header():
    g16 = np.tile(np.arange(W, dtype=np.uint16) * 2000, (H, 1))
    data = cv2.imencode(".png", g16)[1].tobytes()
    out = compressed_msg_to_rgb8(SimpleNamespace(format="png", data=data), backend="numpy")
    np.testing.assert_array_equal(out[..., 1], np.rint(g16 * (255 / 65535)).astype(np.uint8))
    depth = SimpleNamespace(format="16UC1; compressedDepth png", data=bytes(12) + data)
    np.testing.assert_array_equal(compressed_msg_to_rgb8(depth, backend="numpy"), out)


@pytest.mark.parametrize("mutate,match", [
    (lambda m: setattr(m, "encoding", "weird16"), "unsupported image encoding 'weird16'"),
    (lambda m: setattr(m, "step", m.step - 1), "step .* is smaller than width"),
    (lambda m: setattr(m, "data", m.data[:-5]), "image data has .* bytes but"),
    (lambda m: setattr(m, "height", 0), "empty image"),
    (lambda m: (setattr(m, "width", 0), setattr(m, "height", 0), setattr(m, "data", b"")), "empty image"),
    (lambda m: setattr(m, "height", m.height + 1), "image data has"),
])
def test_malformed_image_messages_raise_a_clear_error(mutate, match):
    m = _msg(_rgb(), "rgb8")
    mutate(m)
    with pytest.raises(ImageConversionError, match=match):
        image_msg_to_rgb8(m, backend="numpy")


def test_tiny_and_undecodable_images_are_refused():
    one = _msg(np.zeros((1, 1, 3), np.uint8), "rgb8")
    with pytest.raises(ImageConversionError, match="1x1 px"):
        image_msg_to_rgb8(one, backend="numpy")
    with pytest.raises(ImageConversionError, match="cannot decode"):
        compressed_msg_to_rgb8(SimpleNamespace(format="jpeg", data=b"not a jpeg at all"), backend="numpy")
    with pytest.raises(ImageConversionError, match="no data"):
        compressed_msg_to_rgb8(SimpleNamespace(format="jpeg", data=b""), backend="numpy")
    assert issubclass(ImageConversionError, ValueError)


def test_rclpy_messages_round_trip_fast():
    pytest.importorskip("sensor_msgs.msg")
    from std_msgs.msg import Header

    rgb = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    hdr = Header(frame_id="cam")
    t0 = time.perf_counter()
    msg = ic.numpy_to_image_msg(rgb[..., ::-1], "bgr8", header=hdr)
    out = image_msg_to_rgb8(msg, backend="numpy")
    dt = time.perf_counter() - t0
    np.testing.assert_array_equal(out, rgb)
    assert msg.header.frame_id == "cam" and msg.step == 640 * 3
    assert dt < 0.05, f"640x480 round trip took {dt * 1e3:.1f} ms (expected a few ms)"
    cm = ic.rgb8_to_compressed_msg(rgb, "png")
    np.testing.assert_array_equal(compressed_msg_to_rgb8(cm, backend="numpy"), rgb)
    with pytest.raises(ImageConversionError, match="does not match encoding"):
        ic.numpy_to_image_msg(rgb, "mono8")


def test_rosbags_messages_convert():
    from pose_estimator.sim.bag import typestore

    ts = typestore()
    t = ts.types
    rgb = _rgb(5)
    hdr = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=1, nanosec=2), frame_id="c")
    m = t["sensor_msgs/msg/Image"](header=hdr, height=H, width=W, encoding="bgr8", is_bigendian=0, step=W * 3,
                                   data=np.ascontiguousarray(rgb[..., ::-1]).reshape(-1))
    # Also through a CDR round trip, as the node sees recorded messages.
    m2 = ts.deserialize_cdr(ts.serialize_cdr(m, "sensor_msgs/msg/Image"), "sensor_msgs/msg/Image")
    np.testing.assert_array_equal(image_msg_to_rgb8(m2, backend="numpy"), rgb)


@pytest.mark.skipif(not ic.cv_bridge_available(), reason="cv_bridge is not installed (PyPI ROS wheels have none); "
                    "the numpy path is used and tested above")
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
def test_numpy_path_matches_cv_bridge(encoding):
    rng = np.random.default_rng(6)
    if encoding == "mono16":
        a = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    else:
        c = {"mono8": 1, "rgb8": 3, "bgr8": 3}.get(encoding, 4)
        a = rng.integers(0, 256, (H, W, c) if c > 1 else (H, W), dtype=np.uint8)
    msg = ic.numpy_to_image_msg(a, encoding)
    np.testing.assert_array_equal(image_msg_to_rgb8(msg, backend="numpy"), image_msg_to_rgb8(msg, backend="cv_bridge"))


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="backend must be"):
        image_msg_to_rgb8(_msg(_rgb(), "rgb8"), backend="pil")
    if not ic.cv_bridge_available():
        with pytest.raises(ImportError, match="cv_bridge is not installed"):
            image_msg_to_rgb8(_msg(_rgb(), "rgb8"), backend="cv_bridge")
