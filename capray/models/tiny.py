"""Write a complete, tiny, random Stable-Diffusion-format model directory.

There is no model hub in CI, so tests and the demo use a model that has SD 2.1's *layout* (unet/,
vae/, text_encoder/, tokenizer/, scheduler/, model_index.json) and loads through exactly the same
`from_pretrained` code path as the real one, only with a few thousand parameters. The tokenizer's
vocab.json and merges.txt are written from scratch (byte-level BPE over the 256 byte symbols plus a
handful of merges for the prompt words), so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from capray.config import TINY_MODEL_MARKER

TINY_SEED = 1234
_PROMPT_WORDS = ["a", "photo", "of", "sks", "person", "dslr", "portrait"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(path: Path) -> None:
    """A valid CLIP BPE tokenizer: every byte symbol (with and without '</w>'), merges for prompt words."""
    path.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in _PROMPT_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: 'p h' → 'ph', 'ph o' → 'pho', …
            merges.append(f"{pieces[0]} {pieces[1]}")
            merged = pieces[0] + pieces[1]
            if merged not in vocab_list:
                vocab_list.append(merged)
            pieces = [merged] + pieces[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }))
    (path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }))
    return None


def write_model_index(root: Path) -> None:
    """The model_index.json that makes a folder of SD parts a StableDiffusionPipeline directory."""
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }, indent=1))


def build_tiny_model(path: str | Path, *, seed: int = TINY_SEED) -> Path:
    """Create the tiny SD-format directory at `path` (overwrites components) and return it."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    write_tokenizer(root / "tokenizer")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(  # 4 blocks → the same 8× spatial downsampling as SD's VAE
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64,
    )
    scheduler = DDPMScheduler(  # SD 2.1-base's training schedule
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text_encoder.save_pretrained(root / "text_encoder")
    scheduler.save_pretrained(root / "scheduler")
    write_model_index(root)
    (root / TINY_MODEL_MARKER).write_text("tiny random SD-format model written by `capray models tiny`\n")
    return root


def default_tiny_dir(cache_dir: str | None = None) -> Path:
    from capray.models.cache import cache_root

    return cache_root(cache_dir) / "tiny-sd"


def ensure_tiny_model(cache_dir: str | None = None) -> Path:
    """Build the tiny model on first use; later calls reuse it (a file lock keeps actors from racing)."""
    from capray.models.cache import exclusive

    target = default_tiny_dir(cache_dir)
    with exclusive(target.parent / ".tiny-sd.lock"):
        if not (target / "model_index.json").exists():
            tmp = target.with_name(target.name + ".tmp")
            build_tiny_model(tmp)
            if target.exists():
                import shutil

                shutil.rmtree(target)
            tmp.rename(target)
    return target
