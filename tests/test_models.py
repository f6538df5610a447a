"""The tiny SD-format model loads through the real from_pretrained path; the style networks work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capray.config import ModelConfig
from capray.models.sd import encode_prompt, load_diffusion
from capray.models.style import load_style_network


def test_cli_writes_a_loadable_sd_directory(tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "capray.cli", "models", "tiny", str(out)], check=True)
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    parts = load_diffusion(ModelConfig(sd=str(out)))
    ids = parts.tokenizer("a photo of sks person").input_ids
    assert parts.tokenizer.convert_ids_to_tokens(ids)[1:6] == ["a</w>", "photo</w>", "of</w>", "sks</w>", "person</w>"]
    cond = encode_prompt(parts, "a photo of sks person")
    assert cond.shape == (1, 77, 32)
    assert not any(p.requires_grad for p in parts.unet.parameters())  # PGD needs input grads only


def test_missing_model_gives_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="cannot load diffusion model"):
        load_diffusion(ModelConfig(sd=str(tmp_path / "nope")))


@pytest.mark.parametrize("network,layers,channels", [
    ("vgg19", None, [64, 64, 128, 128, 256]),
    ("resnet50", None, [64, 256, 512]),
    ("vgg19", ["conv1_1", "conv4_1"], [64, 512]),
])
def test_style_networks_return_the_configured_layers(network, layers, channels):
    cfg = ModelConfig(style_network=network, style_weights="random", style_layers=layers)
    net = load_style_network(cfg, torch.device("cpu"))
    feats = net(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert [f.shape[1] for f in feats] == channels
    again = load_style_network(cfg, torch.device("cpu"))(torch.zeros(1, 3, 32, 32))
    assert torch.equal(net(torch.zeros(1, 3, 32, 32))[0], again[0])  # 'random' weights are deterministic


def test_style_state_dict_file_and_missing_imagenet_weights(tmp_path, monkeypatch):
    import torchvision

    path = tmp_path / "vgg.pt"
    torch.save(torchvision.models.vgg19(weights=None).state_dict(), path)
    net = load_style_network(ModelConfig(style_weights=str(path)), torch.device("cpu"))
    assert len(net(torch.zeros(1, 3, 32, 32))) == 5
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(RuntimeError, match="unavailable"):
        load_style_network(ModelConfig(style_weights="imagenet"), torch.device("cpu"))


def test_preflight_refuses_unloadable_sources_before_any_work(tmp_path, tiny_model_dir):
    from capray.models.sd import preflight

    preflight(ModelConfig(sd=str(tiny_model_dir)))  # a real SD-format directory passes
    preflight(ModelConfig(sd="stabilityai/stable-diffusion-2-1-base"))  # hub ids are left to from_pretrained
    with pytest.raises(ValueError, match="not an SD-format directory"):
        preflight(ModelConfig(sd=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="no such state-dict file"):
        preflight(ModelConfig(style_weights=str(tmp_path / "vgg.pt")))


def test_protect_exits_2_for_a_model_path_that_is_not_an_sd_directory(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "capray.cli", "protect", "capray/samples", str(out),
                           "--preset", "smoke", "--model", str(tmp_path / "missing-model")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    assert "not an SD-format directory" in proc.stderr
    assert not out.exists()  # refused before any work
