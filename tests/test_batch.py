"""`capray protect` end to end on the shared local Ray: a mixed corpus of good and hostile input, resume,
determinism (and equality with the in-process engine), and an actor killed mid-group."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from photo_helpers import display_p3_icc, p3_heic, p3_jpeg, saturated_photo
from PIL import Image

from capray.batch.demo import SAMPLES
from capray.config import load_config
from capray.io.images import decode_image, encode_png
from capray.io.manifest import read_manifest

pytestmark = pytest.mark.ray

CHEAP = {"attack": {"outer_loops": 1, "adv_steps": 2}, "cap": {"start_fraction": 0.5},
         "batch": {"cpus_per_actor": 0.25, "cpus_per_io_task": 0.5, "max_photos_per_identity": 4}}
# (actor and I/O tasks ask for different CPUs, so Ray keeps decode, protect and write as separate operators)
RNG = np.random.default_rng(1)


def cheap_config(**extra):
    from capray.config import deep_merge

    return load_config(preset="smoke", overrides=deep_merge(CHEAP, extra))


def save(path: Path, arr: np.ndarray, fmt: str = "PNG", **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)


def noise(h=40, w=48) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def build_corpus(root: Path, elsewhere: Path | None = None) -> dict[str, str]:
    """Identity folder → expected status. `elsewhere`: a folder outside ROOT holding `allowed/` (in
    batch.allowed_input_prefixes) and `private/` (not), where some photos of ROOT are symbolic links to."""
    for ident in ("astronaut", "chelsea"):
        shutil.copytree(SAMPLES / ident, root / ident)
    save(root / "bob smith" / "1.png", noise())
    save(root / "bob smith" / "2.png", noise(36, 52))
    save(root / "Zoë" / "a.png", noise())
    save(root / "Zoë" / "a.jpg", noise(), "JPEG", quality=95)  # duplicate stem
    save(root / "solo" / "only.png", noise())  # one photo: baseline attack only
    for i in range(5):
        save(root / "crowd" / f"{i}.png", noise(32, 32))  # over max_photos_per_identity=4
    save(root / "broken" / "good.png", noise())
    (root / "broken" / "cut.png").write_bytes(buf_png(noise(64, 64))[:200])
    save(root / "empty" / "good.png", noise())
    (root / "empty" / "zero.png").write_bytes(b"")
    (root / "text" / "notes.png").parent.mkdir(parents=True)
    (root / "text" / "notes.png").write_text("not an image")
    save(root / "text" / "ok.png", noise())
    (root / "nophotos").mkdir()
    # unusual but valid encodings: all protected
    cmyk = Image.fromarray(noise()).convert("CMYK")
    (root / "formats").mkdir()
    cmyk.save(root / "formats" / "cmyk.jpg", format="JPEG", quality=95)
    Image.fromarray(RNG.integers(0, 65536, (40, 44), dtype=np.uint16)).save(root / "formats" / "deep.png")
    save(root / "formats" / "alpha.png", np.dstack([noise(), RNG.integers(0, 256, (40, 48), dtype=np.uint8)]))
    save(root / "bob smith" / "gray.png", RNG.integers(0, 256, (40, 48), dtype=np.uint8))
    rotated = Image.fromarray(noise(30, 60))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(root / "formats" / "rotated.jpg", format="JPEG", exif=exif.tobytes(), quality=95)
    expected = {"astronaut": "ok", "chelsea": "ok", "bob smith": "ok", "Zoë": "ok", "solo": "ok", "formats": "ok",
                "crowd": "failed", "broken": "failed", "empty": "failed", "text": "failed", "nophotos": "failed"}
    if elsewhere is None:
        return expected
    # an iPhone's photos: a Display-P3 JPEG (GPS, rotated) and a HEIC, both with a P3 profile; and photos
    # reached through symbolic links, to an allowed folder outside ROOT and to a photo inside ROOT
    (root / "iphone").mkdir()
    (root / "iphone" / "IMG_1.jpg").write_bytes(p3_jpeg(saturated_photo(40, 48), orientation=6))
    (root / "iphone" / "IMG_2.heic").write_bytes(p3_heic(saturated_photo(44, 40, seed=1)))
    save(elsewhere / "allowed" / "a.png", noise())
    os.symlink(elsewhere / "allowed" / "a.png", root / "iphone" / "linked-a.png")
    os.symlink(f"../astronaut/{sorted(os.listdir(root / 'astronaut'))[0]}", root / "iphone" / "linked-b.png")
    save(elsewhere / "private" / "secret.png", noise())
    save(root / "escaping" / "ok.png", noise())
    os.symlink(elsewhere / "private" / "secret.png", root / "escaping" / "secret.png")  # out of the allowed roots
    save(root / "dangling" / "ok.png", noise())
    os.symlink("gone.png", root / "dangling" / "gone-link.png")  # a broken link
    return expected | {"iphone": "ok", "escaping": "failed", "dangling": "failed"}


def buf_png(arr):
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def corpus_run(ray_cluster, tmp_path_factory):
    from capray.batch.command import protect

    base, elsewhere = tmp_path_factory.mktemp("batch"), tmp_path_factory.mktemp("elsewhere")
    src, out = base / "in", base / "out"
    expected = build_corpus(src, elsewhere)
    before = tree_digest(src)
    cfg = cheap_config(batch={"allowed_input_prefixes": [str(elsewhere / "allowed")]})
    summary = protect(str(src), str(out), cfg)
    return {"src": src, "out": out, "expected": expected, "before": before, "summary": summary, "base": base,
            "cfg": cfg}


def rows_by_identity(out: Path) -> dict[str, dict]:
    rows = read_manifest(str(out), steps=True).to_pylist()
    idents = [r["identity"] for r in rows]
    assert len(idents) == len(set(idents)), "an identity committed twice"
    return {r["identity"]: r for r in rows}


def test_every_identity_has_exactly_one_row_with_expected_status(corpus_run):
    rows = rows_by_identity(corpus_run["out"])
    assert {i: r["status"] for i, r in rows.items()} == corpus_run["expected"]
    s = corpus_run["summary"]
    assert (s.ok, s.failed, s.failed_input, s.unfinished, s.exit_code) == (7, 7, 7, 0, 0)  # input failures only
    assert all(r["failure_class"] == ("input" if r["status"] == "failed" else None) for r in rows.values())
    assert "cut.png" in rows["broken"]["error"] and "good.png" not in rows["broken"]["error"]
    assert "zero.png: empty file" in rows["empty"]["error"]
    assert "notes.png: not a recognised image" in rows["text"]["error"]
    assert "max_photos_per_identity=4" in rows["crowd"]["error"] and "no photos" in rows["nophotos"]["error"]
    assert "secret.png' is a symbolic link to" in rows["escaping"]["error"]
    assert "gone-link.png: broken symbolic link" in rows["dangling"]["error"]
    for ident in ("broken", "empty", "text", "crowd", "nophotos", "escaping", "dangling"):
        assert rows[ident]["output_uris"] == []
        assert not (corpus_run["out"] / rows[ident]["safe_name"]).exists(), "a failed identity wrote photos"


def test_outputs_keep_size_orientation_alpha_and_budget(corpus_run):
    out = corpus_run["out"]
    rows = rows_by_identity(out)
    cfg = cheap_config()
    bound = int(np.ceil(cfg.attack.eps * 127.5))
    for row in rows.values():
        if row["status"] != "ok":
            continue
        assert len(row["output_uris"]) == len(row["input_uris"]) == row["num_photos"]
        assert row["config_hash"] == cfg.config_hash() and row["seed"] == 0 and row["method"] == "aspl"
        assert len(row["loss_trajectory"]) == row["pgd_steps"] == 2
        for uri_in, uri_out in zip(row["input_uris"], row["output_uris"]):
            assert uri_out.startswith(str(out / row["safe_name"])) and uri_out.endswith(".png")
            clean = decode_image(Path(uri_in).read_bytes(), max_pixels=10**8)
            prot = np.array(Image.open(uri_out))
            assert prot.shape[:2] == clean.rgb.shape[:2]
            if clean.alpha is not None:
                assert np.array_equal(prot[..., 3], clean.alpha)
                prot = prot[..., :3]
            diff = np.abs(prot.astype(int) - clean.rgb.astype(int)).max()
            assert 0 < diff <= bound
    assert len(set(rows["Zoë"]["output_uris"])) == 2
    assert rows["bob smith"]["safe_name"].startswith("bob_smith-")
    assert rows["solo"]["cap_enabled"] is False and any("CAP skipped" in n for n in rows["solo"]["notes"])
    rotated = [u for u in rows["formats"]["output_uris"] if "rotated" in u][0]
    assert Image.open(rotated).size == (30, 60)  # EXIF orientation 6 applied: 60x30 stored, 30x60 displayed


def test_iphone_photos_keep_their_colours_and_capture_time_and_linked_photos_are_protected(corpus_run):
    """A Display-P3 JPEG and a HEIC come out with their P3 profile (rendered colours within the budget of the
    input's), capture time kept and location stripped; photos reached through symbolic links are protected."""
    from test_photo_fidelity import EPS_255, rendered

    rows = rows_by_identity(corpus_run["out"])
    iphone = rows["iphone"]
    assert [Path(u).name for u in iphone["output_uris"]] == ["IMG_1.png", "IMG_2.png", "linked-a.png", "linked-b.png"]
    for uri_in, uri_out in list(zip(iphone["input_uris"], iphone["output_uris"]))[:2]:
        out = Path(uri_out).read_bytes()
        assert Image.open(uri_out).info["icc_profile"] == display_p3_icc()
        shift = np.abs(rendered(out) - rendered(Path(uri_in).read_bytes()))
        assert shift.mean() <= EPS_255, (uri_in, shift.mean())
    exif = Image.open(iphone["output_uris"][0]).getexif()
    assert exif.get_ifd(0x8769)[0x9003] == "2024:05:01 10:00:00" and not exif.get_ifd(0x8825) and 0x0112 not in exif
    assert Image.open(iphone["output_uris"][0]).size == (40, 48)  # the JPEG's orientation 6 applied once
    assert all(Path(u).is_file() and not Path(u).is_symlink() for u in iphone["output_uris"][2:])


def test_inputs_untouched_and_nothing_outside_output(corpus_run):
    assert tree_digest(corpus_run["src"]) == corpus_run["before"]
    assert sorted(p.name for p in corpus_run["base"].iterdir()) == ["in", "out"]
    assert not list(corpus_run["out"].rglob(".capray-tmp-*"))
    run_json = (corpus_run["out"] / "run.json").read_text()
    assert cheap_config().config_hash() in run_json
    assert "capray_identities_total{status=\"ok\"} 7.0" in (corpus_run["out"] / "metrics.prom").read_text()


@pytest.mark.slow  # the fast tier's reruns: test_batch_incremental, test_batch_processor (engine stand-in)
def test_rerun_skips_done_identities_and_keeps_one_row_each(corpus_run):
    """Unchanged input: ok identities and input failures are both skipped; nothing is rewritten."""
    from capray.batch.command import protect

    out = corpus_run["out"]
    before = {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.json"
              and p.name != "metrics.prom"}
    summary = protect(str(corpus_run["src"]), str(out), corpus_run["cfg"], show_progress=False)
    assert (summary.skipped, summary.skipped_input, summary.ok, summary.failed, summary.exit_code) == (7, 7, 0, 0, 0)
    assert len(rows_by_identity(out)) == 14
    after = {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.json"
             and p.name != "metrics.prom"}
    assert after == before  # PNGs, commit files and states untouched


def test_same_config_and_seed_give_same_png_bytes_as_the_in_process_engine(corpus_run, tiny_models, tmp_path):
    """Pipeline run twice → identical bytes; and equal to the engine called directly in this process."""
    import torch

    from capray.attack.api import protect_arrays
    from capray.batch.command import protect

    src = tmp_path / "in"
    shutil.copytree(corpus_run["src"] / "chelsea", src / "chelsea")
    protect(str(src), str(tmp_path / "out"), cheap_config(), show_progress=False)
    first = corpus_run["out"] / "chelsea"
    for png in sorted(first.iterdir()):
        assert png.read_bytes() == (tmp_path / "out" / "chelsea" / png.name).read_bytes()
    photos = sorted((src / "chelsea").iterdir())
    rgbs = [decode_image(p.read_bytes(), max_pixels=10**8).rgb for p in photos]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        protected, record = protect_arrays(rgbs, cheap_config(), "chelsea", tiny_models)
    finally:
        torch.set_num_threads(threads)
    for p, arr in zip(photos, protected):
        assert encode_png(arr) == (first / f"{p.stem}.png").read_bytes()


class KillOnce:
    """Mixin: SIGKILL the actor's own process the first time it starts a group (marker file on disk)."""

    MARKER = ""

    def process(self, row):
        if not os.path.exists(self.MARKER):
            Path(self.MARKER).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process(row)


@pytest.mark.slow
def test_actor_killed_mid_group_is_retried_and_completes(ray_cluster, tmp_path):
    from ray import cloudpickle

    from capray.batch.command import protect
    from capray.batch.stages import ProtectStage

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "killed"
    actor_cls = type("KillingActor", (KillOnce, ProtectStage), {"MARKER": str(marker)})
    src = tmp_path / "in"
    for ident in ("coffee", "chelsea"):
        shutil.copytree(SAMPLES / ident, src / ident)
    summary = protect(str(src), str(tmp_path / "out"), cheap_config(), protect_stage=actor_cls, show_progress=False)
    assert marker.exists(), "the fault was never injected"
    assert (summary.ok, summary.failed, summary.unfinished) == (2, 0, 0)
    rows = rows_by_identity(tmp_path / "out")
    assert sorted(rows) == ["chelsea", "coffee"] and all(r["status"] == "ok" for r in rows.values())
    assert sorted(p.name for p in (tmp_path / "out" / "coffee").iterdir()) == ["coffee_1.png", "coffee_2.png"]
