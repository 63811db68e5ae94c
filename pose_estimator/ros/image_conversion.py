"""``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` to RGB numpy arrays, and back.

The estimator takes an ``(H, W, 3)`` uint8 RGB array. Camera drivers send
``rgb8``, ``bgr8``, ``mono8``, ``bgra8``, ``rgba8``, 16-bit mono (``mono16``,
``16UC1``), 16-bit colour, or compressed JPEG/PNG. This module turns any of
them into that array:

* with ``cv_bridge`` where it is importable (a full ROS install), and
* with numpy/OpenCV where it is not (the PyPI wheels have no cv_bridge),

giving the same pixels either way: the numpy path follows cv_bridge's rules
(ROS 2 ``cvtColor2``): channel order swapped or alpha dropped, grey replicated
into three channels, and 16 → 8 bit depth scaled by ``255 / 65535`` with
rounding (``convertTo`` semantics). Row padding (``step`` larger than
``width × pixel size``) and big-endian 16-bit data are handled.

Every malformed message raises :class:`ImageConversionError` (a ``ValueError``)
whose text says what is wrong, e.g. ``"image step 960 is smaller than width 320
x 3 bytes/pixel"``; nothing here crashes on bad input.

The functions read message fields by name (``height``, ``width``,
``encoding``, ``is_bigendian``, ``step``, ``data``; ``format`` for compressed
images), so they work on rclpy messages and on ``rosbags`` messages alike, and
the module imports without ROS.
"""

from __future__ import annotations

import array
from typing import Any

import numpy as np

__all__ = [
    "ImageConversionError",
    "SUPPORTED_ENCODINGS",
    "MIN_IMAGE_SIZE",
    "image_msg_to_numpy",
    "image_msg_to_rgb8",
    "compressed_msg_to_rgb8",
    "msg_to_rgb8",
    "numpy_to_image_msg",
    "rgb8_to_compressed_msg",
    "cv_bridge_available",
]

#: Images smaller than this (either side, px) are refused: no arm fits in them.
MIN_IMAGE_SIZE = 8


class ImageConversionError(ValueError):
    """An image message that cannot be turned into an RGB array (the text says why)."""


# encoding -> (numpy dtype, channels, colour layout). Layout: 'rgb', 'bgr',
# 'rgba', 'bgra', 'mono' (convertible to RGB) or None (generic OpenCV type:
# readable, not a colour image; cv_bridge refuses to convert those too, except
# 8UC3 / 8UC4 / 8UC1 which it treats like bgr8 / bgra8 / mono8).
_ENCODINGS: dict[str, tuple[np.dtype, int, str | None]] = {
    "rgb8": (np.dtype(np.uint8), 3, "rgb"),
    "bgr8": (np.dtype(np.uint8), 3, "bgr"),
    "rgba8": (np.dtype(np.uint8), 4, "rgba"),
    "bgra8": (np.dtype(np.uint8), 4, "bgra"),
    "mono8": (np.dtype(np.uint8), 1, "mono"),
    "rgb16": (np.dtype(np.uint16), 3, "rgb"),
    "bgr16": (np.dtype(np.uint16), 3, "bgr"),
    "rgba16": (np.dtype(np.uint16), 4, "rgba"),
    "bgra16": (np.dtype(np.uint16), 4, "bgra"),
    "mono16": (np.dtype(np.uint16), 1, "mono"),
    "8UC1": (np.dtype(np.uint8), 1, "mono"),
    "8UC3": (np.dtype(np.uint8), 3, "bgr"),
    "8UC4": (np.dtype(np.uint8), 4, "bgra"),
    "16UC1": (np.dtype(np.uint16), 1, "mono"),
    "16UC3": (np.dtype(np.uint16), 3, "bgr"),
    "16UC4": (np.dtype(np.uint16), 4, "bgra"),
}
# Bayer patterns: one 8- or 16-bit channel, demosaiced with OpenCV. The codes
# are OpenCV's naming (which reads the pattern shifted by one): the same
# mapping cv_bridge uses.
_BAYER = {
    "bayer_rggb8": ("COLOR_BayerBG2RGB", np.uint8),
    "bayer_bggr8": ("COLOR_BayerRG2RGB", np.uint8),
    "bayer_gbrg8": ("COLOR_BayerGR2RGB", np.uint8),
    "bayer_grbg8": ("COLOR_BayerGB2RGB", np.uint8),
    "bayer_rggb16": ("COLOR_BayerBG2RGB", np.uint16),
    "bayer_bggr16": ("COLOR_BayerRG2RGB", np.uint16),
    "bayer_gbrg16": ("COLOR_BayerGR2RGB", np.uint16),
    "bayer_grbg16": ("COLOR_BayerGB2RGB", np.uint16),
}
#: Encodings :func:`image_msg_to_rgb8` accepts.
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS) + tuple(_BAYER) + ("yuv422", "uyvy", "yuv422_yuy2", "yuyv")


def _encoding_info(encoding: str) -> tuple[np.dtype, int, str | None]:
    if encoding in _ENCODINGS:
        return _ENCODINGS[encoding]
    if encoding in _BAYER:
        return np.dtype(_BAYER[encoding][1]), 1, "bayer"
    if encoding in ("yuv422", "uyvy", "yuv422_yuy2", "yuyv"):
        return np.dtype(np.uint8), 2, "yuv"
    raise ImageConversionError(
        f"unsupported image encoding '{encoding}' (supported: {', '.join(SUPPORTED_ENCODINGS)})")


def _data_buffer(data: Any) -> memoryview | np.ndarray:
    """A zero-copy byte view of ``msg.data`` (array.array, bytes, list or numpy)."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype != np.uint8 else data.reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview, array.array)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8)  # list of ints (rare; slow but correct)


def image_msg_to_numpy(msg: Any) -> np.ndarray:
    """The pixels of a ``sensor_msgs/Image`` in its own encoding (cv_bridge's ``passthrough``).

    Returns ``(H, W)`` for one channel, ``(H, W, C)`` otherwise, dtype as the
    encoding says (uint8/uint16), native byte order, padding removed. The array
    may share memory with ``msg.data``; copy it before writing to it.

    Raises:
        ImageConversionError: unknown encoding, empty image, ``step`` smaller than
            a row, or ``data`` shorter than ``step × height``.
    """
    encoding = str(msg.encoding)
    dtype, channels, _ = _encoding_info(encoding)
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ImageConversionError(f"empty image ({w}x{h}, encoding '{encoding}')")
    row = w * channels * dtype.itemsize
    if step < row:
        raise ImageConversionError(
            f"image step {step} is smaller than width {w} x {channels * dtype.itemsize} bytes/pixel = {row} "
            f"(encoding '{encoding}')")
    buf = _data_buffer(msg.data)
    if buf.size < step * (h - 1) + row:
        raise ImageConversionError(
            f"image data has {buf.size} bytes but {w}x{h} '{encoding}' with step {step} needs {step * h}")
    if step % dtype.itemsize:
        raise ImageConversionError(f"image step {step} is not a multiple of the {dtype.itemsize}-byte sample size")
    rows = np.lib.stride_tricks.as_strided(buf, shape=(h, row), strides=(step, 1))
    if dtype.itemsize > 1:
        wire = dtype.newbyteorder(">" if msg.is_bigendian else "<")
        # (h, row) bytes with row stride `step` -> (h, w*channels) samples in native order.
        pixels = np.ascontiguousarray(rows).view(wire)
        if wire != dtype:
            pixels = pixels.astype(dtype)
    else:
        pixels = rows
    shape = (h, w) if channels == 1 else (h, w, channels)
    return pixels.reshape(shape)


def _scale_to_8bit(a: np.ndarray) -> np.ndarray:
    """cv_bridge's 16 → 8 bit rule: ``saturate(round(v * 255 / 65535))``."""
    if a.dtype == np.uint8:
        return a
    # float64 keeps the product exact enough that rounding matches OpenCV's convertTo.
    return np.clip(np.rint(a.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)


def _numpy_to_rgb8(msg: Any) -> np.ndarray:
    encoding = str(msg.encoding)
    _, _, layout = _encoding_info(encoding)
    a = image_msg_to_numpy(msg)
    if layout == "rgb":
        out = a
    elif layout == "bgr":
        out = a[..., ::-1]
    elif layout == "rgba":
        out = a[..., :3]
    elif layout == "bgra":
        out = a[..., 2::-1]
    elif layout == "mono":
        out = np.repeat(a[..., None], 3, axis=2)
    elif layout == "bayer":
        import cv2

        out = cv2.cvtColor(np.ascontiguousarray(a), getattr(cv2, _BAYER[encoding][0]))
    elif layout == "yuv":
        import cv2

        code = cv2.COLOR_YUV2RGB_UYVY if encoding in ("yuv422", "uyvy") else cv2.COLOR_YUV2RGB_YUYV
        out = cv2.cvtColor(np.ascontiguousarray(a), code)
    else:  # pragma: no cover - every table entry has a layout
        raise ImageConversionError(f"encoding '{encoding}' is not a colour image")
    # The depth change comes after the colour conversion, as in cv_bridge.
    return np.ascontiguousarray(_scale_to_8bit(out))


_bridge = None
_bridge_checked = False


def cv_bridge_available() -> bool:
    """True when ``cv_bridge`` imports (a full ROS install)."""
    return _get_bridge() is not None


def _get_bridge():
    global _bridge, _bridge_checked
    if not _bridge_checked:
        _bridge_checked = True
        try:
            from cv_bridge import CvBridge  # type: ignore[import-not-found]

            _bridge = CvBridge()
        except Exception:  # noqa: BLE001 - absent, or present but broken (ABI): use numpy
            _bridge = None
    return _bridge


def _check_backend(backend: str) -> Any:
    if backend not in ("auto", "numpy", "cv_bridge"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'cv_bridge', got '{backend}'")
    bridge = _get_bridge() if backend != "numpy" else None
    if backend == "cv_bridge" and bridge is None:
        raise ImportError("cv_bridge is not installed (backend='cv_bridge' was requested)")
    return bridge


def _check_size(img: np.ndarray, min_size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h < min_size or w < min_size:
        raise ImageConversionError(f"image is {w}x{h} px; at least {min_size}x{min_size} is needed")
    return img


def image_msg_to_rgb8(msg: Any, backend: str = "auto", min_size: int = MIN_IMAGE_SIZE) -> np.ndarray:
    """A ``sensor_msgs/Image`` as an ``(H, W, 3)`` uint8 RGB array (C-contiguous).

    Args:
        msg: the image message (rclpy or rosbags).
        backend: ``'auto'`` (cv_bridge when importable, else numpy), ``'numpy'`` or ``'cv_bridge'``.
        min_size: smallest accepted width and height in pixels.

    Raises:
        ImageConversionError: the message cannot be converted (the text says why).
    """
    bridge = _check_backend(backend)
    encoding = str(msg.encoding)
    _encoding_info(encoding)  # refuse unknown encodings identically on both paths
    if bridge is not None and encoding in _ENCODINGS:
        image_msg_to_numpy(msg)  # same validation (cv_bridge would raise its own, less clear, errors)
        try:
            out = bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8")
        except Exception as e:  # noqa: BLE001 - CvBridgeError and friends
            raise ImageConversionError(f"cv_bridge could not convert '{encoding}' to rgb8: {e}") from e
        return _check_size(np.ascontiguousarray(out), min_size)
    return _check_size(_numpy_to_rgb8(msg), min_size)


def compressed_msg_to_rgb8(msg: Any, backend: str = "auto", min_size: int = MIN_IMAGE_SIZE) -> np.ndarray:
    """A ``sensor_msgs/CompressedImage`` (JPEG, PNG, ``compressedDepth``) as ``(H, W, 3)`` uint8 RGB.

    Decodes with ``cv2.imdecode`` (what cv_bridge does too). 16-bit PNGs are
    scaled to 8 bit like 16-bit raw images; the 12-byte header of
    ``image_transport``'s ``compressedDepth`` format is skipped.
    """
    import cv2

    bridge = _check_backend(backend)
    fmt = str(getattr(msg, "format", ""))
    buf = _data_buffer(msg.data)
    if "compresseddepth" in fmt.lower().replace(" ", ""):
        buf = buf[12:]  # ConfigHeader {format, depthParam[2]} precedes the PNG
    if buf.size == 0:
        raise ImageConversionError(f"compressed image (format '{fmt}') has no data")
    if bridge is not None and "compresseddepth" not in fmt.lower():
        try:
            out = bridge.compressed_imgmsg_to_cv2(msg, desired_encoding="rgb8")
        except Exception as e:  # noqa: BLE001
            raise ImageConversionError(f"cv_bridge could not decode compressed image '{fmt}': {e}") from e
        return _check_size(np.ascontiguousarray(out), min_size)
    img = cv2.imdecode(np.ascontiguousarray(buf), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageConversionError(f"cannot decode compressed image (format '{fmt}', {buf.size} bytes)")
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageConversionError(f"compressed image decodes to unsupported sample type {img.dtype}")
    if img.ndim == 2:
        out = np.repeat(img[..., None], 3, axis=2)
    elif img.shape[2] == 3:
        out = img[..., ::-1]
    elif img.shape[2] == 4:
        out = img[..., 2::-1]
    else:
        raise ImageConversionError(f"compressed image has {img.shape[2]} channels")
    return _check_size(np.ascontiguousarray(_scale_to_8bit(out)), min_size)


def msg_to_rgb8(msg: Any, backend: str = "auto", min_size: int = MIN_IMAGE_SIZE) -> np.ndarray:
    """Either image message type as ``(H, W, 3)`` uint8 RGB (dispatch on the ``format`` field)."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return compressed_msg_to_rgb8(msg, backend, min_size)
    return image_msg_to_rgb8(msg, backend, min_size)


def numpy_to_image_msg(image: np.ndarray, encoding: str, header: Any = None, msg_type: Any = None) -> Any:
    """An array as a ``sensor_msgs/Image`` (no padding, little-endian).

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` whose dtype and channels match ``encoding``.
        encoding: e.g. ``'rgb8'``, ``'bgr8'``, ``'mono16'``.
        header: copied into the message when given.
        msg_type: the Image class to build (default: rclpy's ``sensor_msgs.msg.Image``).
    """
    dtype, channels, _ = _encoding_info(encoding)
    a = np.asarray(image)
    got_c = 1 if a.ndim == 2 else (a.shape[2] if a.ndim == 3 else -1)
    if a.dtype != dtype or got_c != channels:
        raise ImageConversionError(f"array {a.shape} {a.dtype} does not match encoding '{encoding}' "
                                   f"({channels} channel(s) of {dtype})")
    if msg_type is None:
        from sensor_msgs.msg import Image as msg_type  # noqa: N813
    a = np.ascontiguousarray(a.astype(dtype.newbyteorder("<"), copy=False))
    msg = msg_type()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(a.shape[0]), int(a.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(a.shape[1] * channels * dtype.itemsize)
    # array.array from bytes is one memcpy; assigning a numpy array or a list
    # would make rclpy check every element in Python.
    msg.data = array.array("B", a.tobytes()) if _is_rclpy_msg(msg) else a.reshape(-1).view(np.uint8)
    return msg


def rgb8_to_compressed_msg(rgb: np.ndarray, fmt: str = "jpeg", header: Any = None, quality: int = 90,
                           msg_type: Any = None) -> Any:
    """An RGB array as a ``sensor_msgs/CompressedImage`` (``fmt`` ``'jpeg'`` or ``'png'``)."""
    import cv2

    if msg_type is None:
        from sensor_msgs.msg import CompressedImage as msg_type  # noqa: N813
    bgr = np.ascontiguousarray(np.asarray(rgb)[..., ::-1])
    ext = ".jpg" if fmt in ("jpeg", "jpg") else ".png"
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext == ".jpg" else []
    ok, enc = cv2.imencode(ext, bgr, params)
    if not ok:
        raise ImageConversionError(f"cv2.imencode failed for format '{fmt}'")
    msg = msg_type()
    if header is not None:
        msg.header = header
    msg.format = "jpeg" if ext == ".jpg" else "png"
    msg.data = array.array("B", enc.tobytes()) if _is_rclpy_msg(msg) else enc.reshape(-1)
    return msg


def _is_rclpy_msg(msg: Any) -> bool:
    # rosidl-generated classes have this class attribute; rosbags' dataclasses do not.
    return hasattr(type(msg), "_fields_and_field_types")
