"""The engine never fails silently: non-finite values fail the group, a λ search that stopped choosing
is flagged; and the knobs of issue 20 do what they say (the consistency sign, the compute copy, the
resize operators, the hash that upgrades keep)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from capray import protect_group
from capray.attack import engine as engine_module
from capray.attack.guard import NonFiniteError

from engine_helpers import load_faces


def _photos(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class NaNAtStep:
    """A model stand-in: the reconstruction loss turns NaN from PGD step `k` on, in the gradient passes
    (`grad=True`) or in the no-grad scoring passes (`grad=False`) only."""

    def __init__(self, k: int, grad: bool):
        self.k, self.grad, self.done = k, grad, 0
        self.real = engine_module.reconstruction_loss

    def progress(self, done: int, _total: int) -> None:
        self.done = done

    def __call__(self, *args, **kwargs):
        loss = self.real(*args, **kwargs)
        if self.done >= self.k and torch.is_grad_enabled() == self.grad:
            return loss * float("nan")
        return loss


FSMG = {"method": "fsmg", "pgd_steps": 4, "fsmg_train_steps": 0}


@pytest.mark.parametrize("grad, what", [(True, "the reconstruction loss"), (False, "the λ candidates' scores")])
def test_a_nan_at_step_k_fails_the_group_naming_the_step(tiny_models, smoke_config, monkeypatch, grad, what):
    stand_in = NaNAtStep(k=2, grad=grad)
    monkeypatch.setattr(engine_module, "reconstruction_loss", stand_in)
    cfg = smoke_config(attack=FSMG, cap={"start_fraction": 0.0})
    with pytest.raises(NonFiniteError) as caught:
        protect_group(_photos(), cfg, identity="nan", models=tiny_models, progress=stand_in.progress)
    assert caught.value.step == 2 and caught.value.what == what
    assert "PGD step 2" in str(caught.value) and "not protected" in str(caught.value)
    assert caught.value.failure_class == "transient"


def test_without_the_nan_the_same_run_is_fine(tiny_models, smoke_config, monkeypatch):
    """The stand-in only poisons from step k on: k past the end leaves a normal, finite run."""
    stand_in = NaNAtStep(k=99, grad=True)
    monkeypatch.setattr(engine_module, "reconstruction_loss", stand_in)
    result = protect_group(_photos(), smoke_config(attack=FSMG), identity="nan", models=tiny_models,
                           progress=stand_in.progress)
    assert all(torch.isfinite(img).all() for img in result.images)


def test_a_nan_in_surrogate_training_fails_the_group(tiny_models, smoke_config, monkeypatch):
    from capray.attack import surrogate

    real = surrogate.reconstruction_loss
    monkeypatch.setattr(surrogate, "reconstruction_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(NonFiniteError, match="surrogate training"):
        protect_group(_photos(), smoke_config(attack={"method": "aspl"}), identity="nan", models=tiny_models)


def test_the_error_says_what_a_rerun_needs():
    half = NonFiniteError("the reconstruction loss", 3, torch.bfloat16)
    full = NonFiniteError("the reconstruction loss", 3, torch.float32)
    assert "model.dtype: fp32 may fix it" in str(half) and "bfloat16" in str(half)
    assert "model's weights" in str(full) and "fp32 may fix" not in str(full)


def test_the_batch_job_records_a_nan_group_failed_transient_without_retrying_it():
    from capray.attack.api import ProtectionRecord
    from capray.batch.stages import ProtectStage
    from capray.config import load_config

    cfg = load_config(preset="smoke", overrides={"batch": {"group_retries": 2, "actor_error_limit": 1}})
    calls = []

    class Actor(ProtectStage):
        def load_protector(self):
            return None

        def run_engine(self, rgbs, identity, fixed=()):
            calls.append(identity)
            if identity == "bad":
                raise NonFiniteError("the reconstruction loss", 5, torch.bfloat16)
            return [a + 1 for a in rgbs], ProtectionRecord.unprotected(cfg, identity)

        def end_process(self, reason):
            raise AssertionError(f"the actor must not be replaced for a NaN: {reason}")

    actor = Actor(cfg.model_dump_json())
    row = {"pixels": [bytes(12)], "shapes": [[2, 2]], "error": None}
    bad = actor.process({**row, "identity": "bad"})
    good = actor.process({**row, "identity": "good"})
    assert calls == ["bad", "good"]  # one attempt: the same config and seed would meet the same NaN
    assert bad["failure"] == "transient" and bad["attempts"] == 1 and bad["pixels"] is None
    assert "PGD step 5" in bad["error"] and "model.dtype: fp32" in bad["error"]
    assert good["error"] is None and good["pixels"]


# -- λ diagnostics ----------------------------------------------------------------------------------

def test_lambda_stopped_choosing_is_most_steps_at_two_candidates_or_fewer():
    from capray.attack.engine import lambda_stopped_choosing

    assert lambda_stopped_choosing([2, 1, 2, 101], 100)
    assert not lambda_stopped_choosing([2, 101, 101, 2], 100)  # half is not most
    assert not lambda_stopped_choosing([2, 2], 1)  # R = 1: two candidates is all there is
    assert not lambda_stopped_choosing([], 100)


def test_raw_gram_matrices_collapse_lambda_on_real_faces_and_the_record_says_so(tiny_models, smoke_config,
                                                                                  faces_dir, caplog):
    """docs/engine.md#gram-normalization: unnormalised Gram matrices leave λ only "0 or not"."""
    from capray.attack.api import protect_arrays
    from capray.attack.metrics import to_uint8

    photos = [to_uint8(p) for p in load_faces(faces_dir, 64)]
    runs = {}
    for norm in ("none", "elements"):
        cfg = smoke_config(attack={"method": "fsmg", "pgd_steps": 6, "fsmg_train_steps": 0},
                           cap={"ratio_max": 30, "gram_normalization": norm})
        with caplog.at_level("WARNING", logger="capray.attack.engine"):
            _, runs[norm] = protect_arrays(photos, cfg, "n000050", tiny_models)
    raw, normalised = runs["none"], runs["elements"]
    assert max(raw.distinct_candidates) <= 2 and raw.lambda_collapsed is True
    assert any("λ stopped choosing" in n for n in raw.notes)
    assert any("λ stopped choosing" in r.getMessage() and "n000050" in r.getMessage() for r in caplog.records)
    assert min(normalised.distinct_candidates) > 2 and normalised.lambda_collapsed is False
    assert not any("λ stopped choosing" in n for n in normalised.notes)


def test_the_batch_metrics_count_groups_whose_lambda_collapsed():
    from capray.metrics import JobMetrics

    metrics = JobMetrics()
    for collapsed in (True, False, None):
        metrics.observe({"status": "ok", "lambda_collapsed": collapsed}, remaining=0)
    assert b"capray_lambda_collapsed_total 1.0" in metrics.text()


# -- the consistency sign -----------------------------------------------------------------------------

def test_descend_pulls_the_faces_styles_together_ascend_pushes_them_apart(tiny_models, smoke_config, faces_dir):
    photos = load_faces(faces_dir, 64)
    runs = {}
    for sign in ("descend", "ascend"):
        cfg = smoke_config(attack={"method": "fsmg", "pgd_steps": 8, "fsmg_train_steps": 0},
                           cap={"ratio_mode": "static", "static_ratio": 40, "consistency_sign": sign})
        runs[sign] = protect_group(photos, cfg, identity="n000050", models=tiny_models)
    down, up = runs["descend"], runs["ascend"]
    assert any(not torch.equal(a, b) for a, b in zip(down.images, up.images))
    assert down.consistency_before == up.consistency_before
    assert down.consistency_after < up.consistency_after
    assert down.consistency_after < down.consistency_before < up.consistency_after


@pytest.mark.slow  # a reference search per r; the fast tier keeps the sign's effect test above
def test_fast_equals_reference_under_the_ascend_reading(smoke_config):
    from capray.attack.engine import load_models

    from engine_helpers import RES, assert_same, mixed_group

    cfg = dict(model={"dtype": "fp64", "resolution": RES}, attack={"method": "fsmg", "pgd_steps": 2,
                                                                   "fsmg_train_steps": 0},
               cap={"ratio_max": 12, "start_fraction": 0.0, "consistency_sign": "ascend"})
    models = load_models(smoke_config(**cfg).model)
    runs = [protect_group(mixed_group(3), smoke_config(**{**cfg, "cap": {**cfg["cap"], "search": s}}),
                          identity="asc", models=models) for s in ("fast", "reference")]
    assert_same(*runs)


# -- hashes that upgrades keep ------------------------------------------------------------------------

# config_hash() of these configs before issue 20 added settings: an upgrade must not change them, or every
# nightly OUTPUT would refuse to resume. SimAC's defaults changed (its pixels did), so SimAC keeps its old
# hash only with the old settings spelled out.
HASHES_BEFORE = {
    (None, "fsmg"): "3f91d1c8bdf7acd4", (None, "aspl"): "42138218adf818ff",
    ("smoke", "fsmg"): "5d4da61898210c5b", ("smoke", "aspl"): "d9397d7da2215d68",
    ("paper", "fsmg"): "64006af82b53044d", ("paper", "aspl"): "fc4aa83e39d0996f",
    (None, "simac-old"): "bafb76554775d5fb", ("smoke", "simac-old"): "55953719da7916d9",
}


@pytest.mark.parametrize("preset, method", list(HASHES_BEFORE))
def test_an_upgrade_keeps_the_config_hash_where_pixels_did_not_change(preset, method):
    from capray.config import load_config

    attack = {"method": method.removesuffix("-old")}
    if method == "simac-old":
        attack["simac"] = {"feature_detach": False, "feature_reduction": "sum"}
    assert load_config(preset=preset, overrides={"attack": attack}).config_hash() == HASHES_BEFORE[preset, method]


def test_settings_that_change_pixels_change_the_hash_and_the_others_do_not():
    from capray.config import CaprayConfig

    base = CaprayConfig().config_hash()
    assert CaprayConfig(cap={"consistency_sign": "ascend"}).config_hash() != base
    assert CaprayConfig(cap={"candidate_batch_size": 3}).config_hash() == base  # only groups scoring calls
    assert CaprayConfig(attack={"simac": {"feature_reduction": "sum"}}).config_hash() == base  # ASPL ignores it
    simac = CaprayConfig(attack={"method": "simac"})
    assert simac.config_hash() != CaprayConfig(attack={"method": "simac", "simac": {"feature_detach": False}}
                                               ).config_hash()


# -- the compute copy and the resize operators --------------------------------------------------------

def test_one_compute_copy_per_models_refreshed_in_place(tiny_models):
    from capray.attack.surrogate import Surrogate

    half = dataclasses.replace(tiny_models, parts=dataclasses.replace(tiny_models.parts, dtype=torch.bfloat16))
    first_net = Surrogate.from_parts(tiny_models.parts)
    copy, release = half.borrow_compute_copy(first_net)
    assert next(copy.unet.parameters()).dtype == torch.bfloat16
    busy, release_busy = half.borrow_compute_copy(first_net)  # held: a second group gets its own
    assert busy is not copy
    release_busy()
    release()
    second_net = Surrogate.from_parts(tiny_models.parts)
    with torch.no_grad():
        for p in second_net.unet.parameters():
            p.add_(0.5)
    again, release = half.borrow_compute_copy(second_net)
    assert again is copy  # the same allocation, with the new weights cast in place
    for mine, theirs in zip(again.unet.parameters(), second_net.unet.parameters()):
        assert torch.equal(mine, theirs.to(torch.bfloat16))
    release()


def test_resize_operators_are_built_once_per_size():
    from capray.attack.group import _crop_operators, resize_center_crop

    _crop_operators.cache_clear()
    image = torch.rand(2, 3, 50, 70)
    first = resize_center_crop(image, 32)
    again = resize_center_crop(image, 32)
    info = _crop_operators.cache_info()
    assert (info.misses, info.hits) == (1, 1) and torch.equal(first, again)
    reference = torch.nn.functional.interpolate(image.double(), size=(32, round(70 * 32 / 50)), mode="bilinear",
                                                antialias=True, align_corners=False)
    left = (reference.shape[-1] - 32) // 2
    assert torch.allclose(first.double(), reference[..., left: left + 32], atol=1e-5)
