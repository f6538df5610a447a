"""Photos come out as they went in (issue 21): colour profiles, HEIC, the metadata policy, lossless WebP,
symbolic links — the decode/encode layer and the write stage, without Ray (the front doors' round trips
are in test_batch and test_serve_http)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from conftest import FACES
from photo_helpers import display_p3_icc, encode, gray_icc, p3_heic, p3_jpeg, saturated_photo
from PIL import Image, ImageCms, ImageOps

from capray.io.images import WEBP_MAX_SIDE, decode_image, encode_photo

EPS_255 = 6  # the paper's budget, eps = 0.05 in [-1, 1] units
SRGB = ImageCms.createProfile("sRGB")
DATE = 0x0132, 0x8769, 0x9003, 0x9011  # DateTime, Exif IFD, DateTimeOriginal, OffsetTimeOriginal


def decode(data: bytes, **policy):
    return decode_image(data, max_pixels=10**8, **policy)


def perturbed(rgb: np.ndarray, seed: int = 0) -> np.ndarray:
    """`rgb` plus a ±EPS_255 sign pattern, as a protection would change it."""
    signs = np.random.default_rng(seed).choice([-EPS_255, EPS_255], rgb.shape)
    return np.clip(rgb.astype(int) + signs, 0, 255).astype(np.uint8)


def rendered(data: bytes) -> np.ndarray:
    """The colours a colour-managed viewer shows: the file's pixels, upright, through its profile (untagged:
    sRGB)."""
    source = Image.open(io.BytesIO(data))
    icc = source.info.get("icc_profile")
    img = ImageOps.exif_transpose(source).convert("RGB")
    if icc:
        img = ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)), SRGB, outputMode="RGB")
    return np.asarray(img).astype(int)


def exif_of(data: bytes) -> tuple[dict, dict, dict]:
    exif = Image.open(io.BytesIO(data)).getexif()
    return dict(exif), dict(exif.get_ifd(0x8769)), dict(exif.get_ifd(0x8825))


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_a_display_p3_photo_keeps_its_profile_and_its_rendered_colours(fmt):
    """The output carries the input's P3 profile byte for byte, so a viewer renders it as the input within the
    perturbation; written untagged (what capray did before), the same pixels render visibly different."""
    source = p3_jpeg(saturated_photo())
    photo = decode(source)
    assert photo.icc == display_p3_icc() and photo.notes == []
    assert np.array_equal(rendered(encode_photo(photo.rgb, fmt=fmt, icc=photo.icc).data), rendered(source))
    out = encode_photo(perturbed(photo.rgb), fmt=fmt, icc=photo.icc, exif=photo.exif)
    assert out.format == fmt and Image.open(io.BytesIO(out.data)).info["icc_profile"] == display_p3_icc()
    shift = np.abs(rendered(out.data) - rendered(source))  # the perturbation's own size, seen through P3
    assert np.median(shift) <= EPS_255 and shift.mean() <= EPS_255, (np.median(shift), shift.mean())
    untagged = np.abs(rendered(encode_photo(perturbed(photo.rgb), fmt=fmt).data) - rendered(source))
    assert untagged.mean() > 2 * EPS_255 and untagged.mean() > 3 * shift.mean(), (untagged.mean(), shift.mean())


def test_a_heic_photo_decodes_upright_with_its_profile_like_the_same_jpeg():
    """HEIC through pillow-heif: the same upright pixels (orientation applied once) and profile as a JPEG."""
    rgb = saturated_photo(40, 56, seed=3)
    heic, jpeg = decode(p3_heic(rgb, orientation=6)), decode(p3_jpeg(rgb, orientation=6))
    assert heic.rgb.shape == jpeg.rgb.shape == (56, 40, 3)  # rotated 90° clockwise, as displayed
    assert np.abs(heic.rgb.astype(int) - np.rot90(rgb, -1).astype(int)).mean() < 8  # both lossy, same way up
    assert heic.icc == display_p3_icc() and exif_of_block(heic.exif)[1][0x9003] == "2024:05:01 10:00:00"


def exif_of_block(block: bytes | None) -> tuple[dict, dict, dict]:
    exif = Image.Exif()
    if block:
        exif.load(block)
    return dict(exif), dict(exif.get_ifd(0x8769)), dict(exif.get_ifd(0x8825))


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_metadata_policy_keeps_capture_time_strips_location_and_everything_else(fmt):
    source = p3_jpeg(saturated_photo(), orientation=6)
    ifd0, sub, gps = exif_of(source)
    assert gps and 0x010F in ifd0 and 0xA431 in sub and ifd0[0x0112] == 6  # what the camera wrote

    def written(**policy):
        photo = decode(source, **policy)
        return exif_of(encode_photo(photo.rgb, fmt=fmt, icc=photo.icc, exif=photo.exif).data)

    ifd0, sub, gps = written()  # the defaults: capture time kept, location stripped
    assert ifd0 == {0x0132: "2024:05:01 10:00:00", 0x8769: ifd0[0x8769]}  # no make, model or orientation
    assert sub == {0x9003: "2024:05:01 10:00:00", 0x9011: "+02:00"} and gps == {}  # no serial, no GPS
    ifd0, sub, gps = written(keep_location=True)
    assert gps[1] == "N" and [float(v) for v in gps[2]] == [52.0, 31.0, 12.5] and 0x9003 in sub
    assert written(keep_capture_time=False) == ({}, {}, {})
    assert decode(source, keep_capture_time=False).exif is None


def test_grayscale_profiles_are_converted_and_profiles_that_do_not_fit_are_dropped_with_a_note():
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))
    gray = decode(encode(ramp, "PNG", icc_profile=gray_icc(1.0)))
    srgb_of_linear = np.round(255 * ((ramp / 255) ** (1 / 2.4) * 1.055 - 0.055).clip(0)).astype(int)
    assert gray.icc is None and gray.notes == ["GRAY colour profile converted to sRGB"]
    assert np.abs(gray.rgb[..., 1].astype(int)[:, 4:] - srgb_of_linear[:, 4:]).max() <= 2  # linear light → sRGB
    mismatched = decode(encode(saturated_photo(), "PNG", icc_profile=gray_icc(2.2)))
    assert mismatched.icc is None and "GRAY colour profile does not describe this RGB photo" in mismatched.notes[0]
    garbage = decode(encode(saturated_photo(), "PNG", icc_profile=b"not a profile" * 20))
    assert garbage.icc is None and "unreadable colour profile" in garbage.notes[0]


def test_webp_holds_the_same_pixels_as_png_in_fewer_bytes_and_always_the_same_bytes():
    face = decode((FACES / "set_A" / "0003_01.png").read_bytes())
    rgb = perturbed(face.rgb)
    alpha = np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    alpha[:8] = 0  # fully transparent rows keep their RGB values too (`exact`)
    png, webp = encode_photo(rgb, alpha, fmt="png"), encode_photo(rgb, alpha, fmt="webp")
    for out in (png, webp):
        back = np.asarray(Image.open(io.BytesIO(out.data)))
        assert np.array_equal(back[..., :3], rgb) and np.array_equal(back[..., 3], alpha), out.format
    assert webp.data == encode_photo(rgb, alpha, fmt="webp").data and webp.media_type == "image/webp"
    opaque_png, opaque_webp = (len(encode_photo(rgb, fmt=f).data) for f in ("png", "webp"))
    assert opaque_webp < opaque_png, (opaque_webp, opaque_png)  # benchmarks/output_format.py: the figure
    wide = encode_photo(np.zeros((2, WEBP_MAX_SIDE + 1, 3), np.uint8), fmt="webp")
    assert wide.format == "png" and "16383" in wide.note and wide.data.startswith(b"\x89PNG")


def test_the_write_stage_writes_the_format_asked_for_with_each_photos_profile(tmp_path):
    """Stage 5 on its own: output.format, the photo's profile and kept EXIF, and the suffix in the record."""
    from capray.batch.stages.write import write_group
    from capray.io import manifest

    from batch_helpers import config

    photo = decode(p3_jpeg(saturated_photo()))
    h, w = photo.rgb.shape[:2]
    row = {"identity": "alice", "safe": "alice", "uris": ["/in/alice/a.jpg"], "stems": ["a"], "stamps": ["s"],
           "pixels": [photo.rgb.tobytes()], "shapes": [[h, w]], "alphas": [None], "iccs": [photo.icc],
           "exifs": [photo.exif]}
    cfg = config().model_copy(update={"output": config().output.model_copy(update={"format": "webp"})})
    written = manifest.ManifestRow.model_validate_json(write_group(row, cfg, str(tmp_path))["row"])
    assert written.status == "ok" and written.output_uris == [str(tmp_path / "alice" / "a.webp")]
    data = (tmp_path / "alice" / "a.webp").read_bytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), photo.rgb)
    assert Image.open(io.BytesIO(data)).info["icc_profile"] == display_p3_icc() and exif_of(data)[2] == {}


# -- symbolic links -----------------------------------------------------------------------------------------

@pytest.fixture
def linked_library(tmp_path):
    """ROOT/alice: a photo, a link to it, a link to a folder outside ROOT, a broken link; ROOT/bob → outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "alice").mkdir(parents=True)
    outside.mkdir()
    (root / "alice" / "real.png").write_bytes(encode(saturated_photo(), "PNG"))
    (outside / "away.png").write_bytes(encode(saturated_photo(seed=1), "PNG"))
    os.symlink("real.png", root / "alice" / "inside.png")
    os.symlink(outside / "away.png", root / "alice" / "away.png")
    os.symlink(tmp_path / "gone.png", root / "alice" / "broken.png")
    os.symlink(outside, root / "bob")
    return root, outside


def test_links_are_followed_inside_the_allowed_roots_and_named_when_they_lead_out(linked_library):
    import fsspec

    from capray.io.allowlist import allowed_prefixes, broken_link, uri_problem
    from capray.io.discover import iter_folder_groups

    root, outside = linked_library
    groups = {g.identity: [os.path.basename(p.uri) for p in g.photos]
              for g in iter_folder_groups(fsspec.filesystem("file"), str(root))}
    assert groups == {"alice": ["away.png", "broken.png", "inside.png", "real.png"], "bob": ["away.png"]}
    allowed = allowed_prefixes(str(root), [])
    assert uri_problem(str(root / "alice" / "inside.png"), allowed) is None
    refused = uri_problem(str(root / "alice" / "away.png"), allowed)
    assert f"is a symbolic link to '{outside / 'away.png'}'" in refused and "batch.allowed_input_prefixes" in refused
    assert uri_problem(str(root / "alice" / "away.png"), allowed_prefixes(str(root), [str(outside)])) is None
    assert broken_link(str(root / "alice" / "broken.png")).startswith("broken symbolic link")
    assert broken_link(str(root / "alice" / "inside.png")) is None


def test_evaluate_lists_linked_photos_and_folders_and_reads_them_where_protect_would(linked_library):
    from capray.evaluate.files import EvalFiles

    root, outside = linked_library
    files = EvalFiles()
    assert files.list_dirs(str(root)) == ["alice", "bob"]
    assert [os.path.basename(u) for u in files.list_files(str(root / "alice"))] == [
        "away.png", "broken.png", "inside.png", "real.png"]
    assert files.read_photo(str(root / "alice" / "inside.png"), str(root)).shape == (48, 64, 3)
    with pytest.raises(ValueError, match="symbolic link to"):
        files.read_photo(str(root / "alice" / "away.png"), str(root))
    with pytest.raises(ValueError, match="broken symbolic link"):
        files.read_photo(str(root / "alice" / "broken.png"), str(root))
    allowed = EvalFiles(allowed_input_prefixes=(str(outside),))
    assert allowed.read_photo(str(root / "alice" / "away.png"), str(root)).shape == (48, 64, 3)
