"""The tiny SD-format model loads through the real from_pretrained path; the style networks work."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capray.config import ModelConfig
from capray.models.sd import encode_prompt, load_diffusion
from capray.models.style import load_style_network

REPO = Path(__file__).resolve().parents[1]


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


def hub_cache_from_dir(src: Path, hub: Path, repo_id: str, commit: str = "0" * 40) -> Path:
    """Lay `src` out as the Hugging Face hub cache does: blobs by hash, a snapshot of symlinks, refs/main."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


OFFLINE = {"HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "NO_PROXY": "", "no_proxy": ""}  # no hub, and any download attempt is refused at once


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty HF and torch caches, and no way to download (whatever network this machine has)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def test_preflight_accepts_what_loads_offline(offline_caches, tiny_model_dir):
    from capray.models.preflight import preflight

    preflight(ModelConfig(sd="tiny", style_weights="random"))
    preflight(ModelConfig(sd=str(tiny_model_dir), style_weights="random"))  # a local SD-format directory
    hub_cache_from_dir(tiny_model_dir, offline_caches / "hf" / "hub", "capray/tiny-sd")
    preflight(ModelConfig(sd="capray/tiny-sd", style_weights="random"))  # a hub id present in the cache
    import torchvision

    from capray.models.cache import imagenet_file

    weights = imagenet_file("vgg19")  # in $TORCH_HOME, where torchvision looks
    weights.parent.mkdir(parents=True)
    torch.save(torchvision.models.vgg19(weights=None).state_dict(), weights)
    preflight(ModelConfig(sd="capray/tiny-sd", style_weights="imagenet"))


def test_preflight_names_the_model_where_it_looked_and_the_fix(offline_caches, tiny_model_dir):
    from capray.models.preflight import PreflightError, preflight

    hub = offline_caches / "hf" / "hub"
    with pytest.raises(PreflightError) as missing_hub:
        preflight(ModelConfig(style_weights="random"))  # the default: SD 2.1 base, not cached here
    msg = str(missing_hub.value)
    assert "stabilityai/stable-diffusion-2-1-base" in msg and str(hub) in msg and "`capray models fetch`" in msg
    assert "HF_HUB_OFFLINE" in msg and "\n" not in msg
    with pytest.raises(PreflightError, match="`capray models fetch --sd stabilityai/stable-diffusion-2-1-base "
                                             "--revision abc123`"):  # the fix caches the revision that loads
        preflight(ModelConfig(revision="abc123", style_weights="random"))

    broken = offline_caches / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(PreflightError, match="not an SD-format directory .*unet/ has no weights"):
        preflight(ModelConfig(sd=str(broken), style_weights="random"))
    hub_cache_from_dir(broken, hub, "capray/broken")  # incomplete in the cache: as bad as absent
    with pytest.raises(PreflightError, match="incomplete in the Hugging Face cache"):
        preflight(ModelConfig(sd="capray/broken", style_weights="random"))

    with pytest.raises(PreflightError) as missing_style:
        preflight(ModelConfig(sd="tiny", style_weights="imagenet"))
    msg = str(missing_style.value)
    assert "vgg19" in msg and str(offline_caches / "torch") in msg and "`capray models fetch`" in msg
    with pytest.raises(PreflightError, match="resnet50 .*`capray models fetch --style resnet50`"):
        preflight(ModelConfig(sd="tiny", style_network="resnet50", style_weights="imagenet"))
    with pytest.raises(PreflightError, match="no such state-dict file"):
        preflight(ModelConfig(sd="tiny", style_weights=str(offline_caches / "vgg.pt")))


def test_models_list_shows_a_cache_built_from_the_tiny_model(offline_caches, tiny_model_dir):
    hub = offline_caches / "shared" / "huggingface" / "hub"
    hub_cache_from_dir(tiny_model_dir, hub, "capray/tiny-sd")
    broken = hub_cache_from_dir(tiny_model_dir, hub, "capray/no-vae")
    shutil.rmtree(broken / "vae")
    proc = subprocess.run([sys.executable, "-m", "capray.cli", "models", "list", "--cache",
                           str(offline_caches / "shared")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith(("sd ", "style "))}
    assert "usable offline" in rows["capray/tiny-sd@main"]
    assert "NOT usable: vae/ missing" in rows["capray/no-vae@main"]
    assert "not downloaded" in rows["vgg19"] and "not downloaded" in rows["resnet50"]
    assert "run `capray models fetch`" in proc.stdout  # the default model is not there


def test_models_fetch_without_network_fails_at_once_with_one_line(offline_caches):
    env = {**os.environ, **OFFLINE, "HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}
    target = offline_caches / "volume"
    proc = subprocess.run([sys.executable, "-m", "capray.cli", "models", "fetch", "--cache", str(target)],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("capray models fetch: stabilityai/stable-diffusion-2-1-base is not cached")
    assert "nothing was downloaded" in lines[0] and "capray models fetch --cache DIR" in lines[0]
    assert not target.exists()  # refused before writing anything


def test_models_fetch_verifies_what_is_cached_without_the_network(offline_caches, tiny_model_dir):
    import torchvision

    from capray.models.cache import imagenet_file
    from capray.models.fetch import CacheDirs, fetch

    dirs = CacheDirs.at(offline_caches / "volume")
    snapshot = hub_cache_from_dir(tiny_model_dir, dirs.hub, "capray/tiny-sd")
    weights = imagenet_file("resnet50", dirs.checkpoints)
    weights.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    got = fetch("capray/tiny-sd", style="resnet50", cache_root=offline_caches / "volume", progress=print)
    assert (got.sd_snapshot, got.style_file, got.downloaded) == (snapshot, weights, [])  # loaded, nothing fetched
    shutil.rmtree(snapshot / "unet")
    from capray.models.fetch import FetchError

    with pytest.raises(FetchError, match="HF_HUB_OFFLINE"):  # incomplete: it would download, and may not
        fetch("capray/tiny-sd", style="resnet50", cache_root=offline_caches / "volume")
