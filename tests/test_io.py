"""capray.io without Ray: naming, safe decode of hostile files, atomic writes, discovery, manifest, plan."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capray.io import manifest
from capray.io.images import BadImage, decode_image, encode_png
from capray.io.naming import identity_problem, output_stems, safe_name
from capray.io.storage import get_fs, inside, overlaps, redact, write_bytes_atomic

RNG = np.random.default_rng(0)


def png_bytes(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def rgb(h=20, w=30) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width×height, with a tiny (wrong) IDAT: only the header matters."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 10))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


# -- naming --------------------------------------------------------------------------------------

def test_safe_names_are_unique_and_only_change_unsafe_names():
    originals = ["alice", "a b", "a_b", "a?b", "Zoë", "José García", "x" * 300, "ünï cödé",
                 "A.B-c_d"]
    safe = [safe_name(n) for n in originals]
    assert len(set(safe)) == len(originals)
    assert safe_name("alice") == "alice" and safe_name("A.B-c_d") == "A.B-c_d" and safe_name("Zoë") == "Zoë"
    for original, s in zip(originals, safe):
        assert "/" not in s and " " not in s and not s.startswith(".") and len(s) <= 120 + 1 + 16
        assert safe_name(original) == s  # stable


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".", ".hidden", "a\\b", "bad\x00name", "tab\tname", "", "  "])
def test_path_tricks_are_rejected(name):
    assert identity_problem(name) is not None


def test_reserved_output_entries_are_never_identity_folders():
    for name in ["manifest", "Manifest", "run.json", "metrics.prom"]:
        assert identity_problem(name) is None
        assert safe_name(name).startswith(name + "-")


def test_ordinary_names_are_accepted():
    for name in ["alice", "bob smith", "Zoë", "名前", "o'neil"]:
        assert identity_problem(name) is None


def test_output_stems_disambiguate_collisions_only():
    stems = output_stems(["/x/a.jpg", "/x/a.png", "/x/b.png", "/y/A.jpeg", "/x/c d.png"])
    assert len(set(s.lower() for s in stems)) == 5
    assert stems[2] == "b"
    assert stems[0].startswith("a-") and stems[1].startswith("a-") and stems[3].startswith("A-")
    assert stems == output_stems(["/x/a.jpg", "/x/a.png", "/x/b.png", "/y/A.jpeg", "/x/c d.png"])


# -- decode ---------------------------------------------------------------------------------------

def decode(data: bytes, **kw):
    return decode_image(data, max_pixels=kw.pop("max_pixels", 10_000_000), **kw)


def test_png_roundtrip_is_exact_and_encoding_deterministic():
    arr = rgb()
    out = decode(png_bytes(arr))
    assert np.array_equal(out.rgb, arr) and out.alpha is None
    assert encode_png(arr) == encode_png(arr.copy())
    assert np.array_equal(np.array(Image.open(io.BytesIO(encode_png(arr)))), arr)


@pytest.mark.parametrize("data,needle", [
    (b"", "empty file"),
    (b"hello, I am not an image\n" * 10, "not a recognised image"),
    (png_bytes(rgb(64, 64))[:300], "decode"),
    (bomb_png(50_000, 50_000), "decompression"),  # Pillow's own hard limit
    (bomb_png(5_000, 5_000), "max_image_pixels"),  # our configured limit, checked before decoding
    (png_bytes(rgb(4, 40)), "too small"),
], ids=["empty", "text", "truncated", "bomb-pillow", "bomb-config", "tiny"])
def test_bad_files_raise_clear_errors(data, needle):
    with pytest.raises(BadImage, match=needle):
        decode(data)


def _saved(fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb(32, 32)).save(buf, format=fmt, **save)
    return buf.getvalue()


def test_only_photo_formats_are_decoded_and_others_are_refused_by_name_before_any_decoder(monkeypatch):
    """JPEG/PNG/WebP/TIFF/BMP decode; GIF, PPM, ICO, PSD-like headers are refused naming their format,
    and no other plugin's opener runs (even on a file that would decode)."""
    from PIL import GifImagePlugin

    from capray.io.images import UnsupportedFormat, photo_formats

    for fmt in ("JPEG", "PNG", "WEBP", "TIFF", "BMP"):
        assert fmt in photo_formats()
        assert decode(_saved(fmt)).rgb.shape == (32, 32, 3), fmt
    opened = []
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_open", lambda self: opened.append(1))
    for fmt in ("GIF", "PPM", "ICO"):
        with pytest.raises(UnsupportedFormat, match=f"{fmt} files are not accepted"):
            decode(_saved(fmt))
    with pytest.raises(UnsupportedFormat, match="PSD"):
        decode(b"8BPS\x00\x01" + b"\x00" * 40)  # a Photoshop header: its parser never runs
    assert opened == []


def test_cmyk_grayscale_16bit_palette_alpha_handling():
    arr = rgb()
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, format="JPEG", quality=95)
    cmyk = decode(buf.getvalue())
    assert cmyk.rgb.shape == (20, 30, 3) and "CMYK converted to RGB" in cmyk.notes

    gray = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    g = decode(png_bytes(gray))
    assert np.array_equal(g.rgb, np.repeat(gray[..., None], 3, axis=2))

    deep = RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    d = decode(buf.getvalue())
    expected = np.clip(np.rint(deep.astype(np.float64) * 255 / 65535), 0, 255).astype(np.uint8)
    assert np.array_equal(d.rgb[..., 0], expected), "16-bit must be scaled, not clipped"

    rgba = np.dstack([arr, RNG.integers(0, 256, (20, 30), dtype=np.uint8)])
    a = decode(png_bytes(rgba))
    assert np.array_equal(a.rgb, arr) and np.array_equal(a.alpha, rgba[..., 3])
    assert np.array_equal(np.array(Image.open(io.BytesIO(encode_png(a.rgb, a.alpha)))), rgba)

    pal = Image.fromarray(arr).convert("P")
    p = decode(png_bytes(np.array(pal.convert("RGB"))))
    assert p.rgb.shape == (20, 30, 3)


def test_exif_orientation_is_applied():
    arr = rgb(20, 40)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif.tobytes())
    out = decode(buf.getvalue())
    assert out.rgb.shape == (40, 20, 3)
    assert np.array_equal(out.rgb, np.rot90(arr, k=-1))


# -- storage ----------------------------------------------------------------------------------------

def test_atomic_write_never_leaves_partial_file(tmp_path, monkeypatch):
    fs, path = get_fs(str(tmp_path / "d" / "x.png"))
    write_bytes_atomic(fs, path, b"first")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_bytes_atomic(fs, path, b"second-and-longer")
    assert (tmp_path / "d" / "x.png").read_bytes() == b"first"
    assert os.listdir(tmp_path / "d") == ["x.png"]


def test_overlap_rules(tmp_path):
    assert overlaps(str(tmp_path), str(tmp_path / "out"))
    assert overlaps(str(tmp_path / "in"), str(tmp_path))
    assert not overlaps(str(tmp_path / "in"), str(tmp_path / "in2"))
    assert overlaps("s3://b/photos", "s3://b/photos/out") and not overlaps("s3://b/photos", "s3://b/photos-out")
    assert inside(str(tmp_path / "a" / "x.png"), str(tmp_path / "a")) and not inside("s3://b/a/x", str(tmp_path))


def test_redact_hides_secrets():
    r = redact({"key": "AK", "secret": "S", "endpoint_url": "http://x",
                "client_kwargs": {"aws_session_token": "T"}})
    assert r == {"key": "***", "secret": "***", "endpoint_url": "http://x",
                 "client_kwargs": {"aws_session_token": "***"}}


def test_the_written_config_masks_both_workloads_storage_secrets():
    """run.json and results.json write `redacted_config`: neither the library's nor the job store's keys."""
    import json

    from capray.config import load_config
    from capray.io.storage import redacted_config

    cfg = load_config(overrides={"batch": {"storage_options": {"secret": "B-SECRET", "endpoint_url": "http://s3"}},
                                 "serve": {"store_options": {"key": "S-KEY"}}})
    text = json.dumps(redacted_config(cfg))
    assert "B-SECRET" not in text and "S-KEY" not in text and "http://s3" in text
    assert cfg.serve.store_options["key"] == "S-KEY"  # the live config keeps them


# -- discovery ---------------------------------------------------------------------------------------

def test_folder_discovery(tmp_path):
    from capray.io.discover import iter_identity_names, list_photos

    (tmp_path / "bob").mkdir()
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "2.png").write_bytes(b"xx")
    (tmp_path / "alice" / "1.png").write_bytes(b"x")
    (tmp_path / "alice" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "alice" / "nested").mkdir()
    (tmp_path / "README.txt").write_text("x")
    (tmp_path / ".git").mkdir()
    fs, root = get_fs(str(tmp_path))
    pages = list(iter_identity_names(fs, root))
    assert sorted(n for names, _ in pages for n in names) == ["alice", "bob"]
    assert [os.path.basename(u) for _, ignored in pages for u in ignored] == ["README.txt"]
    alice = list_photos(fs, root, "alice")
    assert [os.path.basename(u) for u in alice.uris] == ["1.png", "2.png"]
    assert [p.size for p in alice.photos] == [1, 2] and all(p.version for p in alice.photos)
    assert [os.path.basename(u) for u in alice.ignored] == ["nested"]
    assert list_photos(fs, root, "bob").photos == []


def test_root_listing_streams_in_pages(tmp_path, monkeypatch):
    from capray.io import discover as disc

    monkeypatch.setattr(disc, "PAGE_SIZE", 3)
    for i in range(7):
        (tmp_path / f"id{i}").mkdir()
    fs, root = get_fs(str(tmp_path))
    pages = [names for names, _ in disc.iter_identity_names(fs, root)]
    assert [len(p) for p in pages] == [3, 3, 1] and sorted(sum(pages, [])) == [f"id{i}" for i in range(7)]


def test_fingerprint_changes_exactly_when_the_input_does():
    from capray.io.discover import Photo, fingerprint

    base = [Photo("/a/1.png", 10, "t1"), Photo("/a/2.png", 20, "t2")]
    assert fingerprint(base) == fingerprint(list(reversed(base)))  # order of listing does not matter
    for changed in ([*base, Photo("/a/3.png", 5, "t3")], base[:1], [base[0], Photo("/a/2.png", 21, "t2")],
                    [base[0], Photo("/a/2.png", 20, "t9")]):
        assert fingerprint(changed) != fingerprint(base)


def write_manifest(path, rows, fmt):
    if fmt == "csv":
        path.write_text("identity,uri\n" + "".join(f"{r['identity']},{r['uri']}\n" for r in rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # groups span row groups


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_groups(tmp_path, fmt):
    from capray.io.discover import iter_catalog_groups

    rows = [{"identity": "a", "uri": "/abs/1.png"}, {"identity": "b", "uri": "p/2.png"},
            {"identity": "b", "uri": "p/1.png"}, {"identity": "b", "uri": "p/1.png"},
            {"identity": "c", "uri": "s3://bucket/c.png"}]
    path = tmp_path / f"m.{fmt}"
    write_manifest(path, rows, fmt)
    fs, p = get_fs(str(path))
    groups = list(iter_catalog_groups(fs, p))
    assert [(g.identity, g.uris) for g in groups] == [
        ("a", ["/abs/1.png"]), ("b", [str(tmp_path / "p/1.png"), str(tmp_path / "p/2.png")]),
        ("c", ["s3://bucket/c.png"])]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_unsorted_manifest_is_refused_not_misgrouped(tmp_path, fmt):
    from capray.io.discover import iter_catalog_groups

    rows = [{"identity": "a", "uri": "/1.png"}, {"identity": "b", "uri": "/2.png"}, {"identity": "a", "uri": "/3.png"}]
    path = tmp_path / f"m.{fmt}"
    write_manifest(path, rows, fmt)
    fs, p = get_fs(str(path))
    with pytest.raises(ValueError, match=r"not sorted by identity: row 3 has 'a' after 'b'"):
        next(iter_catalog_groups(fs, p))


def test_manifest_without_required_columns_is_refused(tmp_path):
    from capray.io.discover import iter_catalog_groups

    (tmp_path / "m.csv").write_text("person,path\na,b\n")
    fs, p = get_fs(str(tmp_path / "m.csv"))
    with pytest.raises(ValueError, match="identity"):
        list(iter_catalog_groups(fs, p))


def test_manifest_glob_names_every_part(tmp_path):
    from capray.io.discover import catalog_files

    for name in ("part-1.csv", "part-0.csv", "other.txt"):
        (tmp_path / name).write_text("identity,uri\n")
    fs, p = get_fs(str(tmp_path / "part-*.csv"))
    assert [os.path.basename(f) for f in catalog_files(fs, p)] == ["part-0.csv", "part-1.csv"]


# -- manifest ----------------------------------------------------------------------------------------

def row(identity, status="ok", finished="2026-01-01T00:00:00.000001", **kw):
    return manifest.ManifestRow(identity=identity, safe_name=identity, status=status, finished_at=finished,
                                method="aspl", config_hash="h", model_id="tiny", seed=0, cap_enabled=True, **kw)


def test_batched_records_read_as_one_row_per_identity_the_latest(tmp_path):
    out = str(tmp_path)
    manifest.write_records(out, "run1", [row("a", "failed", error="x", failure_class="transient"), row("b")], None)
    manifest.write_records(out, "run2", [row("a", finished="2026-01-02T00:00:00.000001")], None)
    files = sorted(p.name for p in (tmp_path / "manifest").iterdir() if p.suffix == ".parquet")
    assert len(files) == 2 and all(manifest.rows_in(f) in (1, 2) for f in files)
    table = manifest.read_manifest(out)
    assert table.schema == manifest.SCHEMA
    assert {r["identity"]: r["status"] for r in table.to_pylist()} == {"a": "ok", "b": "ok"}
    # the same commit retried overwrites its own file
    manifest.write_records(out, "run2", [row("a", finished="2026-01-02T00:00:00.000001")], None)
    assert len([p for p in (tmp_path / "manifest").iterdir() if p.suffix == ".parquet"]) == 2


def test_state_decides_what_is_done(tmp_path):
    out = str(tmp_path)
    assert manifest.read_state(out, "a", None) is None
    published = row("a", input_fingerprint="f1", published_stamps=["s"], published_uris=["u"])
    manifest.write_state(out, "a", manifest.state_of(published), None)
    state = manifest.read_state(out, "a", None)
    assert state.is_done("f1") and not state.is_done("f2") and state.published == [("s", "u")]
    failed = manifest.state_of(row("b", "failed", input_fingerprint="f1", failure_class="input"))
    transient = manifest.state_of(row("c", "failed", input_fingerprint="f1", failure_class="transient"))
    assert failed.is_done("f1") and not failed.is_done("f2") and not transient.is_done("f1")
    # quarantine: K transient failures in a row with the same input skip it, unless asked to retry
    tired = manifest.state_of(row("d", "failed", input_fingerprint="f1", failure_class="transient",
                                  transient_failures=3))
    assert tired.verdict("f1", 3) == "quarantined" and tired.verdict("f1", 3, retry_quarantined=True) is None
    assert tired.verdict("f2", 3) is None and transient.verdict("f1", 3) is None
    assert state.verdict("f1", 3) == "skipped_ok" and failed.verdict("f1", 3) == "skipped_input"
    manifest.write_records(out, "run", [row("a")], None)
    assert pq.read_table(tmp_path / "manifest").num_rows == 1  # readers skip the `_state` folder


# The manifest columns users rely on (architecture contract), written out independently of the models.
CONTRACT_COLUMNS = {
    "identity": pa.string(), "status": pa.string(), "error": pa.string(), "input_uris": pa.list_(pa.string()),
    "output_uris": pa.list_(pa.string()), "method": pa.string(), "cap_enabled": pa.bool_(),
    "lambda_schedule": pa.list_(pa.float64()), "loss_trajectory": pa.list_(pa.float64()),
    "linf_255": pa.list_(pa.float64()), "psnr": pa.list_(pa.float64()), "ssim": pa.list_(pa.float64()),
    "seconds": pa.float64(), "config_hash": pa.string(), "model_id": pa.string(), "seed": pa.int64(),
    "capray_version": pa.string(),
}


def test_the_manifest_has_the_contract_columns_with_their_types(tmp_path):
    """The per-step arrays moved to `_steps/`; `read_manifest(steps=True)` is their compatibility path."""
    both = pa.unify_schemas([manifest.SCHEMA, manifest.STEPS_SCHEMA])
    assert {name: both.field(name).type for name in CONTRACT_COLUMNS} == CONTRACT_COLUMNS
    assert manifest.SCHEMA.names[:4] == ["identity", "safe_name", "status", "error"]
    assert not set(manifest.STEP_FIELDS) & set(manifest.SCHEMA.names)  # the main table stays lean
    manifest.write_records(str(tmp_path), "run", [row("a", lambda_schedule=[None, 2.0], loss_trajectory=[1.0, 0.5])],
                           None)
    full = manifest.read_manifest(str(tmp_path), steps=True)
    assert {name: full.schema.field(name).type for name in CONTRACT_COLUMNS} == CONTRACT_COLUMNS
    assert full.column("lambda_schedule").to_pylist() == [[None, 2.0]]
    assert pq.read_table(tmp_path / "manifest").num_rows == 1  # readers of the folder see the main table only


def test_every_record_field_is_declared_once_and_reaches_the_manifest_and_serve():
    """ProtectionRecord declares the record; the manifest row and Serve's result extend it, never re-declare."""
    from capray.attack.api import ProtectionRecord
    from capray.batch.rows import SUMMARY_SCHEMA
    from capray.serve.schemas import JobResult

    record_fields = set(ProtectionRecord.model_fields)
    for extension in (manifest.ManifestRow, JobResult):
        assert not record_fields & set(extension.__annotations__), extension  # own fields only
        assert record_fields <= set(extension.model_fields)
    assert record_fields <= set(manifest.SCHEMA.names) | set(manifest.STEPS_SCHEMA.names)
    shared = [n for n in SUMMARY_SCHEMA.names if n in manifest.SCHEMA.names]
    assert all(SUMMARY_SCHEMA.field(n).type == manifest.SCHEMA.field(n).type for n in shared) and len(shared) == 9


def test_a_record_round_trips_through_a_commit_file(tmp_path):
    from capray.attack.api import ProtectionRecord

    record = ProtectionRecord(identity="x y", method="aspl", config_hash="h", model_id="tiny", seed=3, cap_enabled=True,
                              lambda_schedule=[None, 4.0], linf_255=[3.0, 2.0], psnr=[None, 41.5], notes=["n"])
    r = manifest.ManifestRow(**record.model_dump(), safe_name="x_y", status="ok",
                             input_uris=["a.png", "b.png"], input_fingerprint="f", removed_output_uris=["o.png"])
    manifest.write_records(str(tmp_path), "run", [r], None)
    (back,) = manifest.read_manifest(str(tmp_path), steps=True).to_pylist()
    assert manifest.ManifestRow.model_validate(back) == r


def test_empty_output_has_empty_manifest(tmp_path):
    assert manifest.read_manifest(str(tmp_path)).num_rows == 0


# -- plan (usage errors before any work) ------------------------------------------------------------------

def test_plan_refuses_overlap_and_config_change(tmp_path, smoke_config):
    from capray.batch.plan import UsageError, make_plan, write_run_file

    src = tmp_path / "in"
    (src / "alice").mkdir(parents=True)
    (src / "alice" / "1.png").write_bytes(png_bytes(rgb()))
    with pytest.raises(UsageError, match="overlaps"):
        make_plan(str(src), str(src / "out"), smoke_config())
    with pytest.raises(UsageError, match="overlaps"):
        make_plan(str(src / "alice"), str(src), smoke_config())
    assert not (src / "out").exists()
    manifest_csv = src / "m.csv"
    manifest_csv.write_text(f"identity,uri\nalice,{src}/alice/1.png\n")
    with pytest.raises(UsageError, match="inside OUTPUT"):
        make_plan(str(manifest_csv), str(src), smoke_config())
    plan = make_plan(str(src), str(tmp_path / "out"), smoke_config())
    assert (plan.kind, plan.resuming) == ("folder", False)
    write_run_file(plan, smoke_config())
    with pytest.raises(UsageError, match="same config"):
        make_plan(str(src), str(tmp_path / "out"), smoke_config(seed=7))


def test_group_problems_are_input_failures(tmp_path):
    from capray.batch.stages.check import group_problem
    from capray.io.discover import Photo

    out = str(tmp_path / "out")
    photos = [Photo(f"/{i}.png") for i in range(5)]
    assert "path separator" in group_problem("../evil", photos[:1], 4, out)
    assert "no photos" in group_problem("none", [], 4, out)
    assert "max_photos_per_identity=4" in group_problem("many", photos, 4, out)
    assert "inside OUTPUT" in group_problem("loop", [Photo(f"{out}/loop/1.png")], 4, out)
    assert group_problem("ok", photos[:1], 4, out) is None


def test_cli_usage_errors_exit_2_before_any_work(tmp_path, capsys):
    import argparse

    from capray.batch import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "a" / "1.png").write_bytes(png_bytes(rgb()))
    cases = [
        [str(src), str(src / "out")],  # output inside input
        [str(tmp_path / "missing"), str(tmp_path / "o1")],  # no such input
        [str(src), str(tmp_path / "o2"), "--set", "attack.eps=-1"],  # invalid config
        [str(src), str(tmp_path / "o3"), "--set", "nonsense"],  # malformed --set
        [str(src), str(tmp_path / "o4"), "--set", "batch.no_such_knob=1"],  # unknown key
    ]
    for argv in cases:
        assert command.run(parser.parse_args([*argv, "--model", "tiny"])) == command.EXIT_USAGE, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], "a refused run wrote something"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([str(src), str(tmp_path / "o5"), "--method", "nope"])
    assert exc.value.code == 2
