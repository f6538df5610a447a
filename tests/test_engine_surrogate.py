"""Surrogate training data order (FSMG as Anti-DreamBooth trains it), fp32 master weights, deterministic mode."""

from __future__ import annotations

import os

import pytest
import torch

from capray.attack.surrogate import Surrogate, example_order


def test_in_order_without_a_seed_as_aspl_cycles_the_dataset():
    assert example_order(4, 200, 6, None).tolist() == [0, 1, 2, 3, 4, 5]
    assert (example_order(4, 0, 10, None) % 4).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_shuffled_order_is_seeded_epochs_of_permutations():
    """Like a shuffled DataLoader over Anti-DreamBooth's dataset of length max(#instance, #class)."""
    order = example_order(4, 200, 1000 * 2, ("seed", "id", "fsmg"))
    assert torch.equal(order, example_order(4, 200, 2000, ("seed", "id", "fsmg")))
    assert not torch.equal(order, example_order(4, 200, 2000, ("other",)))
    epochs = order.view(10, 200)
    for epoch in epochs:  # every example exactly once per epoch
        assert sorted(epoch.tolist()) == list(range(200))
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.bincount(order % 4).tolist() == [500] * 4  # every instance photo equally often


def test_fsmg_trains_with_two_instance_and_two_class_images_per_step(monkeypatch, tiny_models, smoke_config):
    from capray import protect_group
    from capray.attack import surrogate

    seen = []
    real = surrogate.reconstruction_loss

    def spy(parts, unet, cond, images, draw):
        if unet.training:
            seen.append(len(images))
        return real(parts, unet, cond, images, draw)

    monkeypatch.setattr(surrogate, "reconstruction_loss", spy)
    cfg = smoke_config(attack={"method": "fsmg", "fsmg_train_steps": 2, "pgd_steps": 1}, cap={"enabled": False})
    protect_group(torch.rand(4, 3, 64, 64) * 2 - 1, cfg, identity="batch", models=tiny_models)
    assert seen == [2, 2, 2, 2]  # per step: 2 instance images, then 2 class images


def test_fp32_master_weights_are_loaded_as_fp32_not_upcast_from_bf16(tiny_models, smoke_config):
    from capray.models.sd import load_diffusion

    bf16 = load_diffusion(smoke_config(model={"dtype": "bf16", "device": "cpu"}).model)
    assert next(bf16.unet.parameters()).dtype == torch.bfloat16
    master = Surrogate.from_parts(bf16)
    upcast = Surrogate.from_parts(bf16, master_weights="model")
    fp32_unet = tiny_models.parts.unet  # the same weights loaded as fp32
    assert next(master.unet.parameters()).dtype == torch.float32
    assert next(upcast.unet.parameters()).dtype == torch.bfloat16
    for ours, disk, _ in zip(master.unet.parameters(), fp32_unet.parameters(), upcast.unet.parameters()):
        assert torch.equal(ours, disk)
    assert any(not torch.equal(ours, rounded.float()) for ours, rounded in
               zip(master.unet.parameters(), upcast.unet.parameters()))  # bf16 rounding would have shown


def test_surrogate_mode_says_which_weights_trained(tiny_models, smoke_config):
    from capray import protect_group

    images = torch.rand(2, 3, 64, 64) * 2 - 1
    common = {"method": "fsmg", "fsmg_train_steps": 0, "pgd_steps": 1}
    fp32 = protect_group(images, smoke_config(attack=common), models=tiny_models)
    model = protect_group(images, smoke_config(attack={**common, "surrogate": {"master_weights": "model"}}),
                          models=tiny_models)
    assert (fp32.surrogate_mode, model.surrogate_mode) == ("fp32-master", "fp32-weights")


@pytest.fixture
def restore_determinism():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
    if before[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_deterministic_mode_sets_torch_cudnn_and_cublas(restore_determinism, smoke_config, tiny_model_dir):
    from capray import protect_group
    from capray.attack.engine import load_models

    cfg = smoke_config(model={"deterministic": True}, attack={"method": "fsmg", "pgd_steps": 2, "fsmg_train_steps": 1})
    models = load_models(cfg.model)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    images = torch.rand(3, 3, 64, 80) * 2 - 1
    a = protect_group(images, cfg, identity="det", models=models)  # no op lacks a deterministic kernel
    b = protect_group(images, cfg, identity="det", models=models)
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))


@pytest.mark.gpu
def test_deterministic_mode_gives_identical_pixels_on_the_gpu(restore_determinism, smoke_config, tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from capray import protect_group
    from capray.attack.engine import load_models

    cfg = smoke_config(model={"deterministic": True, "device": "cuda"}, attack={"method": "aspl"})
    models = load_models(cfg.model)
    images = torch.rand(4, 3, 96, 64) * 2 - 1
    a = protect_group(images, cfg, identity="det", models=models)
    b = protect_group(images, cfg, identity="det", models=models)
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
