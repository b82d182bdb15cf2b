"""Image decoding and the two image processors, against transformers' own.

The photos are the samples scikit-image ships in its wheel (no network): some as the
files are (JPEG, PNG, GIF), some re-encoded with Pillow (PNG, JPEG, WebP), cropped into a
portrait, a panorama and a tiny image. Each goes through `decode` as bytes, so the whole
path is tested; transformers' processors get the same bytes opened by Pillow, mode and
all, and do their own RGB conversion.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from herd.errors import ImageError
from herd.models.gemma3 import process as gemma3
from herd.models.imageproc import ImageLimits, decode, digest
from herd.models.mllama import process as mllama

skdata = pytest.importorskip("skimage.data", reason="sample photos: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="the reference processors: pip install -e '.[test]'")
from transformers import Gemma3ImageProcessorPil, MllamaImageProcessorPil  # noqa: E402
from transformers.image_utils import PILImageResampling  # noqa: E402
from transformers.models.mllama import image_processing_pil_mllama as hf_geometry  # noqa: E402

DATA = Path(skdata.data_dir)

# The processors as the real models store them (preprocessor_config.json), written out.
GEMMA3 = dict(  # google/gemma-3-4b-it
    size={"height": 896, "width": 896},
    resample=PILImageResampling.BILINEAR,
    do_resize=True,
    do_rescale=True,
    rescale_factor=0.00392156862745098,
    do_normalize=True,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    do_convert_rgb=True,
    do_pan_and_scan=False,
)
MLLAMA = dict(  # meta-llama/Llama-3.2-11B-Vision-Instruct
    size={"height": 560, "width": 560},
    max_image_tiles=4,
    resample=PILImageResampling.BILINEAR,
    do_resize=True,
    do_rescale=True,
    rescale_factor=0.00392156862745098,
    do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
    do_convert_rgb=True,
    do_pad=True,
)


def encode(array: np.ndarray, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **params)
    return out.getvalue()


def file(name: str) -> Callable[[], bytes]:
    return lambda: (DATA / name).read_bytes()


def palette_with_transparency() -> bytes:
    # a palette PNG whose color 0 is transparent: composited onto white like RGBA
    image = Image.fromarray(skdata.coffee()).quantize(64)
    out = io.BytesIO()
    image.save(out, format="PNG", transparency=0)
    return out.getvalue()


def gray_with_alpha() -> bytes:
    gray = skdata.camera()
    alpha = np.tile(np.linspace(0, 255, gray.shape[1]).astype(np.uint8), (gray.shape[0], 1))
    return encode(np.stack([gray, alpha], axis=-1), "PNG")  # LA


def camera_mpo() -> bytes:
    # what many cameras and phones write: a JPEG with more pictures after it (MPO)
    out = io.BytesIO()
    first, second = Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())
    first.save(out, format="MPO", save_all=True, append_images=[second])
    return out.getvalue()


# name -> the bytes of a photo; (width x height) in the comments
PHOTOS: dict[str, Callable[[], bytes]] = {
    "rocket.jpg": file("rocket.jpg"),  # 640x427
    "hubble.jpg": file("hubble_deep_field.jpg"),  # 1000x872
    "retina.jpg": file("retina.jpg"),  # 1411x1411
    "logo.png-rgba": file("logo.png"),  # 500x500
    "horse.png-rgba": file("horse.png"),  # 400x328
    "camera.png-gray": file("camera.png"),  # 512x512
    "text.png-gray": file("text.png"),  # 448x172
    "colorwheel.png": file("color.png"),  # 371x370
    "gif-first-frame": file("no_time_for_that_tiny.gif"),  # 14x25, 24 frames, palette
    "astronaut-png": lambda: encode(skdata.astronaut(), "PNG"),  # 512x512
    "chelsea-jpeg": lambda: encode(skdata.chelsea(), "JPEG", quality=90),  # 451x300
    "coffee-webp": lambda: encode(skdata.coffee(), "WEBP", quality=80),  # 600x400
    "ihc-jpeg": lambda: encode(skdata.immunohistochemistry(), "JPEG"),  # 512x512
    "motorcycle-webp-lossless": lambda: encode(
        skdata.stereo_motorcycle()[0], "WEBP", lossless=True
    ),
    "portrait": lambda: encode(skdata.astronaut()[:, 180:330], "PNG"),  # 150x512
    "tall-portrait": lambda: encode(skdata.retina()[:, 600:800], "JPEG"),  # 200x1411
    "panorama-1x5": lambda: encode(skdata.hubble_deep_field()[300:460, 100:900], "JPEG"),
    "panorama-wide": lambda: encode(skdata.retina()[500:782], "JPEG"),  # 1411x282
    "tiny-7x5": lambda: encode(skdata.chelsea()[100:107, 200:205], "PNG"),  # 5x7
    "one-pixel": lambda: encode(skdata.chelsea()[150:151, 200:201], "PNG"),
    "mpo-camera-jpeg": camera_mpo,  # 451x300, the first of two pictures
    "palette-transparent.png": palette_with_transparency,
    "gray-alpha.png": gray_with_alpha,
}


def reference_image(data: bytes) -> Image.Image:
    """The bytes as a user hands them to transformers: opened by Pillow, not converted."""
    return Image.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def hf_gemma3() -> Gemma3ImageProcessorPil:
    return Gemma3ImageProcessorPil(**GEMMA3)


@pytest.fixture(scope="module")
def hf_mllama() -> MllamaImageProcessorPil:
    return MllamaImageProcessorPil(**MLLAMA)


def test_the_photos_cover_the_cases() -> None:
    # the table has what the processors must get right: sizes, modes, formats
    opened = [reference_image(make()) for make in PHOTOS.values()]
    assert len(opened) >= 10
    assert {im.format for im in opened} == {"JPEG", "MPO", "PNG", "WEBP", "GIF"}
    assert {"RGB", "RGBA", "L", "LA", "P"} <= {im.mode for im in opened}
    ratios = [im.width / im.height for im in opened]
    assert min(ratios) < 1 / 3 and max(ratios) >= 5  # a portrait and a panorama
    assert min(im.width * im.height for im in opened) <= 35  # a tiny one


@pytest.mark.parametrize("name", list(PHOTOS))
def test_gemma3_pixels_equal_transformers(name: str, hf_gemma3: Gemma3ImageProcessorPil) -> None:
    data = PHOTOS[name]()
    ours = gemma3.preprocess(decode(data))
    ref = hf_gemma3(images=reference_image(data), return_tensors="np")["pixel_values"]
    assert ref.shape == (1, 3, 896, 896)
    assert ours.dtype == np.float32 and ours.shape == ref.shape[1:]
    np.testing.assert_allclose(ours, ref[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(PHOTOS))
def test_mllama_tiles_equal_transformers(name: str, hf_mllama: MllamaImageProcessorPil) -> None:
    data = PHOTOS[name]()
    tiles = mllama.preprocess(decode(data))
    ref = hf_mllama(images=[[reference_image(data)]], return_tensors="np")
    assert ref["pixel_values"].shape == (1, 1, 4, 3, 560, 560)
    assert tiles.n_tiles == ref["num_tiles"][0][0]
    assert tiles.aspect_ratio_id == ref["aspect_ratio_ids"][0, 0]
    assert tiles.pixels.dtype == np.float32
    assert tiles.pixels.shape == (tiles.n_tiles, 3, 560, 560)
    pixels, mask = tiles.padded(4)
    np.testing.assert_array_equal(mask, ref["aspect_ratio_mask"][0, 0])
    np.testing.assert_allclose(pixels, ref["pixel_values"][0, 0], rtol=0, atol=1e-6)


def test_mllama_canvases_cover_every_aspect_ratio(hf_mllama: MllamaImageProcessorPil) -> None:
    # the photos above reach a few canvases; a size just under each canvas reaches it
    seen = set()
    for h_tiles, w_tiles in mllama.aspect_ratios(4):
        image = Image.fromarray(skdata.astronaut()).resize((w_tiles * 560 - 40, h_tiles * 560 - 40))
        tiles = mllama.preprocess(image)
        ref = hf_mllama(images=[[image]], return_tensors="np")
        assert tiles.aspect_ratio == (h_tiles, w_tiles)
        assert tiles.aspect_ratio_id == ref["aspect_ratio_ids"][0, 0]
        np.testing.assert_allclose(tiles.padded(4)[0], ref["pixel_values"][0, 0], rtol=0, atol=1e-6)
        seen.add(tiles.aspect_ratio_id)
    assert seen == set(range(1, 9))


SIZES = [
    (h, w)
    for h in (1, 7, 280, 559, 560, 561, 1000, 1120, 1121, 2240, 5000)
    for w in (1, 5, 300, 560, 840, 1119, 1680, 2241, 9000)
]


@pytest.mark.parametrize("max_tiles", [1, 4, 6])
def test_mllama_canvas_and_fit_equal_transformers(max_tiles: int) -> None:
    # the geometry alone, over sizes with ties, exact tile multiples and extremes
    assert mllama.aspect_ratios(max_tiles) == tuple(
        hf_geometry.get_all_supported_aspect_ratios(max_tiles)
    )
    for height, width in SIZES:
        h_tiles, w_tiles = mllama.canvas(height, width, max_tiles, 560)
        ref = hf_geometry.get_optimal_tiled_canvas(height, width, max_tiles, 560)
        assert (h_tiles * 560, w_tiles * 560) == tuple(ref), (height, width)
        fitted = mllama.fit(height, width, *ref, 560)
        assert fitted == hf_geometry.get_image_size_fit_to_canvas(height, width, *ref, 560)


def test_exif_orientation_is_applied() -> None:
    # stored on its side with "rotate 90 clockwise to display" (6): seen upright
    upright = skdata.astronaut()[:, 180:330]  # (512, 150, 3)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(out, "PNG", exif=exif)
    decoded = decode(out.getvalue())
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), upright)


def test_digest_is_sha256_of_the_bytes() -> None:
    empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert digest(b"") == empty
    assert digest(b"a") != digest(b"b")


# --- bad input -------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels and holds a few bytes of them."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD: list[tuple[str, Callable[[], bytes], ImageLimits, str]] = [
    ("text", lambda: b"this is not an image at all", ImageLimits(), "not a JPEG, PNG, WebP or GIF"),
    ("empty", lambda: b"", ImageLimits(), "not a JPEG, PNG, WebP or GIF"),
    ("tiff", file("multipage.tif"), ImageLimits(), "not a JPEG, PNG, WebP or GIF"),
    (
        "truncated-png",
        lambda: truncated(encode(skdata.astronaut(), "PNG")),
        ImageLimits(),
        "PNG image is truncated or corrupt",
    ),
    (
        "truncated-jpeg",
        lambda: truncated((DATA / "rocket.jpg").read_bytes()),
        ImageLimits(),
        "JPEG image is truncated or corrupt",
    ),
    (
        "over-max-bytes",
        lambda: encode(skdata.chelsea(), "PNG"),
        ImageLimits(max_bytes=10_000),
        "over the limit of 10000 bytes",
    ),
    (
        "over-max-pixels",
        lambda: encode(skdata.chelsea()[:20, :30], "PNG"),
        ImageLimits(max_pixels=500),
        "30x20 is 600 pixels, over the limit of 500 pixels",
    ),
    # decompression bombs: headers that claim more pixels than the bytes could ever hold;
    # under Pillow's warning size, over it (a warning Pillow would print), over its error
    ("bomb-9000x9000", lambda: png_header(9000, 9000), ImageLimits(), "over the limit of"),
    ("bomb-10000x10000", lambda: png_header(10_000, 10_000), ImageLimits(), "over the limit"),
    (
        "bomb-100000x100000",
        lambda: png_header(100_000, 100_000),
        ImageLimits(),
        "too many pixels, over the",
    ),
]


@pytest.mark.parametrize(
    ("make", "limits", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_images_raise_image_error(
    make: Callable[[], bytes], limits: ImageLimits, message: str
) -> None:
    data = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ImageError and nothing else: no Pillow warning
        with pytest.raises(ImageError, match=message) as raised:
            decode(data, limits)
    assert str(raised.value).startswith("image: ")


@pytest.mark.parametrize("side", [9000, 10_000, 100_000])
def test_a_bomb_is_refused_before_its_pixels_are_decoded(
    side: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # side x side RGB would take 243 MB to 30 GB: refused from the header, never decoded
    loads: list[Image.Image] = []
    load = ImageFile.ImageFile.load

    def counted(self: ImageFile.ImageFile) -> object:
        loads.append(self)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    with pytest.raises(ImageError, match="pixels"):
        decode(png_header(side, side))
    assert loads == []
    # the counted decoder does run for an image within the limits
    decode(PHOTOS["tiny-7x5"]())
    assert loads


def test_decoded_images_are_rgb_and_loaded() -> None:
    for name in ("camera.png-gray", "logo.png-rgba", "gif-first-frame", "palette-transparent.png"):
        image = decode(PHOTOS[name]())
        assert image.mode == "RGB", name
        assert np.asarray(image).dtype == np.uint8
