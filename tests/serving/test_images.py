"""decode_image: untrusted bytes -> RGB, converting every common mode, refusing bad data clearly."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.images import ImageError, decode_image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


RNG = np.random.RandomState(0)
RGB = Image.fromarray(RNG.randint(0, 255, (24, 36, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "1", "CMYK", "I", "F"])
def test_modes_become_rgb(mode):
    img = RGB.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == RGB.size


def test_rgb_png_is_lossless():
    assert (np.asarray(decode_image(encode(RGB))) == np.asarray(RGB)).all()


def test_rgba_drops_alpha_like_open_clip():
    rgba = RGB.convert("RGBA")
    rgba.putalpha(0)
    assert (np.asarray(decode_image(encode(rgba))) == np.asarray(rgba.convert("RGB"))).all()


def test_16_bit_grayscale_is_rescaled_not_clipped():
    arr = np.array([[0, 257 * 100, 65535, 257 * 7]], dtype=np.uint16)
    out = np.asarray(decode_image(encode(Image.fromarray(arr))))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 100, 255, 7]


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    first = np.asarray(decode_image(data))
    assert first[0, 0, 0] > 200 and first[0, 0, 2] < 50


def test_jpeg_cmyk():
    out = decode_image(encode(RGB.convert("CMYK"), "JPEG", quality=95))
    assert out.mode == "RGB"


@pytest.mark.parametrize(
    "data, kwargs, match",
    [
        (b"", {}, "empty"),
        (b"hello, this is not a picture", {}, "not an image"),
        (encode(RGB)[:60], {}, "truncated|corrupt"),
        (encode(RGB), {"max_bytes": 100}, "over the limit of 100 bytes"),
        (encode(RGB), {"max_pixels": 100}, "24 = 864 pixels, over the limit"),
    ],
    ids=["empty", "text", "truncated", "too-many-bytes", "too-many-pixels"],
)
def test_refusals_name_the_problem(data, kwargs, match):
    with pytest.raises(ImageError, match=match):
        decode_image(data, **kwargs)


def test_only_the_byte_limit_is_too_large():
    with pytest.raises(ImageError) as big:
        decode_image(encode(RGB), max_bytes=10)
    with pytest.raises(ImageError) as bad:
        decode_image(b"nope")
    assert big.value.too_large and not bad.value.too_large


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (8000, 7000)))  # 56 MP in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="56,000,000 pixels"):
        decode_image(bomb)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)
    with pytest.raises(ImageError, match="bytes"):
        decode_image("not bytes")  # type: ignore[arg-type]
