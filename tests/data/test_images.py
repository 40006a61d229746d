"""Decoding: every image mode converts correctly; every kind of bad file is a BadSample."""

import io

import numpy as np
import pytest
from PIL import Image

from vlzoo.data.images import BadSample, decode, open_image, resize


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_rgb_png_round_trips_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = decode(_encode(Image.fromarray(pixels)))
    assert out.shape == (3, 5, 7)
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), pixels)


def test_grayscale_and_palette_become_rgb():
    gray = Image.fromarray(np.full((4, 4), 77, dtype=np.uint8), mode="L")
    assert decode(_encode(gray)).unique().tolist() == [77]
    palette = Image.new("P", (4, 4))
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    out = decode(_encode(palette))
    assert out[:, 0, 0].tolist() == [10, 20, 30]


def test_transparent_pixels_are_composited_on_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[1, 0] = (0, 0, 255, 128)  # half blue over white
    out = decode(_encode(Image.fromarray(rgba, mode="RGBA"))).permute(1, 2, 0)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0, 2] == 255 and 120 <= out[1, 0, 0] <= 135
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    out = decode(_encode(palette, transparency=0)).permute(1, 2, 0)  # index 0 transparent
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [255, 0, 0]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode(_encode(cmyk, "JPEG", quality=95)).float().mean(dim=(1, 2))
    assert out[0] > 200 and out[1] < 60 and out[2] < 60


def test_sixteen_bit_images_are_scaled_not_clipped():
    values = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    image = Image.fromarray(values)  # mode I;16
    out = decode(_encode(image))[0]
    assert out.tolist() == [[0, 128], [255, 1]]


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (6, 3), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    data = _encode(image, "JPEG", exif=exif.tobytes())
    assert decode(data).shape == (3, 6, 3)


@pytest.mark.parametrize("make, reason", [
    (lambda tmp: tmp / "nope.png", "missing image file"),
    (lambda tmp: _write(tmp / "empty.png", b""), "empty image"),
    (lambda tmp: _write(tmp / "junk.png", b"this is not an image at all"), "not a decodable image"),
    (lambda tmp: _write(tmp / "cut.jpg", _encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:300]),
     "corrupt or truncated"),
])
def test_bad_files_raise_bad_sample(tmp_path, make, reason):
    with pytest.raises(BadSample, match=reason):
        decode(make(tmp_path))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_decompression_bomb_is_refused_before_decoding():
    big = _encode(Image.new("L", (4000, 4000)))
    with pytest.raises(BadSample, match="image too large: 4000x4000"):
        open_image(big, max_pixels=1_000_000)
    assert decode(big, size=8, max_pixels=20_000_000).shape == (3, 8, 8)


def test_resize_modes():
    image = Image.new("RGB", (40, 20))
    assert resize(image, 10, "shortest").size == (10, 10)
    assert resize(image, 10, "squash").size == (10, 10)
    wide = Image.fromarray(np.concatenate([np.zeros((20, 10, 3)), np.full((20, 20, 3), 255),
                                           np.zeros((20, 10, 3))], axis=1).astype(np.uint8))
    assert np.asarray(resize(wide, 10, "shortest")).min() > 200  # centre crop keeps the white middle
    assert np.asarray(resize(wide, 10, "squash"))[:, 0].max() < 50  # squash keeps the black sides
    with pytest.raises(ValueError, match="resize_mode"):
        resize(image, 10, "stretch")
