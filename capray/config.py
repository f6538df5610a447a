"""Every knob capray has, in one place (pydantic), with presets and a stable hash.

Defaults live here and nowhere else: the engine, the batch job, Serve and evaluate all take a
`CaprayConfig` (or one of its parts). Images are in [-1, 1] inside the engine, so `eps=0.05` and
`alpha=0.005` are Anti-DreamBooth's script values (~6.4/255 and ~0.64/255).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

TINY_MODEL = "tiny"  # sentinel: build (once) and use the tiny random SD-format model
TINY_MODEL_MARKER = "CAPRAY_TINY"  # file `capray models tiny` leaves in the directories it writes
TINY_MODEL_NOTE = "tiny random model — not a protection"
REAL_SD_MODEL = "stabilityai/stable-diffusion-2-1-base"  # the paper's model (CAP §5)

VGG19_FIRST_FIVE_CONV = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1"]
RESNET50_STAGES = ["conv1", "layer1", "layer2", "layer3", "layer4"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which diffusion model and style network the engine loads, and where they run."""

    sd: str = Field(REAL_SD_MODEL, description="hub id, local SD-format directory, or 'tiny' (tests, demos)")
    revision: str | None = None
    dtype: Literal["fp32", "bf16", "fp16", "fp64"] = Field(
        "fp32", description="fp64 is for exactness tests on the CPU")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'…")
    resolution: int = Field(512, ge=32, description="side of the square the model sees")
    style_network: Literal["vgg19", "resnet50"] = "vgg19"
    style_weights: str = Field(
        "imagenet", description="'imagenet' (torchvision cache), 'random' (tests) or a state-dict path"
    )
    style_layers: list[str] | None = Field(
        None, description="feature layers for Gram matrices; default: first five conv layers (VGG-19)"
    )
    tiny_cache_dir: str | None = Field(None, description="where the tiny model is built; default ~/.cache/capray")
    gradient_checkpointing: bool = False
    attention_slicing: bool = False
    deterministic: bool = Field(
        False, description="same pixels on a GPU too: deterministic torch algorithms, cuDNN without autotuning and "
        "a fixed cuBLAS workspace, set before the first CUDA call (costs speed; see benchmarks/gpu_step.py)")

    @property
    def is_tiny(self) -> bool:
        """The tiny random model, by name or as a directory `capray models tiny` wrote: it protects nothing."""
        return self.sd == TINY_MODEL or (Path(self.sd).expanduser() / TINY_MODEL_MARKER).is_file()

    @property
    def notes(self) -> list[str]:
        """What every output made with these models must say (run.json, manifest, Serve, console)."""
        return [TINY_MODEL_NOTE] if self.is_tiny else []

    def effective_style_layers(self) -> list[str]:
        if self.style_layers:
            return list(self.style_layers)
        return list(VGG19_FIRST_FIVE_CONV if self.style_network == "vgg19" else RESNET50_STAGES[:3])


class SurrogateConfig(_Strict):
    """DreamBooth-style surrogate training used by FSMG (once) and ASPL/SimAC (every outer loop)."""

    learning_rate: float = 5e-7
    weight_decay: float = 1e-2
    train_text_encoder: bool = True
    master_weights: Literal["fp32", "model"] = Field(
        "fp32", description="'fp32': the surrogate trains fp32 weights loaded as fp32 from disk (Anti-DB's bf16 "
        "weights barely move at lr 5e-7); 'model': it trains in model.dtype, as Anti-DreamBooth's code does"
    )
    batch_size: int = Field(1, ge=1, description="instance images per training step (plus as many class images)")
    max_grad_norm: float = 1.0
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    class_prompt: str = "a photo of person"
    num_class_images: int = Field(200, ge=0)
    class_sample_steps: int = Field(50, ge=1)
    class_guidance_scale: float = 7.5
    class_images_dir: str | None = Field(None, description="cache for class images; default under ~/.cache/capray")
    offload_main: bool = Field(
        False, description="ASPL/SimAC: keep the main surrogate in host memory and train one device copy at a "
        "time (saves one fp32 UNet + text encoder on the GPU, ~4.8 GB for SD 2.1; same results)")


class SimACConfig(_Strict):
    """SimAC's greedy timestep selection and feature-interference loss (SimAC, CVPR'24)."""

    max_select_iters: int = 50
    samples_per_iter: int = 5
    delta_t: int = 20
    keep_timesteps: int = 100
    feature_weight: float = 1.0
    feature_detach: bool = Field(
        True, description="True (the public code): the feature loss is added as a constant and gives no gradient, "
        "so it is not computed at all; False: its gradient flows (the paper's text)")
    feature_reduction: Literal["mean", "sum"] = Field(
        "mean", description="how the MSEs of the decoder block's three ResNets combine: 'mean' (the public code, "
        "one MSE over the stacked features) or 'sum' (capray's default before it followed the public code)")


class CAPConfig(_Strict):
    """CAP: the cross-image consistency loss and the dynamic ratio λ (Algorithm 1)."""

    enabled: bool = True
    start_fraction: float = Field(0.5, ge=0.0, le=1.0, description="k̂ as a fraction of the PGD steps")
    ratio_max: int = Field(100, ge=0, description="R: λ is searched in 0..R")
    ratio_mode: Literal["dynamic", "static"] = "dynamic"
    static_ratio: float = 40.0
    loss: Literal["style", "content"] = "style"
    consistency_sign: Literal["descend", "ascend"] = Field(
        "descend", description="'descend': x + α·sign(∇L_re − r·∇L_cons), pulling styles together (the paper's "
        "text and Figure 2); 'ascend': x + α·sign(∇(L_re + r·L_cons)), Algorithm 1's lines 11–12 and 17–18 as printed")
    gram_normalization: Literal["elements", "none"] = Field(
        "elements", description="'elements' divides G by C·H·W (style-transfer convention); 'none' is Eq. 12 as printed"
    )
    search: Literal["fast", "reference"] = "fast"
    score_draw: Literal["fresh", "gradient", "independent"] = Field(
        "fresh", description="randomness the λ candidates are scored on: 'fresh' = new draws per step, independent "
        "of the gradient's and shared by all candidates; 'gradient' = the gradient's own draw (λ collapses to ≈ 0); "
        "'independent' = new draws per candidate (Algorithm 1 taken literally; noisy)")
    score_draws: int = Field(1, ge=1, description="draws each candidate's score is averaged over")
    candidate_batch_size: int = Field(
        0, ge=0, description="λ candidates per scoring call; 0: all of a step's distinct candidates in one call "
        "(memory is bounded by score_image_batch_size either way; never changes λ)")
    score_image_batch_size: int = Field(
        32, ge=1, description="images per no-grad scoring forward (candidates × photos, cut into chunks)")

    @model_validator(mode="after")
    def _one_gradient_draw(self) -> CAPConfig:
        if self.score_draw == "gradient" and self.score_draws != 1:
            raise ValueError("cap.score_draws averages fresh draws; with cap.score_draw=gradient there is only "
                             "the gradient's one draw (set score_draws=1 or score_draw=fresh)")
        return self


class RobustConfig(_Strict):
    """`attack.robust`: expectation over transformations (EOT) in the PGD objective.

    A platform re-encodes what it publishes and an attacker may filter what they download, so the
    attack loss is taken on T(x) with T drawn per photo and per PGD step: each transform below is
    applied with `probability`, in this order: crop → flip → resize → blur → JPEG (at the photo's own
    resolution, before the model's resize); crop and flip are off unless set. The published pixels x
    stay in the ε-ball; CAP's style statistics are taken on x as written (docs/engine.md#robust-mode).
    Off by default; the `robust` preset turns it on with these settings.
    """

    enabled: bool = False
    samples: int = Field(1, ge=1, description="EOT samples per PGD step: the attack gradient is the mean over "
                         "this many (noise, transform) draws (each one more forward + backward)")
    probability: float = Field(0.5, ge=0.0, le=1.0, description="chance each listed transform is applied to a "
                               "photo in a draw (independently; none of them: the photo as written)")
    jpeg_quality: tuple[int, int] | None = Field((50, 90), description="JPEG quality range (differentiable "
                                                 "approximation: DCT, quality-scaled tables, soft rounding); null: off")
    resize_factor: tuple[float, float] | None = Field((0.5, 0.9), description="downscale by a factor in this "
                                                      "range, then back up; null: off")
    blur_sigma: tuple[float, float] | None = Field((0.5, 1.5), description="Gaussian blur σ range in pixels; "
                                                   "null: off")
    crop_scale: tuple[float, float] | None = Field(None, description="crop a random window of this fraction of "
                                                   "each side, resized back, e.g. [0.85, 1.0]; off by default: "
                                                   "misaligning the perturbation costs most of its effect")
    flip: bool = Field(False, description="horizontal flip (an attacker's training augmentation); off by "
                       "default, as crop")

    @model_validator(mode="after")
    def _check_ranges(self) -> RobustConfig:
        bounds = {"jpeg_quality": (1, 100), "resize_factor": (0.05, 1.0), "blur_sigma": (0.0, 10.0),
                  "crop_scale": (0.3, 1.0)}
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if value is not None and not low <= value[0] <= value[1] <= high:
                raise ValueError(f"attack.robust.{name} must be [lo, hi] with {low} <= lo <= hi <= {high}, "
                                 f"got {list(value)}")
        if self.blur_sigma is not None and self.blur_sigma[0] <= 0:
            raise ValueError("attack.robust.blur_sigma must be > 0")
        if self.enabled and not self.kinds:
            raise ValueError("attack.robust.enabled needs at least one transform (jpeg_quality, resize_factor, "
                             "blur_sigma, crop_scale or flip)")
        return self

    @property
    def kinds(self) -> list[str]:
        """The transforms in use, in the order they are applied."""
        on = {"crop": self.crop_scale is not None, "flip": self.flip, "resize": self.resize_factor is not None,
              "blur": self.blur_sigma is not None, "jpeg": self.jpeg_quality is not None}
        return [k for k, v in on.items() if v]


class AttackConfig(_Strict):
    method: Literal["fsmg", "aspl", "simac"] = "aspl"
    eps: float = Field(0.05, gt=0, description="L∞ budget in [-1,1] units (×127.5 for /255)")
    alpha: float = Field(0.005, gt=0, description="PGD step in [-1,1] units")
    instance_prompt: str = "a photo of sks person"
    pgd_steps: int = Field(100, ge=1, description="FSMG: PGD steps against the fine-tuned surrogate")
    fsmg_train_steps: int = Field(1000, ge=0, description="FSMG: DreamBooth steps on the clean references")
    fsmg_model: str | None = Field(None, description="FSMG: an already fine-tuned SD directory (skips training)")
    outer_loops: int = Field(50, ge=1, description="ASPL/SimAC outer loops")
    surrogate_steps: int = Field(3, ge=0, description="ASPL: training steps per phase")
    adv_steps: int = Field(6, ge=1, description="ASPL: PGD steps per outer loop")
    fsmg_batch_size: int = Field(
        2, ge=1, description="FSMG: instance images per DreamBooth step (plus as many class images), shuffled by "
        "the seeded generator, as Anti-DreamBooth's fsmg.py trains (batch 2, shuffle=True)")
    image_batch_size: int = Field(
        8, ge=1, description="photos per forward + backward in a PGD step; gradients accumulate over these "
        "micro-batches, so peak memory does not grow with the group size (results do not depend on it)")
    surrogate: SurrogateConfig = SurrogateConfig()
    simac: SimACConfig = SimACConfig()
    robust: RobustConfig = RobustConfig()

    @property
    def total_pgd_steps(self) -> int:
        return self.pgd_steps if self.method == "fsmg" else self.outer_loops * self.adv_steps


class BatchConfig(_Strict):
    """The Ray Data job: actors, batching and fault tolerance."""

    num_actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(1.0, ge=0, description="GPUs each protect actor requests, whatever the cluster "
                                  "has at submit time (a GPU group may scale from zero); 0 for CPU runs")
    cpus_per_actor: float = Field(1.0, ge=0)
    groups_per_batch: int = Field(1, ge=1)
    max_photos_per_identity: int = Field(64, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard")
    max_file_bytes: int = Field(50_000_000, ge=1)
    group_retries: int = Field(2, ge=0, description="extra attempts per group, counted across actor deaths")
    group_timeout_s: float = Field(3600.0, ge=0, description="a group running longer is stopped and recorded "
                                   "failed (0: no limit)")
    actor_error_limit: int = Field(2, ge=1, description="consecutive engine errors after which an actor is "
                                   "replaced (a sticky CUDA error is replaced at once)")
    io_retries: int = Field(5, ge=0, description="Ray Data retries (exponential backoff) of a decode or write "
                            "task that hit a transient storage error")
    lease_ttl_s: float = Field(120.0, gt=0, description="a lease on OUTPUT not renewed for this long is "
                               "abandoned and may be taken over")
    allowed_input_prefixes: list[str] = Field(default_factory=list, description="where manifest URIs may point "
                                              "besides the manifest's own folder")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options, e.g. endpoint_url")
    min_image_side: int = Field(8, ge=1, description="photos with a shorter side are refused")
    cpus_per_io_task: float = Field(0.5, gt=0, description="logical CPUs per decode / encode+write task")
    metrics_port: int | None = Field(None, description="serve Prometheus metrics from the driver on this port")
    actor_resources: dict[str, float] = Field(default_factory=dict,
                                              description="custom Ray resources per actor, e.g. {'protect': 1}")
    # scale (issue 10): streaming listing, done-check, batched commits, compaction, failure classes
    listing_batch: int = Field(256, ge=1, description="identities per listing/done-check task")
    listing_threads: int = Field(16, ge=1, description="concurrent LIST/HEAD/GET requests per listing task")
    listing_tasks: int = Field(4, ge=1, description="listing/done-check tasks at once")
    records_per_commit: int = Field(64, ge=1, description="identities committed per manifest Parquet file")
    manifest_rows_per_file: int = Field(10_000, ge=1, description="rows per file after compaction")
    compact_at_end: bool = Field(True, description="compact OUT/manifest at the end of every run")
    fail_on_input_errors: bool = Field(False, description="exit 3 (not 0) when identities failed for their input")
    # the nightly cycle (issue 24): bounded slices, time boxes, quarantine, cheap no-op nights
    slice_identities: int = Field(10_000, ge=1, description="identities to protect per slice: each slice is its "
                                  "own Ray Data execution, so the driver's memory stays flat at any library size")
    max_run_seconds: float = Field(0.0, ge=0, description="time box of one run (0: none): then no new identity "
                                   "starts, the ones in flight finish, and the run exits 1; the next run continues")
    stop_grace_s: float = Field(300.0, ge=0, description="after the time box (or SIGTERM), how long groups in "
                                "flight may finish before they are given back unfinished")
    quarantine_after: int = Field(3, ge=1, description="an identity that failed transiently in this many runs in a "
                                  "row, with unchanged input, is quarantined: skipped until retried with "
                                  "--retry-quarantined or its input changes")
    retry_quarantined: bool = Field(False, description="retry quarantined identities in this run "
                                    "(`capray protect --retry-quarantined`)")
    max_group_pixels: int = Field(400_000_000, ge=1, description="an identity whose photos hold more pixels in "
                                  "total fails for its input before any GPU work")
    on_added_photos: Literal["append", "reprotect"] = Field(
        "append", description="when an identity gains or replaces photos: 'append' protects only those, with its "
        "published protected photos held fixed in CAP's group (they are kept byte for byte: a published photo is "
        "never re-perturbed); 'reprotect' protects the whole group again (for outputs not yet published). "
        "Part of the config hash")
    manifest_delta_ratio: float = Field(0.1, gt=0, description="compaction writes a run's rows as delta files; "
                                        "when the deltas hold more than this fraction of the main files' rows, "
                                        "everything is merged into new main files")


class ServeConfig(_Strict):
    """The online endpoint (`capray serve`): HTTP, auth, the durable job store, limits, the Protector's autoscaling."""

    host: str = "127.0.0.1"
    port: int = 8000
    # -- who may call it ------------------------------------------------------------------------
    api_keys_file: str | None = Field(None, description="API keys, one per line (a mounted Secret; re-read when it "
                                      "changes); CAPRAY_API_KEYS (comma-separated) adds more")
    allow_unauthenticated: bool = Field(False, description="serve without keys on a non-loopback address")
    # -- where jobs live ------------------------------------------------------------------------
    store: str | None = Field(None, description="fsspec URI of the job store (s3://… in a cluster); "
                              "default: <capray cache>/serve-jobs")
    store_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for serve.store")
    job_ttl_s: float = Field(3600.0, gt=0, description="a finished job and its PNGs are deleted after this")
    job_timeout_s: float = Field(900.0, gt=0, description="a job running longer is failed and its slot freed")
    job_lease_s: float = Field(30.0, gt=0, description="a pending job whose runner stopped renewing this long "
                               "is picked up by another ingress replica")
    job_attempts: int = Field(2, ge=1, description="runs of one job (first + reruns after a lost runner)")
    # -- request limits, checked before the work they prevent ------------------------------------
    max_request_bytes: int = Field(100_000_000, ge=1, description="body size; larger is refused (413) while it streams")
    max_uploads_in_flight: int = Field(8, ge=1, description="request bodies one ingress replica reads at once (each "
                                       "up to max_request_bytes in memory); more are refused (503 + Retry-After)")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body may take this long, plus 1 s per "
                                  "min_body_bytes_per_s bytes it has sent; a slower one is refused (408)")
    min_body_bytes_per_s: int = Field(100_000, ge=1, description="the sustained upload rate a body must keep")
    max_jobs_per_key: int = Field(8, ge=1, description="one API key's pending jobs (cluster-wide) plus its requests "
                                  "in progress; more are refused (429 + Retry-After)")
    max_bytes_per_key_per_min: int = Field(500_000_000, ge=1, description="request-body bytes one API key may send "
                                           "each ingress replica per minute (429 + Retry-After)")
    max_photos: int = Field(16, ge=1)
    max_photo_bytes: int = Field(20_000_000, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, description="per photo (decompression-bomb guard)")
    max_request_pixels: int = Field(50_000_000, ge=1, description="all photos of one request together")
    min_image_side: int = Field(8, ge=1)
    max_pgd_steps: int = Field(300, ge=1, description="bound on a request's attack overrides")
    # -- deployments ----------------------------------------------------------------------------
    ingress_replicas: int = Field(2, ge=1, description="stateless (jobs live in serve.store): two avoid a single "
                                  "point of failure")
    min_replicas: int = Field(0, ge=0, description="0 scales to zero (the first request then waits for a model load)")
    max_replicas: int = Field(4, ge=1, description="at most one replica per GPU")
    target_ongoing_requests: float = Field(1.0, gt=0)
    max_ongoing_requests: int = Field(2, ge=1, description="keep above the target, or Serve never scales up")
    max_queued_requests: int = Field(16, ge=-1, description="per caller; beyond it requests are refused (503)")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    gpus_per_replica: float = Field(1.0, ge=0, description="0 on CPU-only clusters")
    cpus_per_replica: float = Field(1.0, ge=0)
    ingress_cpus: float = Field(0.25, ge=0)
    request_timeout_s: float = Field(900.0, gt=0, description="end-to-end HTTP timeout (the sync endpoint)")
    graceful_shutdown_timeout_s: float = Field(900.0, ge=0, description="let a running group finish on scale-down")

    @model_validator(mode="after")
    def _check_scaling(self) -> ServeConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"serve.max_replicas ({self.max_replicas}) < serve.min_replicas ({self.min_replicas})")
        if self.max_bytes_per_key_per_min < self.max_request_bytes:
            raise ValueError(f"serve.max_bytes_per_key_per_min ({self.max_bytes_per_key_per_min}) < "
                             f"serve.max_request_bytes ({self.max_request_bytes}): a largest request could never pass")
        if self.max_ongoing_requests <= self.target_ongoing_requests:
            raise ValueError("serve.max_ongoing_requests must exceed serve.target_ongoing_requests, "
                             "or the Protector never scales up")
        return self

    @property
    def capacity(self) -> int:
        """Jobs that may be pending at once: what the Protectors can run plus queue (more would only wait or fail)."""
        return self.max_replicas * self.max_ongoing_requests + max(self.max_queued_requests, 0)


class EvaluateConfig(_Strict):
    """`capray evaluate`: the attacker (DreamBooth as in Anti-DreamBooth's evaluation), metrics and transforms.

    Defaults are the paper's protocol (CAP §5, Anti-DB `train_dreambooth.py`): SD 2.1, batch 2, lr 5e-7,
    1000 steps, prior preservation, 16 images per prompt, 100 sampling steps, CFG 7.5.
    """

    train_steps: int = Field(1000, ge=0, description="DreamBooth steps per (identity, photo set)")
    learning_rate: float = Field(5e-7, gt=0)
    batch_size: int = Field(2, ge=1, description="instance images per step (plus as many class images)")
    prior_preservation: bool = True
    num_class_images: int = Field(200, ge=0)
    instance_prompt: str = "a photo of sks person"
    prompts: list[str] = Field(default_factory=lambda: ["a photo of sks person", "a dslr portrait of sks person"])
    images_per_prompt: int = Field(16, ge=1)
    sample_steps: int = Field(100, ge=1)
    guidance_scale: float = 7.5
    generation_batch_size: int = Field(4, ge=1)
    lora: bool = Field(False, description="train LoRA adapters (peft) on the UNet attention instead of full weights")
    lora_rank: int = Field(4, ge=1)
    lora_learning_rate: float = Field(1e-4, gt=0)
    transforms: list[str] = Field(
        default_factory=list, description="purifications the attacker applies before training: 'jpeg:75', "
        "'blur:1.5', 'resize:0.5', … or 'suite' for all of them (docs/evaluation.md#purifications)"
    )
    upscaler_model: str | None = Field(None, description="local directory of stabilityai/stable-diffusion-x4-"
                                       "upscaler for the noisy-upscaling purification; unset: it is unavailable")
    purifier_model: str | None = Field(None, description="SD-format directory for the diffusion purification "
                                       "(DiffPure-style img2img); unset: it is unavailable")
    face_backend: Literal["auto", "insightface", "opencv"] = Field(
        "auto", description="'insightface' = the paper's RetinaFace-R50 + ArcFace (weights needed); "
                            "'opencv' = YuNet + SFace"
    )
    insightface_root: str | None = Field(None, description="insightface model root (holds models/antelopev2)")
    clip_iqa_weights: str | None = Field(None, description="local CLIP directory (transformers format) for CLIP-IQA")
    serfiq_passes: int = Field(100, ge=2, description="SER-FIQ stochastic forward passes (T)")
    cpus_per_identity: float = Field(1.0, gt=0)


class OutputConfig(_Strict):
    """How protected photos are written: the same pixels in any choice, so none of it is in the config hash
    (a change applies to the photos protected from then on; published ones keep their files)."""

    format: Literal["png", "webp"] = Field(
        "png", description="'png', or 'webp' (lossless: the same pixels in fewer bytes; a photo over 16383 px a "
        "side is written as PNG)")
    keep_capture_time: bool = Field(True, description="keep the photo's EXIF date and time tags (capture and "
                                    "change time, time zone)")
    keep_location: bool = Field(False, description="keep the photo's GPS location (stripped by default)")


class ShardingConfig(_Strict):
    """Scoring one group's λ candidates on a pool of scoring actors as well as where the group runs.

    Never changes pixels (sharded == local), so it is outside the config hash. 'auto' lends a group
    runner only scoring actors that are idle at that moment and never waits for one; 'always' shares
    every ready scoring actor between the runners, busy or not (lowest latency for a lone group).
    """

    mode: Literal["off", "auto", "always"] = Field(
        "off", description="'off': score in the group runner; 'auto': also on scoring actors idle right now; "
        "'always': on every ready scoring actor, busy or not")
    actors: int = Field(2, ge=1, description="scoring actors in the pool (each holds SD + a phase's UNet)")
    gpus_per_actor: float = Field(1.0, ge=0, description="GPUs each scoring actor requests (0 on CPU clusters)")
    cpus_per_actor: float = Field(1.0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="pin torch threads per scoring actor (CPU runs)")
    cache_phases: int = Field(2, ge=1, description="phase states (UNet weights) a scoring actor keeps")
    shard_timeout_s: float = Field(300.0, gt=0, description="a shard not back in this long is re-scored locally "
                                   "and its actor replaced")


# The sections that decide a group's pixels: what a stored job keeps (never storage options or keys).
ENGINE_SECTIONS = ("seed", "model", "attack", "cap")
# What a stored Serve job keeps: those, and how its photos are written (jobs stored before it hold none).
JOB_SECTIONS = (*ENGINE_SECTIONS, "output")

# The config hash changes when pixels can, and only then, so an upgrade keeps every OUTPUT resumable.
# Settings added later are left out at the value that reproduces what ran before they existed.
HASH_NEUTRAL_WHEN_ADDED: dict[tuple[str, ...], Any] = {
    ("cap", "consistency_sign"): "descend",
    ("attack", "simac", "feature_reduction"): "sum",
}
# Settings that cannot change this config's pixels are hashed at the value they had when the hash was
# introduced: cap.candidate_batch_size only groups scoring calls. Only SimAC reads the SimAC settings
# whose default changed since (feature_detach, feature_reduction): other methods hash them as before.
HASHED_AS_BEFORE: dict[tuple[str, ...], Any] = {("cap", "candidate_batch_size"): 8}
SIMAC_CHANGED_DEFAULTS = {"feature_detach": False, "feature_reduction": "sum"}


def _hash_view(engine: dict[str, Any]) -> dict[str, Any]:
    """`engine_dict()` as the config hash sees it (HASH_NEUTRAL_WHEN_ADDED, HASHED_AS_BEFORE)."""
    view = json.loads(json.dumps(engine, default=str))
    if not view["attack"].get("robust", {}).get("enabled", False):
        view["attack"].pop("robust", None)  # off changes no pixel, whatever its other settings say
    if view["attack"]["method"] != "simac":
        view["attack"]["simac"].update(SIMAC_CHANGED_DEFAULTS)
    for path, value in HASH_NEUTRAL_WHEN_ADDED.items():
        *parents, leaf = path
        section = _section(view, parents)
        if section is not None and section.get(leaf) == value:
            section.pop(leaf)
    for path, value in HASHED_AS_BEFORE.items():
        *parents, leaf = path
        section = _section(view, parents)
        if section is not None and leaf in section:
            section[leaf] = value
    return view


def _section(tree: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree if isinstance(tree, dict) else None


class CaprayConfig(_Strict):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    attack: AttackConfig = AttackConfig()
    cap: CAPConfig = CAPConfig()
    batch: BatchConfig = BatchConfig()
    serve: ServeConfig = ServeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    sharding: ShardingConfig = ShardingConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _check(self) -> CaprayConfig:
        if self.attack.alpha > self.attack.eps:
            raise ValueError(f"alpha ({self.attack.alpha}) larger than eps ({self.attack.eps})")
        return self

    # -- identity of a run -------------------------------------------------------------------
    def engine_dict(self) -> dict[str, Any]:
        """The parts that decide output pixels (batch/serve/sharding plumbing excluded): the engine's
        settings, and which photos a rerun protects (`batch.on_added_photos`). The default 'append'
        adds nothing, so outputs written before the setting existed keep their hash and resume."""
        engine = self.model_dump(include=set(ENGINE_SECTIONS))
        if self.batch.on_added_photos != "append":
            engine["on_added_photos"] = self.batch.on_added_photos
        return engine

    def with_engine(self, engine: dict[str, Any]) -> CaprayConfig:
        """This config with ENGINE_SECTIONS (and `output`, where held) taken from `engine`, a stored job's
        settings (JOB_SECTIONS)."""
        taken = {k: engine[k] for k in JOB_SECTIONS if k in ENGINE_SECTIONS or k in engine}
        return CaprayConfig.model_validate({**self.model_dump(), **taken})

    def config_hash(self) -> str:
        blob = json.dumps(_hash_view(self.engine_dict()), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# -- presets ----------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # A few PGD steps and a small R: for trying things in seconds on a CPU with the tiny model.
    "smoke": {
        "model": {"sd": TINY_MODEL, "resolution": 64, "style_weights": "random"},
        "attack": {
            "pgd_steps": 4, "fsmg_train_steps": 2, "outer_loops": 2, "surrogate_steps": 1, "adv_steps": 2,
            "surrogate": {"num_class_images": 2, "class_sample_steps": 2},
            "simac": {"max_select_iters": 3, "samples_per_iter": 2, "keep_timesteps": 900},
        },
        "cap": {"ratio_max": 10},
        "evaluate": {"train_steps": 2, "num_class_images": 2, "prompts": ["a photo of sks person"],
                     "images_per_prompt": 2, "sample_steps": 2, "generation_batch_size": 2, "serfiq_passes": 10},
    },
    # The paper's settings (§5: α=0.005, η=0.05, k̂=K/2, R=100, VGG-19 first five conv layers).
    "paper": {
        "model": {"sd": REAL_SD_MODEL, "dtype": "bf16", "resolution": 512,
                  "style_weights": "imagenet"},
        "attack": {"eps": 0.05, "alpha": 0.005, "pgd_steps": 100, "outer_loops": 50, "adv_steps": 6,
                   "surrogate_steps": 3, "fsmg_train_steps": 1000},
        "cap": {"ratio_max": 100, "start_fraction": 0.5},
    },
    # Expectation over transformations with RobustConfig's documented ranges; composes with the others
    # ("smoke,robust", "paper,robust").
    "robust": {"attack": {"robust": {"enabled": True}}},
}


def preset_names(preset: str) -> list[str]:
    """'smoke,robust' → ['smoke', 'robust'], each checked; later presets win where they overlap."""
    names = [p.strip() for p in preset.split(",") if p.strip()]
    unknown = [p for p in names if p not in PRESETS]
    if unknown or not names:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}, or several joined by ','")
    return names


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """Turn ['attack.eps=0.03', 'cap.enabled=false'] into a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> CaprayConfig:
    """Preset(s), then YAML/JSON file, then explicit overrides (later wins)."""
    data: dict[str, Any] = {}
    for name in preset_names(preset) if preset else []:
        data = deep_merge(data, PRESETS[name])
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping")
        data = deep_merge(data, loaded)
    if overrides:
        data = deep_merge(data, overrides)
    return CaprayConfig.model_validate(data)
