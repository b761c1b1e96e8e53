"""The Kubernetes deployment (k8s/) and the Ray cluster configs (ray/), checked offline.

The helm chart k8s/helm/aios-train is rendered in-process with helm-python-sdk (the Helm Go SDK, no helm
binary, no cluster) for its default values, values-gpu.yaml and values-cpu.yaml. What it renders is checked
against the schemas the cluster would check it with: each RayJob against the KubeRay CRD's own OpenAPI
schema (the CRDs are read from ../shared/kuberay/crds next to the repository, or $AIOS_KUBERAY_CRDS), made
strict the way the API server is (unknown fields are errors), plus the operator's own checks of a RayJob;
its pod templates and the core objects (the example Secret, the MinIO Deployment/Service/Job) against
Kubernetes' schemas (kubernetes-validate, strict). The entrypoint it renders goes through the project's
real CLI parser, so an unknown flag or a bad value fails here, not in a pod.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, HelmError, lint, values_from_yaml

from aios.cli.hrm_hf import parse_cli_args
from aios.cluster.job import anywhere_problem

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CHART = K8S / "helm" / "aios-train"
CRDS_ENV = "AIOS_KUBERAY_CRDS"
RAYJOB_CRD = "ray.io_rayjobs.yaml"
RELEASE, NAMESPACE = "demo", "ml"
ENTRYPOINT_PREFIX = ["aios", "hrm-hf", "train-actv1"]
# Names of variables that hold a credential: they may come from a Secret, never as a literal value.
SECRET_NAME = re.compile(r"SECRET|KEY|PASSW|TOKEN|CREDENTIAL", re.IGNORECASE)
VALUE_FILES = {"default": None, "gpu": "values-gpu.yaml", "cpu": "values-cpu.yaml"}
KUBE_VERSION = kubernetes_validate.latest_version()

try:
    YAML_LOADER = yaml.CSafeLoader  # the CRD is 1.4 MB: 0.5 s with libyaml, several without
except AttributeError:  # pragma: no cover
    YAML_LOADER = yaml.SafeLoader


# ---- helpers ---------------------------------------------------------------------------------------------

def values_of(name: str) -> dict:
    """The values of VALUE_FILES[name] as `helm -f` reads them ({} for the defaults)."""
    file = VALUE_FILES[name]
    return values_from_yaml((CHART / file).read_text()) if file else {}


def expected(name: str) -> dict:
    """The values a render of VALUE_FILES[name] uses: values.yaml with the file over it (as YAML reads it)."""
    file = VALUE_FILES[name]
    layers = [yaml.safe_load((CHART / "values.yaml").read_text())]
    return merged(*layers, yaml.safe_load((CHART / file).read_text())) if file else layers[0]


def merged(*layers: dict) -> dict:
    """Values layered as several -f files are: later mappings win, key by key."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def manifests(rendered: dict[str, str]) -> list[dict]:
    """The Kubernetes objects of a render (NOTES.txt is text for the user, not a manifest)."""
    return [doc for path, text in rendered.items() if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def the_rayjob(objects: list[dict]) -> dict:
    jobs = [obj for obj in objects if obj.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"expected one RayJob, got {[obj.get('kind') for obj in objects]}"
    return jobs[0]


def ray_pod_specs(rayjob: dict) -> dict[str, dict]:
    """The pod spec of the head and of every worker group, by group."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster.get("workerGroupSpecs", []):
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def all_containers(pod_spec: dict) -> list[dict]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def pod_specs_of(objects: list[dict]) -> list[dict]:
    """Every pod spec in the objects: the RayJob's pods and the Deployment's and Job's templates."""
    specs = []
    for obj in objects:
        if obj["kind"] == "RayJob":
            specs += ray_pod_specs(obj).values()
        elif obj["kind"] in ("Deployment", "Job"):
            specs.append(obj["spec"]["template"]["spec"])
    return specs


def parse_entrypoint(entrypoint: str):
    """The TrainingConfig `aios` would train with, through the real CLI parser (cwd: the repository root,
    which is the image's working directory)."""
    words = shlex.split(entrypoint)
    assert words[:3] == ENTRYPOINT_PREFIX, f"the entrypoint does not start with `aios hrm-hf train-actv1`: {entrypoint}"
    return parse_cli_args(words[3:])


# ---- the KubeRay CRD, as a strict JSON schema ---------------------------------------------------------

def crds_dir() -> Path:
    """Where the KubeRay CRDs are: $AIOS_KUBERAY_CRDS, else ../shared/kuberay/crds beside the repository."""
    return Path(os.environ.get(CRDS_ENV) or REPO.parent / "shared" / "kuberay" / "crds")


def structural(schema):
    """A CRD's OpenAPI v3 schema as JSON Schema that checks what the API server checks: an object with
    listed properties takes no others (the server prunes or, with strict field validation, refuses them),
    x-kubernetes-int-or-string is integer or string, nullable admits null."""
    if isinstance(schema, list):
        return [structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = structural(value)
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: no two items with the same keys (two containers named alike, ...)."""
    if not validator.is_type(instance, "array"):
        return
    seen: dict = {}
    for index, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(item.get(name) for name in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"items {seen[key]} and {index} have the same {keys}: {key}")
            seen[key] = index


CRDValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys})


@pytest.fixture(scope="module")
def rayjob_schema():
    """A validator for RayJob ray.io/v1 (the served v1 version of the CRD), loaded once per module."""
    path = crds_dir() / RAYJOB_CRD
    if not path.is_file():
        where = (f"${CRDS_ENV}" if os.environ.get(CRDS_ENV) else
                 f"the default, ../shared/kuberay/crds next to the repository {REPO}; set ${CRDS_ENV} to look elsewhere")
        pytest.skip(f"the KubeRay CRDs are absent: no {path} (from {where}), so the RayJobs were not checked "
                    f"against the KubeRay CRD")
    crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
    version = next((v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served")), None)
    assert version is not None, f"{path} serves no ray.io/v1 version"
    return CRDValidator(structural(version["schema"]["openAPIV3Schema"]))


def kuberay_problems(rayjob: dict) -> list[str]:
    """What the KubeRay operator itself refuses in a RayJob (its ValidateRayJobMetadata/Spec, the
    x-kubernetes-validations rules of the CRD the schema above cannot run), as messages."""
    problems = []
    name, spec = rayjob["metadata"]["name"], rayjob["spec"]
    if len(name) > 47:  # KubeRay: MaxRayClusterNameLength (53) minus the 6 characters it appends
        problems.append(f"name {name!r} is longer than 47 characters")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"name {name!r} is not a DNS-1035 label")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        problems.append("activeDeadlineSeconds must be positive")
    if spec.get("backoffLimit", 0) < 0:
        problems.append("backoffLimit must not be negative")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        problems.append("InteractiveMode does not support backoffLimit")
    if mode == "SidecarMode" and ("submitterConfig" in spec or "submitterPodTemplate" in spec):
        problems.append("SidecarMode supports no submitterConfig / submitterPodTemplate")
    cluster = spec.get("rayClusterSpec")
    if cluster is None:
        return problems + ["no rayClusterSpec"]
    for group, pod in ray_pod_specs(rayjob).items():
        if not pod.get("containers"):
            problems.append(f"{group} has no container")
    for group in cluster.get("workerGroupSpecs", []):
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            problems.append(f"worker group {group['groupName']}: replicas outside minReplicas..maxReplicas")
    return problems


# ---- renders, once per module ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chart():
    with Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def renders(chart) -> dict[str, dict[str, str]]:
    return {name: chart.render(values_of(name) or None, name=RELEASE, namespace=NAMESPACE) for name in VALUE_FILES}


@pytest.fixture(scope="module")
def objects(renders) -> dict[str, list[dict]]:
    return {name: manifests(rendered) for name, rendered in renders.items()}


def render(chart, values: dict, name: str = RELEASE) -> list[dict]:
    return manifests(chart.render(values, name=name, namespace=NAMESPACE))


@pytest.fixture(autouse=True)
def _in_repository_root(monkeypatch):
    """Relative paths in the entrypoint mean the image's working directory: the repository's root."""
    monkeypatch.chdir(REPO)


# ---- the chart renders and lints ------------------------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_FILES)
def test_chart_lints_clean(name):
    report = lint(CHART, values_of(name) or None, strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report  # warnings and errors


def test_renders_what_each_values_file_asks_for(objects, renders):
    assert [obj["kind"] for obj in objects["default"]] == ["RayJob"]
    assert [obj["kind"] for obj in objects["gpu"]] == ["RayJob"]
    assert sorted(obj["kind"] for obj in objects["cpu"]) == ["Deployment", "Job", "RayJob", "Service"]
    for obj in (o for objs in objects.values() for o in objs):
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    notes = renders["default"]["aios-train/templates/NOTES.txt"]
    assert "port-forward" in notes and "-head-svc 8265:8265" in notes and "kubectl get rayjob" in notes


# ---- the RayJob against the KubeRay CRD ------------------------------------------------------------------

def plain_rayjob() -> dict:
    return yaml.safe_load((K8S / "rayjob.yaml").read_text())


@pytest.mark.parametrize("name", [*VALUE_FILES, "k8s/rayjob.yaml"])
def test_rayjob_validates_against_the_kuberay_crd(name, objects, rayjob_schema):
    rayjob = plain_rayjob() if name == "k8s/rayjob.yaml" else the_rayjob(objects[name])
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in rayjob_schema.iter_errors(rayjob)]
    assert errors == []
    assert kuberay_problems(rayjob) == []


def test_the_crd_check_catches_what_the_api_server_would_refuse(objects, rayjob_schema):
    """The strict schema is not a rubber stamp: an unknown field, a wrong type, a duplicate container."""
    rayjob = the_rayjob(objects["gpu"])
    typo = copy.deepcopy(rayjob)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    wrong_type = copy.deepcopy(rayjob)
    wrong_type["spec"]["backoffLimit"] = "3"
    twice = copy.deepcopy(rayjob)
    containers = twice["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))
    for broken in (typo, wrong_type, twice):
        assert list(rayjob_schema.iter_errors(broken)), "the CRD schema accepted a broken RayJob"


@pytest.mark.parametrize("name", VALUE_FILES)
def test_ray_pod_templates_are_valid_kubernetes_pods(name, objects):
    rayjob = the_rayjob(objects[name])
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]})
    for group, template in templates.items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{group}-template"},
                        "template": template}
        kubernetes_validate.validate(pod_template, KUBE_VERSION, strict=True)


def test_plain_rayjob_manifest_is_what_the_chart_renders_for_gpu(chart):
    """k8s/rayjob.yaml is the chart's GPU render, tidied: the same spec, so the two cannot drift apart."""
    values = merged(values_of("gpu"), {"fullnameOverride": "aios-hrm27m"})
    rendered = the_rayjob(render(chart, values, name="hrm27m"))
    plain = plain_rayjob()
    assert plain["metadata"]["name"] == rendered["metadata"]["name"]
    assert plain["spec"] == rendered["spec"]


# ---- the cluster the RayJob asks for ---------------------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_FILES)
def test_ray_cluster_shape(name, objects):
    values = expected(name)
    cluster = the_rayjob(objects[name])["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training worker lands on the head
    [group] = cluster["workerGroupSpecs"]
    workers = values["workers"]
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (
        workers["minReplicas"], workers["maxReplicas"], workers["minReplicas"])
    elastic = workers["minReplicas"] < workers["maxReplicas"]
    assert cluster.get("enableInTreeAutoscaling", False) is elastic
    for pod in ray_pod_specs(the_rayjob(objects[name])).values():
        ray_container = pod["containers"][0]  # KubeRay's Ray container is the first
        assert ray_container["image"] == f"{values['image']['repository']}:{values['image']['tag']}"
        assert ray_container["workingDir"] == values["workingDir"]
        shm = {v["name"]: v for v in pod["volumes"]}[
            next(m["name"] for m in ray_container["volumeMounts"] if m["mountPath"] == "/dev/shm")]
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    worker = group["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert str(limits["cpu"]) == str(workers["cpus"])
    if workers["gpus"]:
        assert limits["nvidia.com/gpu"] == "1"
        assert any(t.get("key") == "nvidia.com/gpu" for t in worker["tolerations"])
    else:
        assert "nvidia.com/gpu" not in limits
    if name == "gpu":
        assert worker["nodeSelector"] == workers["nodeSelector"]


@pytest.mark.parametrize("name", VALUE_FILES)
def test_job_lifecycle_comes_from_values(name, objects):
    values = expected(name)["job"]
    spec = the_rayjob(objects[name])["spec"]
    assert spec["submissionMode"] == values["submissionMode"] == "K8sJobMode"
    assert spec["backoffLimit"] == values["backoffLimit"]
    assert spec["shutdownAfterJobFinishes"] is values["shutdownAfterJobFinishes"]
    assert spec["ttlSecondsAfterFinished"] == values["ttlSecondsAfterFinished"]
    assert spec["activeDeadlineSeconds"] == values["activeDeadlineSeconds"]
    assert spec["submitterConfig"] == {"backoffLimit": values["submitterBackoffLimit"]}


# ---- the entrypoint is a command aios accepts -------------------------------------------------------------

@pytest.mark.parametrize("name", [*VALUE_FILES, "k8s/rayjob.yaml"])
def test_entrypoint_parses_with_the_aios_cli(name, objects):
    if name == "k8s/rayjob.yaml":
        rayjob, values = plain_rayjob(), expected("gpu")
    else:
        rayjob = the_rayjob(objects[name])
        values = expected(name)
    config = parse_entrypoint(rayjob["spec"]["entrypoint"])
    run_name = values["job"]["runName"] or f"{RELEASE}-aios-train"
    assert config.run_name == run_name == rayjob["metadata"]["annotations"]["aios.dev/run-name"]
    [group] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (config.min_workers, config.max_workers) == (group["minReplicas"], group["maxReplicas"])
    assert config.elastic is (group["minReplicas"] < group["maxReplicas"])
    assert config.cpus_per_worker == int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert config.storage_path == values["train"]["storagePath"]
    assert config.bundle_dir == values["train"]["bundleDir"]
    assert config.launcher == "ray" and config.ray_address is None  # the job's $RAY_ADDRESS
    assert config.progress is False
    assert config.device == values["train"]["device"]
    assert anywhere_problem(config) is None, "the workers could not run on any pod"


def test_elastic_gpu_job_keeps_its_global_batch(objects):
    config = parse_entrypoint(the_rayjob(objects["gpu"])["spec"]["entrypoint"])
    assert config.world_size == "2-4" and config.elastic
    assert config.global_batch == 16 * 3 * 4  # values-gpu.yaml's comment
    assert all(config.global_batch % (config.batch_size * w) == 0 for w in range(2, 5))


def test_cpu_demo_talks_to_the_in_chart_minio(objects):
    rayjob = the_rayjob(objects["cpu"])
    config = parse_entrypoint(rayjob["spec"]["entrypoint"])
    service = next(obj for obj in objects["cpu"] if obj["kind"] == "Service")
    endpoint = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:9000"
    assert config.s3_endpoint_url == endpoint
    assert config.storage_path.startswith("s3://aios/") and config.bundle_dir.startswith("s3://aios/")
    job = next(obj for obj in objects["cpu"] if obj["kind"] == "Job")
    assert "mc mb --ignore-existing aios/aios" in job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    for pod in ray_pod_specs(rayjob).values():
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["AWS_ENDPOINT_URL"] == endpoint  # a plain value: an endpoint is no secret
    head = ray_pod_specs(rayjob)["head"]
    assert [c["name"] for c in head["initContainers"]] == ["wait-for-bucket"]


def test_arguments_are_shell_quoted(chart):
    """Values with spaces, quotes, ; and $ reach aios as they are. KubeRay's submitter pastes the entrypoint
    into a shell command (`... ray job submit ... -- <entrypoint> ; fi`); `ray job submit` shlex.joins the
    words it gets and the job supervisor runs that with a shell again: so one POSIX quoting is right."""
    tricky = "it's a \"field\" with $HOME and `backticks`; rm -rf /"
    rayjob = the_rayjob(render(chart, {"train": {"flags": {"text-field": tricky, "lr": 0.0003, "iterate": True,
                                                           "amp": False, "eval-every": None},
                                                 "steps": 1000000, "extraArgs": ["--seed", "7"]}}))
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert shlex.split(shlex.join(words)) == words  # what the job supervisor's shell gets back
    config = parse_entrypoint(rayjob["spec"]["entrypoint"])
    assert config.text_field == tricky
    assert config.lr == 0.0003 and config.steps == 1000000 and config.seed == 7  # not 1e+06
    assert config.iterate is True and config.amp is False and "--no-amp" in words
    assert "--eval-every" not in words and config.eval_every == 250  # null: left out, the preset's value holds


# ---- no secret in the values, the entrypoint or an env var -----------------------------------------------

@pytest.mark.parametrize("name", VALUE_FILES)
def test_s3_credentials_come_from_the_secret_only(name, objects):
    values = expected(name)
    secret = values["s3"]["secretName"]
    rayjob = the_rayjob(objects[name])
    for group, pod in ray_pod_specs(rayjob).items():
        for container in all_containers(pod):
            assert {"secretRef": {"name": secret}} in container.get("envFrom", []), \
                f"{group}/{container['name']} does not load the S3 Secret"
    for pod in pod_specs_of(objects[name]):
        for container in all_containers(pod):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env, f"{container['name']}: {env['name']} has a literal value"
    entrypoint = rayjob["spec"]["entrypoint"]
    assert not SECRET_NAME.search(entrypoint.replace("--s3-endpoint-url", "")), entrypoint
    secret_values = yaml.safe_load((K8S / "secret-example.yaml").read_text())["stringData"].values()
    rendered_text = json.dumps(objects[name])
    assert not any(value in rendered_text for value in secret_values)


def _literal_credentials(node, path: str = "") -> list[str]:
    """The paths of values whose key names a credential and that hold a value (not a Secret's name)."""
    found = []
    if isinstance(node, dict):
        if SECRET_NAME.search(str(node.get("name", ""))) and node.get("value") not in (None, ""):
            found.append(f"{path}{node['name']}")  # an env entry {name: ..., value: ...}
        for key, value in node.items():
            structural_key = key in ("key", "secretName")  # a toleration's key, the Secret's name
            if SECRET_NAME.search(str(key)) and not structural_key and not isinstance(value, (dict, list)) \
                    and value not in (None, ""):
                found.append(f"{path}{key}")
            found += _literal_credentials(value, f"{path}{key}.")
    elif isinstance(node, list):
        for item in node:
            found += _literal_credentials(item, path)
    return found


def test_values_files_hold_no_secret():
    for file in ["values.yaml", *(f for f in VALUE_FILES.values() if f)]:
        text = (CHART / file).read_text()
        assert _literal_credentials(yaml.safe_load(text)) == [], file
        assert "REPLACE_ME" not in text


def test_secret_example_is_a_valid_placeholder_secret():
    text = (K8S / "secret-example.yaml").read_text()
    secret = yaml.safe_load(text)
    kubernetes_validate.validate(secret, KUBE_VERSION, strict=True)
    assert "EXAMPLE" in text and secret["metadata"]["annotations"]["aios.dev/example"] == "true"
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}
    assert secret["metadata"]["name"] == yaml.safe_load((CHART / "values.yaml").read_text())["s3"]["secretName"]


def test_minio_objects_are_valid_kubernetes(objects):
    core = [obj for obj in objects["cpu"] if obj["kind"] != "RayJob"]
    for obj in core:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    deployment = next(obj for obj in core if obj["kind"] == "Deployment")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MINIO_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "aios-s3", "key": "AWS_SECRET_ACCESS_KEY"}


# ---- bad values are refused, in one message that names the value ------------------------------------------

@pytest.mark.parametrize(("values", "message"), [
    ({"workers": {"minReplicas": 3, "maxReplicas": 2}},
     "workers.minReplicas (3) is greater than workers.maxReplicas (2)"),
    ({"train": {"flags": {"world-size": 8}}}, "train.flags.world-size: the chart manages --world-size"),
    ({"train": {"flags": {"log-file": "/tmp/metrics.jsonl"}}}, "the chart manages --log-file"),
    ({"train": {"extraArgs": ["--run-name=other"]}}, "train.extraArgs: --run-name=other"),
    ({"train": {"storagePath": "/data/checkpoints"}}, "train.storagePath \"/data/checkpoints\" is not an s3://"),
    ({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}]}, "env AWS_SECRET_ACCESS_KEY has a literal value"),
    ({"workers": {"gpus": 0}}, "train.device is cuda but workers.gpus is 0"),
    ({"minio": {"enabled": True}, "train": {"storagePath": "s3://elsewhere/runs"}}, "not in the MinIO bucket"),
    ({"job": {"runName": "-bad"}}, "/job/runName"),
    ({"workers": {"gpus": "two"}}, "/workers/gpus"),
    ({"workers": {"gpus": 2}}, "/workers/gpus"),
    ({"job": {"submissionMode": "InteractiveMode"}}, "/job/submissionMode"),
    ({"workres": {"gpus": 1}}, "additional properties 'workres'"),
    ({"fullnameOverride": "9-starts-with-a-digit"}, "/fullnameOverride"),
])
def test_bad_values_are_refused(chart, values, message):
    with pytest.raises(HelmError) as refused:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(refused.value)


def test_a_release_name_kuberay_would_refuse_is_refused(chart):
    with pytest.raises(HelmError, match="DNS-1035 label"):
        chart.render(None, name="7th-run", namespace=NAMESPACE)


# ---- ray/ ------------------------------------------------------------------------------------------------

def pinned_ray_version() -> str:
    """The X of pyproject's `"ray[...]==X"` dependency."""
    pins = re.findall(r'"ray\[[a-z,]+\]==([0-9][0-9.]*)"', (REPO / "pyproject.toml").read_text())
    assert len(pins) == 1, f"pyproject.toml should pin ray once as ray[...]==X, found {pins}"
    return pins[0]


def test_ray_cluster_launcher_config():
    config = yaml.safe_load((REPO / "ray" / "cluster.yaml").read_text())
    # Ray's own schema for `ray up` configs, read from the installed package without importing ray.
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    jsonschema.validate(config, json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text()))
    version = pinned_ray_version()
    assert version == "2.60.0" == yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"]
    assert any(f"'{version}'" in command for command in config["setup_commands"])
    assert "aios" in config["docker"]["image"]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in command for command in config["head_start_ray_commands"])
    gpu = config["available_node_types"]["gpu-worker"]
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]


def test_ray_runtime_env_holds_no_secret():
    text = (REPO / "ray" / "runtime_env.yaml").read_text()
    runtime_env = yaml.safe_load(text)
    assert set(runtime_env) == {"env_vars"}  # no working_dir, no pip: the image holds everything
    assert "AWS_ENDPOINT_URL" in runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    assert not [name for name in runtime_env["env_vars"] if SECRET_NAME.search(name)]
