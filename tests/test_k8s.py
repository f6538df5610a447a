"""k8s/ and deploy/: every manifest validates against KubeRay's CRD schemas and runs real capray commands.

The batch job ships twice: the one-off RayJob `capray-protect` and the nightly RayCronJob `capray-nightly`,
whose RayJob template (`spec.jobTemplate`, a RayJobSpec) is the same job plus a time box.

Rendering is kustomize-free (load the YAMLs, apply the JSON 6902 patches and the replacements the
kustomizations declare), so CI needs no kubectl; where kubectl is installed, its own render is
compared with ours. Validation uses the CRDs' v1 openAPIV3Schema made strict (additionalProperties:
false wherever properties are listed, as `kubeconform -strict` does), so misspelled fields fail.
The schemas are KubeRay's CRDs, vendored gzipped in tests/data/kuberay (source and commit in its README).

Security (docs/deploy.md#security-model) is checked on every rendered pod template: the "restricted" Pod
Security Standard plus a read-only root filesystem, Ray's token auth, a NetworkPolicy per workload, each
workload's own credentials only, the weight volume read-only but for the Job that fills it.
"""

from __future__ import annotations

import copy
import gzip
import json
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = ROOT / "tests" / "data" / "kuberay"
SERVE_YAML = ROOT / "deploy" / "serve_config.yaml"
LOCAL_CONFIG = "config.kubernetes.io/local-config"
TARGETS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu", "cpu-demo": K8S / "overlays" / "cpu-demo"}
CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices", "RayCronJob": "raycronjobs"}
JOB_KINDS = ("RayJob", "RayCronJob")  # the resources that run `capray protect` (or `capray demo`)
DAY_S = 86_400
START_AND_COMMIT_MARGIN_S = 1_800  # in a nightly deadline besides its time box: cluster start, commit, compaction
KNOWN_KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "components", "patches", "replacements"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# -- kustomize-free render ------------------------------------------------------------------------------

def _selected(doc: dict, select: dict) -> bool:
    return all(doc.get("kind") == v if k == "kind" else doc["metadata"].get(k) == v for k, v in select.items())


def _apply_patches(docs: list[dict], patches: list[dict], where: Path) -> None:
    import jsonpatch

    for patch in patches:
        assert set(patch) == {"target", "patch"}, f"{where}: only inline JSON 6902 patches are rendered here"
        ops = yaml.safe_load(patch["patch"])
        hits = [d for d in docs if _selected(d, patch["target"])]
        assert hits, f"{where}: patch target {patch['target']} matches nothing"
        for doc in hits:
            doc.update(jsonpatch.apply_patch(doc, ops))


def _get(doc, dotted: str):
    for part in dotted.split("."):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _apply_replacements(docs: list[dict], replacements: list[dict]) -> None:
    for rep in replacements:
        source = rep["source"]
        (src,) = [d for d in docs if _selected(d, {k: v for k, v in source.items() if k != "fieldPath"})]
        value = _get(src, source["fieldPath"])
        for target in rep["targets"]:
            hits = [d for d in docs if _selected(d, target["select"])]
            assert hits, f"replacement target {target['select']} matches nothing"
            for doc in hits:
                for path in target["fieldPaths"]:
                    *parents, leaf = path.split(".")
                    node = doc
                    for part in parents:
                        if isinstance(node, list):
                            node = node[int(part)]
                        else:
                            node = node.setdefault(part, {}) if target.get("options", {}).get("create") else node[part]
                    node[int(leaf) if isinstance(node, list) else leaf] = copy.deepcopy(value)


def _build(path: Path) -> list[dict]:
    kz = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(kz) - KNOWN_KUSTOMIZE_FIELDS
    assert not unknown, f"{path}: fields this renderer does not apply: {unknown}"
    docs: list[dict] = []
    for res in kz.get("resources", []):
        item = path / res
        docs += _build(item) if item.is_dir() else [d for d in yaml.safe_load_all(item.read_text()) if d]
    for comp in kz.get("components", []):  # kustomize: components run after resources, before own patches
        ckz = yaml.safe_load((path / comp / "kustomization.yaml").read_text())
        assert ckz["kind"] == "Component" and set(ckz) <= KNOWN_KUSTOMIZE_FIELDS
        for res in ckz.get("resources", []):
            docs += [d for d in yaml.safe_load_all((path / comp / res).read_text()) if d]
        _apply_patches(docs, ckz.get("patches", []), path / comp)
        _apply_replacements(docs, ckz.get("replacements", []))
    _apply_patches(docs, kz.get("patches", []), path)
    _apply_replacements(docs, kz.get("replacements", []))
    return docs


@cache
def _render_cached(name: str) -> str:
    docs = [d for d in _build(TARGETS[name]) if d["metadata"].get("annotations", {}).get(LOCAL_CONFIG) != "true"]
    return json.dumps(docs)


def render(name: str) -> list[dict]:
    return json.loads(_render_cached(name))


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def job_spec(doc: dict) -> dict:
    """The RayJobSpec a RayJob runs, or the one a RayCronJob makes each night's RayJob from."""
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def cluster_specs(docs: list[dict]) -> list[dict]:
    out = [job_spec(d)["rayClusterSpec"] for d in docs if d["kind"] in JOB_KINDS]
    return out + [d["spec"]["rayClusterConfig"] for d in docs if d["kind"] == "RayService"]


def job_command(spec: dict):
    """(args, config) of a job's entrypoint, parsed by capray's own CLI parser: an unknown command, option or
    --set key fails the test."""
    from capray.cli import build_parser
    from capray.config import load_config, parse_set

    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "capray"
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown command or option
    if args.command == "protect":
        from capray.batch.command import build_config

        return args, build_config(args)
    assert args.command == "demo"
    return args, load_config(preset="smoke", overrides=parse_set(args.set))


def pod_templates(spec: dict) -> list[dict]:
    """Every pod template of one Ray cluster spec: the head's, then each worker group's."""
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def gpu_group(spec: dict) -> dict:
    (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    return group


CREDENTIAL_LABEL = "capray.io/workload"


def without_credentials(spec: dict) -> dict:
    """The cluster spec without what components/workload-credentials adds per workload."""
    spec = copy.deepcopy(spec)
    for template in pod_templates(spec):
        template["metadata"]["labels"].pop(CREDENTIAL_LABEL, None)
        pod = template["spec"]
        pod.pop("serviceAccountName", None)
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "api-keys"]
        for c in pod["containers"]:
            c.pop("envFrom", None)
            c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "api-keys"]
    return spec


# -- strict CRD schemas ---------------------------------------------------------------------------------

def _strict(node):
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _crd(plural: str) -> dict:
    return yaml.load(gzip.decompress((SCHEMAS / f"ray.io_{plural}.yaml.gz").read_bytes()), Loader=Loader)


@pytest.fixture(scope="module")
def validators():
    import jsonschema

    out = {}
    for kind, plural in CRDS.items():
        crd = _crd(plural)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return out


def _errors(validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# -- tests ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TARGETS)
def test_render_equals_kubectl_kustomize(name):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(TARGETS[name])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out.stdout), key=key) == sorted(render(name), key=key)


@pytest.mark.parametrize("name", TARGETS)
def test_every_manifest_validates_against_the_kuberay_crds(name, validators):
    docs = render(name)
    assert {d["kind"] for d in docs} >= {"RayJob", "RayCronJob", "RayService"}
    for doc in docs:
        if doc["apiVersion"] == "ray.io/v1":
            assert _errors(validators[doc["kind"]], doc) == [], (name, doc["kind"])
            if doc["kind"] == "RayCronJob":  # each night's RayJob also validates as a RayJob
                rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"}, "spec": job_spec(doc)}
                assert _errors(validators["RayJob"], rayjob) == []
            for spec in cluster_specs([doc]):  # the embedded cluster also validates as a RayCluster
                cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"}, "spec": spec}
                assert _errors(validators["RayCluster"], cluster) == []
        elif doc["kind"] == "Job":
            assert doc["apiVersion"] == "batch/v1" and doc["metadata"]["name"] == "capray-models-fetch"
        elif doc["kind"] == "NetworkPolicy":
            assert doc["apiVersion"] == "networking.k8s.io/v1" and doc["spec"]["policyTypes"] == ["Ingress"]
        elif doc["kind"] == "ServiceAccount":
            assert doc["apiVersion"] == "v1" and doc["automountServiceAccountToken"] is False
        else:
            assert (doc["apiVersion"], doc["kind"]) == ("v1", "PersistentVolumeClaim"), doc["kind"]
            assert doc["spec"]["accessModes"] and doc["spec"]["resources"]["requests"]["storage"]


def test_strict_validation_catches_misspelled_and_mistyped_fields(validators):
    job = one(render("base"), "RayJob")
    bad = copy.deepcopy(job)
    cluster = bad["spec"]["rayClusterSpec"]
    cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")
    assert any("workerGroupSpec" in e for e in _errors(validators["RayJob"], bad))
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "one"
    assert any("minReplicas" in e for e in _errors(validators["RayJob"], bad))
    cron = one(render("base"), "RayCronJob")
    bad = copy.deepcopy(cron)
    bad["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupname"] = "gpu"
    assert any("groupname" in e for e in _errors(validators["RayCronJob"], bad))
    bad = copy.deepcopy(cron)
    bad["spec"]["concurrencyPolicy"] = "Forbid"  # batch/v1 CronJob's field: this CRD has none (see the manifest)
    assert any("concurrencyPolicy" in e for e in _errors(validators["RayCronJob"], bad))


@pytest.mark.parametrize("name", TARGETS)
def test_embedded_serve_config_runs_the_capray_app(name):
    from capray.serve.app import serve_config_problems

    docs = render(name)
    serve_cfg = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    assert serve_config_problems(serve_cfg) == []
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "capray.serve.app:build_app"
    protector = next(d for d in app["deployments"] if d["name"] == "Protector")
    gpus_in_cluster = "nvidia.com/gpu" in json.dumps(one(docs, "RayService")["spec"]["rayClusterConfig"])
    assert (protector["ray_actor_options"]["num_gpus"] > 0) == gpus_in_cluster
    if name != "cpu-demo":
        assert serve_cfg == yaml.safe_load(SERVE_YAML.read_text())  # RayService serves deploy/serve_config.yaml
    # a pod must outlive Serve's graceful shutdown, or a running group is killed mid-PGD
    grace = protector["graceful_shutdown_timeout_s"]
    for spec in cluster_specs(docs):
        for group in spec.get("workerGroupSpecs", []):
            assert group["template"]["spec"]["terminationGracePeriodSeconds"] >= grace


@pytest.mark.parametrize("kind", JOB_KINDS)
@pytest.mark.parametrize("name", TARGETS)
def test_rayjob_entrypoint_is_a_real_capray_command(name, kind):
    args, cfg = job_command(job_spec(one(render(name), kind)))
    if args.command == "protect":
        assert args.input.startswith("s3://") and args.output.startswith("s3://")
        assert not args.output.startswith(args.input.rstrip("/") + "/")
        assert cfg.model.sd == "stabilityai/stable-diffusion-2-1-base"
    else:
        assert name == "cpu-demo"


@pytest.mark.parametrize("kind", JOB_KINDS)
@pytest.mark.parametrize("name", TARGETS)
def test_rayjob_requests_gpus_exactly_when_its_cluster_has_them_and_reruns_at_most_once(name, kind):
    spec = job_spec(one(render(name), kind))
    _, cfg = job_command(spec)
    has_gpus = "nvidia.com/gpu" in json.dumps(spec["rayClusterSpec"])
    assert (cfg.batch.gpus_per_actor > 0) == has_gpus  # actors never wait for a GPU that cannot come, nor share one
    assert spec["backoffLimit"] <= 1  # a rerun resumes; bad input alone never triggers one


@pytest.mark.parametrize("name", TARGETS)
def test_the_nightly_runs_the_one_off_job_with_a_time_box(name):
    """Same command, output and cluster as the RayJob; only the time box, its deadline and the retries differ."""
    docs = render(name)
    once, nightly = job_spec(one(docs, "RayJob")), job_spec(one(docs, "RayCronJob"))
    (once_args, once_cfg), (nightly_args, nightly_cfg) = job_command(once), job_command(nightly)
    time_box = {"batch.max_run_seconds", "batch.stop_grace_s"}
    assert {s.split("=", 1)[0] for s in nightly_args.set} >= time_box
    assert [s for s in nightly_args.set if s.split("=", 1)[0] not in time_box] == once_args.set
    assert {**vars(nightly_args), "set": None} == {**vars(once_args), "set": None}
    assert nightly_cfg.batch.max_run_seconds > 0 and once_cfg.batch.max_run_seconds == 0  # one-off: no time box
    differ = {"entrypoint", "activeDeadlineSeconds", "backoffLimit"}
    assert {k: v for k, v in nightly.items() if k not in differ} == {k: v for k, v in once.items() if k not in differ}
    assert nightly["backoffLimit"] == 0  # the next night is the retry


@pytest.mark.parametrize("name", TARGETS)
def test_the_nightly_stops_itself_before_kubernetes_would_and_before_the_next_night(name):
    from zoneinfo import ZoneInfo

    cron = one(render(name), "RayCronJob")
    assert len(cron["metadata"]["name"]) <= 36  # KubeRay appends "-<unix minute>" for each night's RayJob
    minute, hour, *every = cron["spec"]["schedule"].split()
    assert 0 <= int(minute) < 60 and 0 <= int(hour) < 24 and every == ["*", "*", "*"]  # once a day
    zone = cron["spec"]["timeZone"]  # set: the default is the operator's local zone
    assert zone == "UTC" or ZoneInfo(zone)  # "UTC" needs no zone database, in Go as here
    spec = job_spec(cron)
    _, cfg = job_command(spec)
    stops_by = cfg.batch.max_run_seconds + cfg.batch.stop_grace_s
    # Kubernetes never kills a run that is stopping itself (the margin: cluster start, commit, compaction) ...
    assert stops_by + START_AND_COMMIT_MARGIN_S <= spec["activeDeadlineSeconds"]
    # ... and every night is over before the next one starts: KubeRay starts each night's RayJob regardless
    assert spec["activeDeadlineSeconds"] < DAY_S
    assert cron["spec"].get("suspend") is not True  # rendered to run


def test_overlapping_nights_are_forbidden_where_the_crd_allows_it(validators):
    """This CRD has no concurrencyPolicy (the test above bounds each night instead); should a KubeRay update add
    one, the nightly must set it to Forbid."""
    crd = _crd("raycronjobs")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    fields = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for name in TARGETS:
        spec = one(render(name), "RayCronJob")["spec"]
        if "concurrencyPolicy" in fields:
            assert spec.get("concurrencyPolicy") == "Forbid", name
        else:
            assert "concurrencyPolicy" not in spec


@pytest.mark.parametrize("name", ["base", "gpu"])
def test_gpu_clusters_have_the_essentials(name):
    import ray

    import capray

    docs = render(name)
    specs = cluster_specs(docs)
    shared = [without_credentials(s) for s in specs]
    assert len(specs) == 3 and shared[0] == shared[1] == shared[2]  # one shared spec: one-off, nightly, online
    spec = specs[0]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    worker = gpu_group(spec)
    assert worker["minReplicas"] == 0 <= worker["maxReplicas"]
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert "ray stop" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    for template in (spec["headGroupSpec"]["template"], worker["template"]):
        (c,) = template["spec"]["containers"]
        assert c["image"].rsplit(":", 1)[1] == capray.__version__
        notes = template["metadata"]["annotations"]
        metrics_ports = [p["containerPort"] for p in c["ports"] if p["name"] == "metrics"]
        assert notes["prometheus.io/scrape"] == "true" and metrics_ports == [int(notes["prometheus.io/port"])]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["HF_HUB_OFFLINE"] == "1"
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for var in ("HF_HOME", "TORCH_HOME"):  # the weights live on the (read-only) weight volume
            assert env[var].startswith(mounts["models"] + "/"), var
        scratch = [m for m in mounts if "emptyDir" in volumes[m] and env["CAPRAY_CACHE"].startswith(mounts[m] + "/")]
        assert scratch, "capray's own cache (class images) must be on a writable emptyDir"
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] in claims


@pytest.mark.parametrize("name", ["base", "gpu"])
def test_the_models_fetch_job_fills_the_caches_the_ray_pods_read(name):
    """`capray models fetch --cache ROOT` fills ROOT/huggingface and ROOT/torch: the pods' HF_HOME, TORCH_HOME."""
    from capray.cli import build_parser
    from capray.models.fetch import CacheDirs

    docs = render(name)
    job = one(docs, "Job")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    args = build_parser().parse_args(container["command"][1:])
    assert container["command"][0] == "capray" and (args.command, args.models_command) == ("models", "fetch")
    dirs = CacheDirs.at(args.cache)
    assert "HF_HUB_OFFLINE" not in {e["name"] for e in container.get("env", [])}  # this pod downloads
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "models"]
    assert not mount.get("readOnly")  # the one writer of the weight volume
    claim = {v["name"]: v for v in job["volumes"]}[mount["name"]]["persistentVolumeClaim"]["claimName"]
    spec = cluster_specs(docs)[0]
    for template in (spec["headGroupSpec"]["template"], gpu_group(spec)["template"]):
        (c,) = template["spec"]["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        pod_mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["models"]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim
        assert pod_mount == mount["mountPath"] and c["image"] == container["image"]
        assert Path(env["HF_HOME"]) / "hub" == dirs.hub
        assert Path(env["TORCH_HOME"]) / "hub" / "checkpoints" == dirs.checkpoints
    if name == "gpu":  # `kubectl apply -k overlays/gpu/models` (applied first) renders the same Job and volume
        alone = _build(K8S / "overlays" / "gpu" / "models")
        assert {d["kind"] for d in alone} == {"Job", "PersistentVolumeClaim"} and one(alone, "Job") == one(docs, "Job")


def test_cpu_demo_needs_no_gpu_and_no_volume():
    docs = render("cpu-demo")
    text = json.dumps(docs)
    assert "nvidia.com/gpu" not in text and "persistentVolumeClaim" not in text
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    for spec in cluster_specs(docs):
        assert "workerGroupSpecs" not in spec and int(spec["headGroupSpec"]["rayStartParams"]["num-cpus"]) > 0


def test_dockerfile_builds_capray_on_the_python_the_tests_run():
    import re
    import tomllib

    from capray.cli import COMMANDS

    lines = [line.strip() for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()]
    makefile_python = re.search(r"^PY \?= python(3\.\d+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"ARG BASE_IMAGE=python:{makefile_python}-slim-bookworm" in lines  # the interpreter constraints.txt fits
    assert any(line.startswith(f"&& python{makefile_python} -m venv") for line in lines)
    copied = [src for line in lines if line.startswith("COPY ") for src in line.split()[1:-1]]
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    assert {"pyproject.toml", readme, "capray"} <= set(copied)  # what `pip install .` needs
    assert all((ROOT / src).exists() for src in copied if src != readme)  # README.md is the lead's
    (cmd,) = [json.loads(line[4:]) for line in lines if line.startswith("CMD ")]
    assert cmd[0] == "capray" and cmd[1] in COMMANDS
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:] and all(f"!{src}" in ignore or f"!{src}/" in ignore for src in copied)


@pytest.mark.parametrize("name", TARGETS)
def test_the_endpoint_reads_its_api_keys_from_the_mounted_secret(name):
    """Every pod that can host the Serve ingress mounts the capray-api-keys Secret where serve.api_keys_file points."""
    from capray.serve.app import ServeArgs
    from capray.serve.auth import KeyRing, check_exposure

    service = one(render(name), "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    keys_file = ServeArgs.model_validate(app["args"]).load().serve.api_keys_file
    assert keys_file, "a RayService listens on 0.0.0.0: it needs API keys"
    spec = service["spec"]["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    for template in templates:
        secrets = {v["name"]: v["secret"]["secretName"] for v in template["spec"]["volumes"] if "secret" in v}
        (container,) = template["spec"]["containers"]
        mounted = [m for m in container["volumeMounts"] if secrets.get(m["name"]) == "capray-api-keys"]
        assert [m["mountPath"] + "/keys" for m in mounted] == [keys_file], template["metadata"]["labels"]
    with pytest.raises(ValueError, match="no API keys"):  # the Secret missing: the ingress refuses to start
        check_exposure("0.0.0.0", KeyRing(keys_file, env=""), allow_unauthenticated=False)


@pytest.mark.parametrize("name", TARGETS)
def test_every_serve_proxy_refuses_oversized_bodies_before_buffering_them(name):
    """Serve runs a proxy on every node (proxy_location: EveryNode); each reads the body limit from its pod's env."""
    from capray.serve.app import ServeArgs
    from capray.serve.body_limit import missing_guard, proxy_env

    service = one(render(name), "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    limit = ServeArgs.model_validate(app["args"]).load().serve.max_request_bytes
    spec = service["spec"]["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    for template in templates:
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert missing_guard(limit, env) is None, template["metadata"]["labels"]
        assert {k: env[k] for k in proxy_env(limit)} == proxy_env(limit)  # the same limit, not a larger one


# -- security (docs/deploy.md#security-model) -----------------------------------------------------------

def all_pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod k8s/ makes: Ray heads and workers, job submitters, the fetch Job."""
    out = []
    for doc in docs:
        name = doc["metadata"]["name"]
        if doc["kind"] == "Job":
            out.append((name, doc["spec"]["template"]))
        if doc["kind"] in JOB_KINDS:
            out.append((f"{name}/submitter", job_spec(doc)["submitterPodTemplate"]))
    for doc in docs:
        for spec in cluster_specs([doc]):
            out += [(f"{doc['metadata']['name']}/{i}", t) for i, t in enumerate(pod_templates(spec))]
    return out


def restricted_problems(template: dict) -> list[str]:
    """Where a pod template falls short of the "restricted" Pod Security Standard or a read-only root."""
    pod = template["spec"]
    problems = []
    if any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
        problems.append("host namespaces")
    allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
               "secret"}
    problems += [f"volume {v['name']}" for v in pod.get("volumes", []) if not set(v) - {"name"} <= allowed]
    pod_ctx = pod.get("securityContext", {})
    for c in pod["containers"] + pod.get("initContainers", []):
        ctx = c.get("securityContext", {})
        merged = {**pod_ctx, **ctx}
        if merged.get("runAsNonRoot") is not True or merged.get("runAsUser") == 0:
            problems.append(f"{c['name']}: may run as root")
        if (merged.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{c['name']}: no seccomp profile")
        if ctx.get("allowPrivilegeEscalation") is not False or ctx.get("privileged"):
            problems.append(f"{c['name']}: privilege escalation")
        caps = ctx.get("capabilities") or {}
        if caps.get("drop") != ["ALL"] or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{c['name']}: capabilities not dropped")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{c['name']}: writable root filesystem")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{c['name']}: host port")
    return problems


@pytest.mark.parametrize("name", TARGETS)
def test_every_pod_meets_the_restricted_pod_security_standard_with_a_read_only_root(name):
    docs = render(name)
    templates = all_pod_templates(docs)
    assert len(templates) >= (5 if name == "cpu-demo" else 12)  # cpu-demo: one pod per cluster, no fetch Job
    for where, template in templates:
        assert restricted_problems(template) == [], where
        pod = template["spec"]
        assert pod.get("automountServiceAccountToken") is False, where  # nothing here talks to the k8s API
        for c in pod["containers"]:  # a read-only root needs explicit scratch space
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in {v["name"]: v for v in pod["volumes"]}[tmp[0]["name"]], where
    for spec in cluster_specs(docs):  # the autoscaler sidecar runs in the head pod
        if spec.get("enableInTreeAutoscaling"):
            ctx = spec["autoscalerOptions"]["securityContext"]
            assert ctx["runAsNonRoot"] and ctx["readOnlyRootFilesystem"] and ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"] and ctx["seccompProfile"]["type"] == "RuntimeDefault"


def test_the_restricted_check_catches_what_it_should():
    (_, template), *_ = all_pod_templates(render("base"))
    assert restricted_problems(template) == []
    for mutate in (lambda p: p["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
                   lambda p: p["securityContext"].pop("runAsNonRoot"),
                   lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
                   lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}})):
        bad = copy.deepcopy(template)
        mutate(bad["spec"])
        assert restricted_problems(bad), mutate


@pytest.mark.parametrize("name", TARGETS)
def test_ray_control_plane_needs_a_token_and_only_the_endpoint_port_is_open(name):
    docs = render(name)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    by_workload = {p["spec"]["podSelector"]["matchLabels"][CREDENTIAL_LABEL]: p for p in policies}
    assert set(by_workload) == {"batch", "serve"}
    for doc in docs:
        for spec in cluster_specs([doc]):
            assert spec["authOptions"]["mode"] == "token", doc["metadata"]["name"]
            labels = {t["metadata"]["labels"].get(CREDENTIAL_LABEL) for t in pod_templates(spec)}
            (workload,) = labels  # every pod of a cluster is fenced by its workload's policy
            assert workload == ("serve" if doc["kind"] == "RayService" else "batch")
        if doc["kind"] in JOB_KINDS:  # the submitter reaches the dashboard as one of the job's own pods
            assert job_spec(doc)["submitterPodTemplate"]["metadata"]["labels"][CREDENTIAL_LABEL] == "batch"
    for workload, policy in by_workload.items():
        for rule in policy["spec"]["ingress"]:
            ports = {p["port"] for p in rule.get("ports", [])}
            sources = rule.get("from")
            if not sources:  # open to every client: only the endpoint, which authenticates each call
                assert workload == "serve" and ports == {8000}, rule
            elif not ports:  # every port: only from the same workload's pods
                assert sources == [{"podSelector": {"matchLabels": {CREDENTIAL_LABEL: workload}}}], rule
            else:  # other namespaces (the operator, Prometheus): never GCS or the Ray client
                assert all("namespaceSelector" in s and "podSelector" not in s for s in sources), rule
                assert not ports & {6379, 10001}, rule


def _env_secrets(container: dict) -> set[str]:
    return {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}


@pytest.mark.parametrize("name", TARGETS)
def test_each_workload_gets_only_its_own_credentials_and_reads_the_weights_read_only(name):
    docs = render(name)
    for doc in docs:
        for spec in cluster_specs([doc]):
            online = doc["kind"] == "RayService"
            for template in pod_templates(spec):
                pod = template["spec"]
                (c,) = pod["containers"]
                secrets = _env_secrets(c) | {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
                if online:
                    assert "capray-s3" not in secrets  # never the photo library's keys
                    assert secrets <= {"capray-serve-s3", "capray-api-keys"}
                else:
                    assert "capray-api-keys" not in secrets and secrets <= {"capray-s3"}
                models = [m for m in c["volumeMounts"] if m["name"] == "models"]
                assert models and all(m.get("readOnly") for m in models), doc["metadata"]["name"]
                if name != "cpu-demo":
                    account = pod["serviceAccountName"]
                    assert account == ("capray-serve" if online else "capray-batch")
    if name != "cpu-demo":
        accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
        assert accounts == {"capray-batch", "capray-serve"}


@pytest.mark.parametrize("name", ["base", "gpu"])
def test_cpu_work_has_its_own_worker_group_that_scales_to_zero(name):
    for spec in cluster_specs(render(name)):
        cpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" not in json.dumps(g)]
        (group,) = cpu
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        assert "tolerations" not in group["template"]["spec"]  # never lands on (or holds) a GPU node
