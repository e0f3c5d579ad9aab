"""deploy/: every manifest parses and passes the schema the cluster would check it against, and the
pieces agree with each other and with the repository (job scripts, configs, image, RBAC, IAM).

Core Kubernetes kinds go through kubernetes-validate (strict, Kubernetes 1.33). KubeRay kinds go
through the openAPIV3Schema of KubeRay 1.7's CRDs (../shared/kuberay-crds, or LRPSCALE_KUBERAY_CRDS),
with the API server's defaulting applied first and unknown fields rejected. Nothing here needs a
cluster, Docker, a cloud account or the network.

Two storage variants: object storage, the default (deploy/k8s/*.yaml, deploy/ray-up/aws.yaml,
jobs/configs/*-s3.yaml: a bucket, credentials from a service account or an instance profile), and a
shared ReadWriteMany volume at /data, the alternative (deploy/k8s/rwx/, deploy/ray-up/aws-efs.yaml,
jobs/configs/<job>.yaml). The IAM policy in deploy/aws/ is checked by a small evaluator against the
requests lrpscale makes at the configs' locations.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.33.0"
IMAGE_APP_DIR = "/app"        # the Dockerfile's WORKDIR: jobs/ is at /app/jobs in the image
CHECKOUT_DIR = "/opt/lrpscale"  # where deploy/README.md puts the checkout on a single machine
# YAML files that are not Kubernetes objects, and what checks them.
NOT_KUBERNETES = {"kuberay-operator-values.yaml": "test_operator_values_enable_raycronjob",
                  "ray-up/aws.yaml": "test_ray_up_config_passes_rays_schema",
                  "ray-up/aws-efs.yaml": "test_ray_up_config_passes_rays_schema"}
RAY_UP = {"ray-up/aws.yaml": "object storage", "ray-up/aws-efs.yaml": "rwx"}  # file -> storage variant
RWX_DIR = "k8s/rwx/"          # the shared-volume alternative; every other manifest is the object-storage default
S3_POLICY = DEPLOY / "aws/lrpscale-s3-policy.json"
# The settings that name a location, per job script (jobs/<name>.py), and whether the job writes there
LOCATIONS = {"audit": {"input": "read", "weights": "read", "output": "write"},
             "reanalyze": {"input": "read", "weights": "read", "output_root": "write"},
             "reduce": {"run": "write"}}


class Manifest(NamedTuple):
    source: str   # file (and ConfigMap key for an embedded object)
    doc: dict


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@lru_cache
def manifests() -> tuple[Manifest, ...]:
    """Every Kubernetes object under deploy/, plus the objects ConfigMaps carry as YAML files."""
    found = []
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "kind" in doc:
                source = str(path.relative_to(DEPLOY))
                found.append(Manifest(source, doc))
                if doc["kind"] == "ConfigMap":
                    for key, text in doc.get("data", {}).items():
                        if key.endswith((".yaml", ".yml")):
                            found.append(Manifest(f"{source}:{key}", yaml.safe_load(text)))
    return tuple(found)


def of_kind(*kinds: str) -> list[Manifest]:
    return [m for m in manifests() if m.doc["kind"] in kinds]


def only(kind: str, source: str | None = None) -> dict:
    docs = [m.doc for m in of_kind(kind) if source is None or m.source == source]
    assert len(docs) == 1, f"expected one {kind} in {source or 'deploy/'}, found {len(docs)}"
    return docs[0]


def is_kuberay(doc: dict) -> bool:
    return doc["apiVersion"].split("/")[0] == "ray.io"


def variant(source: str) -> str:
    """The storage a manifest, ray up config or other job launch uses: "object storage" (the default
    manifests, ray-up/aws.yaml), "rwx" (k8s/rwx/, ray-up/aws-efs.yaml) or "local" (one machine)."""
    if source.startswith(RWX_DIR):
        return "rwx"
    if source.split(":")[0] in RAY_UP:
        return RAY_UP[source.split(":")[0]]
    return "object storage" if source.startswith("k8s/") else "local"


def in_variant(name: str) -> list[Manifest]:
    return [m for m in manifests() if variant(m.source) == name]


def ray_cluster_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
               "RayCronJob": spec.get("jobTemplate", {}).get("rayClusterSpec")}.get(doc["kind"])
    return [cluster] if cluster else []


def ray_job_specs() -> list[tuple[str, dict]]:
    return ([(m.source, m.doc["spec"]) for m in of_kind("RayJob")]
            + [(m.source, m.doc["spec"]["jobTemplate"]) for m in of_kind("RayCronJob")])


def pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return [group["template"]["spec"] for cluster in ray_cluster_specs(doc)
            for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]]


def quantity(value) -> float:
    """A Kubernetes quantity ("16Gi", "500m", 8) in base units."""
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and match[2] in units, f"not a quantity: {value!r}"
    return float(match[1]) * units[match[2]]


# -- KubeRay CRD schemas ------------------------------------------------------------------------

def crd_dir() -> Path:
    return Path(os.environ.get("LRPSCALE_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay-crds")


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of every served version in the CRD files."""
    where = crd_dir()
    files = sorted(where.glob("*.yaml.gz")) if where.is_dir() else []
    if not files:
        pytest.skip(f"KubeRay CRDs (ray.io_*.yaml.gz) not found in {where}; "
                    "set LRPSCALE_KUBERAY_CRDS to the folder that holds them")
    schemas = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 1 s instead of 15 for 3 MB of CRDs
    for path in files:
        with gzip.open(path, "rt") as f:
            for crd in yaml.load_all(f, Loader=loader):
                if crd and crd.get("kind") == "CustomResourceDefinition":
                    for version in crd["spec"]["versions"]:
                        key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                        schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def apply_defaults(schema: dict, value) -> None:
    """Fill absent fields with the schema's defaults, in place, top down, as the API server does."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name, sub in properties.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(sub, value[name])
        if isinstance(schema.get("additionalProperties"), dict):
            for name in value.keys() - properties.keys():
                apply_defaults(schema["additionalProperties"], value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)


def structural(schema: dict) -> dict:
    """The CRD schema as plain JSON Schema, as strict as the API server and kubectl --validate=strict:
    unknown fields are errors unless x-kubernetes-preserve-unknown-fields, int-or-string takes both,
    null only where nullable (the server would drop such nulls; here they are mistakes)."""
    out = {k: v for k, v in schema.items() if k not in ("properties", "items", "additionalProperties",
                                                         "anyOf", "allOf", "oneOf", "not")}
    if "properties" in schema:
        out["properties"] = {name: structural(sub) for name, sub in schema["properties"].items()}
    if isinstance(schema.get("items"), dict):
        out["items"] = structural(schema["items"])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = structural(extra)
    elif extra is not None:
        out["additionalProperties"] = extra
    elif schema.get("type") == "object" and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [structural(sub) for sub in schema[key]]
    if "not" in schema:
        out["not"] = structural(schema["not"])
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if schema.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    return out


def present(schema: dict, value, path=()):
    """(schema, value, path) of the value and of every field in it that the schema describes."""
    yield schema, value, path
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        for name, sub_value in value.items():
            sub = schema.get("properties", {}).get(name, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield from present(sub, sub_value, (*path, name))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from present(schema["items"], item, (*path, i))


def crd_errors(doc: dict, schemas: dict, defaults: bool = True) -> list[str]:
    """Why the API server would reject ``doc`` (a custom resource), as messages; [] if it passes."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        return [f"no CRD schema for {key}"]
    schema = schemas[key]
    doc = copy.deepcopy(doc)
    if defaults:
        apply_defaults(schema, doc)
    # The API server checks a custom resource's metadata as ObjectMeta, not with the CRD schema.
    root = structural({**schema, "properties": {**schema["properties"], "metadata": {"type": "object",
                                               "x-kubernetes-preserve-unknown-fields": True}}})
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(root).iter_errors(doc)]
    try:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")},
                                     KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        errors.append(f"metadata.{'.'.join(map(str, e.path))}: {e.message}")
    for sub, value, path in present(schema, doc):
        where = ".".join(map(str, path))
        list_type = sub.get("x-kubernetes-list-type")
        if list_type in ("map", "set") and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            keys = [tuple(v.get(k) for k in sub.get("x-kubernetes-list-map-keys", sorted(v))) for v in value]
            if len(set(keys)) != len(keys):
                errors.append(f"{where}: duplicate entries for list keys {sub.get('x-kubernetes-list-map-keys')}")
        if "x-kubernetes-validations" in sub:
            rules = [rule["rule"] for rule in sub["x-kubernetes-validations"]]
            errors.append(f"{where}: carries CEL rules this test does not evaluate ({rules}); "
                          "check them by hand and extend crd_errors")
    return errors


def kuberay_operator_errors(doc: dict) -> list[str]:
    """The KubeRay operator's own checks (controllers/ray/utils/validation.go, 1.7) that schemas
    cannot express, restated for the fields these manifests use."""
    errors = []
    meta = doc["metadata"]
    name = meta.get("name") or meta.get("generateName", "") + "abcde"
    limit = {"RayCluster": 53, "RayJob": 47}.get(doc["kind"], 47)
    if len(name) > limit or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"name {name!r} must be a DNS-1035 label of at most {limit} characters")
    jobs = {"RayJob": lambda spec: [spec], "RayCronJob": lambda spec: [spec["jobTemplate"]]}
    for job in jobs.get(doc["kind"], lambda spec: [])(doc["spec"]):
        if job.get("ttlSecondsAfterFinished", 0) > 0 and not job.get("shutdownAfterJobFinishes"):
            errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if not job.get("rayClusterSpec") and not job.get("clusterSelector"):
            errors.append("a RayJob needs rayClusterSpec or clusterSelector")
        if job.get("activeDeadlineSeconds", 1) <= 0 or job.get("backoffLimit", 0) < 0:
            errors.append("activeDeadlineSeconds must be positive and backoffLimit non-negative")
    for cluster in ray_cluster_specs(doc):
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            params = group.get("rayStartParams", {})
            if not group["template"]["spec"].get("containers"):
                errors.append("every group needs a container")
            if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & params.keys():
                errors.append("Ray resources set in both rayStartParams and the group's resources")
            if "labels" in params:
                errors.append("rayStartParams['labels'] is not supported; use the group's labels")
    if doc["kind"] == "RayCronJob" and len(doc["spec"]["schedule"].split()) != 5:
        errors.append(f"schedule {doc['spec']['schedule']!r} is not a five-field cron expression")
    return errors


# -- every file parses, every document is checked -----------------------------------------------

def test_deploy_has_the_expected_files():
    names = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file()}
    jobs = {"raycluster.yaml", "rayjob-audit.yaml", "rayjob-reduce.yaml", "raycronjob-reanalyze.yaml",
            "cronjob-reanalyze.yaml"}
    assert {"Dockerfile", "README.md", "k8s/namespace.yaml", "k8s/object-storage.yaml", *(f"k8s/{j}" for j in jobs),
            "k8s/rwx/storage.yaml", "k8s/rwx/data-loader.yaml", *(f"{RWX_DIR}{j}" for j in jobs),
            "aws/lrpscale-s3-policy.json", "aws/ec2-trust-policy.json", "aws/ray-up-autoscaler-policy.json",
            *RAY_UP, "systemd/lrpscale-reanalyze.service", "systemd/lrpscale-reanalyze.timer"} <= names
    configs = {p.name for p in (ROOT / "jobs/configs").glob("*.yaml")}
    assert {f"{job}{suffix}.yaml" for job in LOCATIONS for suffix in ("", "-s3")} <= configs


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected one or more mappings"
    relative = str(path.relative_to(DEPLOY))
    for doc in docs:
        assert relative in NOT_KUBERNETES or {"apiVersion", "kind"} <= doc.keys(), (
            f"{relative}: a document without apiVersion/kind is checked by nothing; add it to NOT_KUBERNETES "
            "with the test that checks it")


@pytest.mark.parametrize("manifest", [m for m in manifests() if not is_kuberay(m.doc)],
                         ids=lambda m: f"{m.source}:{m.doc['kind']}")
def test_core_kinds_pass_kubernetes_schema(manifest):
    kubernetes_validate.validate(manifest.doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validator_rejects_broken_core_manifests():
    cronjob = copy.deepcopy(only("CronJob", "k8s/cronjob-reanalyze.yaml"))
    cronjob["spec"]["concurrencyPolcy"] = "Forbid"  # a typo: strict validation rejects unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, KUBERNETES_VERSION, strict=True)
    pvc = copy.deepcopy(only("PersistentVolumeClaim", f"{RWX_DIR}storage.yaml"))
    pvc["spec"]["accessModes"] = "ReadWriteMany"  # a string where a list belongs
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pvc, KUBERNETES_VERSION, strict=True)
    account = copy.deepcopy(only("ServiceAccount", "k8s/object-storage.yaml"))
    account["metadata"]["annotations"] = [account["metadata"]["annotations"]]  # a list where a map belongs
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(account, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("manifest", [m for m in manifests() if is_kuberay(m.doc)],
                         ids=lambda m: f"{m.source}:{m.doc['kind']}")
def test_kuberay_kinds_pass_crd_schema(manifest, crd_schemas):
    assert crd_errors(manifest.doc, crd_schemas) == []
    assert kuberay_operator_errors(manifest.doc) == []


def _set(doc, path, value):
    *parents, leaf = path
    for key in parents:
        doc = doc[key]
    doc[leaf] = value


def _delete(doc, path):
    *parents, leaf = path
    for key in parents:
        doc = doc[key]
    del doc[leaf]


WORKER = ("spec", "workerGroupSpecs", 0)
HEAD_CONTAINER = ("spec", "headGroupSpec", "template", "spec", "containers", 0)
BREAKAGES = {
    "wrong type": lambda d: _set(d, (*WORKER, "replicas"), "two"),
    "unknown field": lambda d: _set(d, (*WORKER, "replica"), 2),
    "unknown field in the pod template": lambda d: _set(d, (*HEAD_CONTAINER, "volumeMount"), []),
    "unknown field in envFrom": lambda d: _set(d, (*HEAD_CONTAINER, "envFrom", 0, "configMap"), {"name": "x"}),
    "service account name not a string": lambda d: _set(
        d, ("spec", "headGroupSpec", "template", "spec", "serviceAccountName"), {"name": "lrpscale-ray"}),
    "missing required field": lambda d: _delete(d, (*WORKER, "groupName")),
    "missing required pod template": lambda d: _delete(d, ("spec", "headGroupSpec", "template")),
    "quantity neither int nor string": lambda d: _set(d, (*HEAD_CONTAINER, "resources", "limits", "cpu"), [4]),
    "malformed quantity": lambda d: _set(d, (*HEAD_CONTAINER, "resources", "limits", "memory"), "16 GB"),
    "null where not nullable": lambda d: _set(d, ("spec", "headGroupSpec", "rayStartParams"), None),
    "duplicate container name": lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"].append(
        copy.deepcopy(d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])),
    "unknown metadata field": lambda d: _set(d, ("metadata", "label"), {"a": "b"}),
    "field guarded by an unevaluated CEL rule": lambda d: _set(d, ("spec", "managedBy"), "someone-else"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_crd_validator_rejects_broken_manifests(breakage, crd_schemas):
    cluster = copy.deepcopy(only("RayCluster", "k8s/raycluster.yaml"))
    assert crd_errors(cluster, crd_schemas) == []
    BREAKAGES[breakage](cluster)
    assert crd_errors(cluster, crd_schemas), f"{breakage}: the broken RayCluster was accepted"


def test_crd_validator_applies_defaults_and_int_or_string(crd_schemas):
    cluster = copy.deepcopy(only("RayCluster", "k8s/raycluster.yaml"))
    worker = cluster["spec"]["workerGroupSpecs"][0]
    del worker["minReplicas"], worker["maxReplicas"]  # required, but defaulted (0, 2^31-1) by the server
    worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 8  # int-or-string
    assert crd_errors(cluster, crd_schemas) == []
    assert any("minReplicas" in e for e in crd_errors(cluster, crd_schemas, defaults=False))


# -- the ray up config and the systemd units ----------------------------------------------------

def ray_up(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_config_passes_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = ray_up(name)
    validate_config(prepare_config(copy.deepcopy(config)))  # the defaults `ray up` merges, then its schema
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] == 1 for t in workers)
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "ray start" in c)

    config["available_node_types"]["gpu"]["resourcez"] = {"GPU": 1}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def ray_up_storage_problems(config: dict, storage: str) -> list[str]:
    """Why a ray up config does not match its storage variant: object storage means an instance
    profile on every node type and no shared file system; rwx means EFS mounted at /data everywhere."""
    problems = []
    text = json.dumps(config)
    mounts = [c for c in config.get("initialization_commands", []) if "mount" in c and "/data" in c]
    volume = "--volume=/data:/data" in config["docker"].get("run_options", [])
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        if storage == "object storage" and not re.fullmatch(
                r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", profile.get("Arn", "")):
            problems.append(f"{name}: no IamInstanceProfile Arn: the node has no credentials for the bucket")
    if storage == "object storage" and (mounts or volume or "nfs" in text):
        problems.append("object storage needs no shared file system, yet one is mounted")
    if storage == "rwx" and not (mounts and volume):
        problems.append("the shared file system is not mounted at /data on the hosts and in the container")
    return problems


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_config_matches_its_storage(name):
    config = ray_up(name)
    assert ray_up_storage_problems(config, RAY_UP[name]) == []
    if RAY_UP[name] == "object storage":
        head = config["available_node_types"][config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"]
        workers = {t["node_config"]["IamInstanceProfile"]["Arn"] for n, t in config["available_node_types"].items()
                   if n != config["head_node_type"]}
        assert head not in workers, "the head's profile also launches workers: give workers one without that right"
        broken = copy.deepcopy(config)
        del broken["available_node_types"]["gpu"]["node_config"]["IamInstanceProfile"]
        broken["initialization_commands"] = ["sudo mount -t nfs4 fs-1.efs.us-west-2.amazonaws.com:/ /data"]
        assert len(ray_up_storage_problems(broken, "object storage")) == 2
    else:
        broken = copy.deepcopy(config)
        broken["initialization_commands"] = []
        assert ray_up_storage_problems(broken, "rwx")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path):
    # systemd-analyze checks that ExecStart's program exists: point the checkout path at this repo.
    if not (ROOT / ".venv/bin/python").exists():
        pytest.skip("no .venv here for ExecStart to point at")
    for unit in (DEPLOY / "systemd").iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace(CHECKOUT_DIR, str(ROOT)))
    units = sorted(str(p) for p in tmp_path.iterdir())
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# -- cross-checks ---------------------------------------------------------------------------------

def systemd_exec_start() -> list[str]:
    unit = (DEPLOY / "systemd/lrpscale-reanalyze.service").read_text()
    return shlex.split(re.search(r"^ExecStart=(.+)$", unit, re.M)[1])


def readme_cron_line() -> list[str]:
    readme = (DEPLOY / "README.md").read_text()
    match = re.search(r"^((?:\S+\s+){5})cd (\S+) && (.*jobs/reanalyze\.py.*)$", readme, re.M)
    assert match, "deploy/README.md has no cron line running jobs/reanalyze.py"
    assert match[2] == CHECKOUT_DIR
    command = re.split(r"\s+\d?>", match[3])[0]  # without the log redirection
    return match[1].split(), shlex.split(command)


def job_commands() -> list[tuple[str, list[str], Path]]:
    """(where, argv from the script on, the directory relative paths resolve in) of every job launch."""
    commands = []
    for source, spec in ray_job_specs():
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "python", f"{source}: entrypoint should run `python SCRIPT ...`"
        commands.append((source, argv[1:], Path(IMAGE_APP_DIR)))
    argv = systemd_exec_start()
    commands.append(("systemd/lrpscale-reanalyze.service", argv[1:], Path(CHECKOUT_DIR)))
    _, cron = readme_cron_line()
    python_at = next(i for i, a in enumerate(cron) if a.endswith("python"))
    commands.append(("README.md cron line", cron[python_at + 1:], Path(CHECKOUT_DIR)))
    for where in ["README.md", *RAY_UP]:
        for config, command in re.findall(r'ray exec deploy/(ray-up/[\w.-]+) "(python [^"]+)"',
                                          (DEPLOY / where).read_text()):
            commands.append((f"{config}:ray exec in {where}", shlex.split(command)[1:], Path(IMAGE_APP_DIR)))
    assert {c[0].split(":")[0] for c in commands} >= set(RAY_UP), "every ray up config should show its ray exec"
    return commands


def job_settings(script: Path, args: argparse.Namespace, cwd: Path) -> dict:
    """The settings a launch runs with: its config file (from the repository) with the command
    line's options and --set items applied, by lrpscale's own loader."""
    from lrpscale.config import load_settings

    options = {name: value for name, value in vars(args).items() if name not in ("config", "set")}
    return load_settings(in_repo(str(args.config), cwd), options, args.set)


def launch_locations(argv: list[str], cwd: Path) -> dict[str, str]:
    """setting -> location (input, output, weights, ...) of one job launch, as it runs."""
    script = in_repo(argv[0], cwd)
    settings = job_settings(script, parse_job_args(script, argv[1:]), cwd)
    return {name: str(settings[name]) for name in LOCATIONS[script.stem] if settings.get(name) is not None}


def in_repo(path: str, cwd: Path) -> Path:
    """The repository file a path in the image (/app/...) or in the checkout refers to."""
    absolute = cwd / path
    for prefix in (Path(IMAGE_APP_DIR), Path(CHECKOUT_DIR)):
        if absolute.is_relative_to(prefix):
            return ROOT / absolute.relative_to(prefix)
    raise AssertionError(f"{path} is neither in the image's {IMAGE_APP_DIR} nor in the checkout {CHECKOUT_DIR}")


class _Parsed(Exception):
    def __init__(self, args):
        self.args_ = args


def parse_job_args(script: Path, argv: list[str]) -> argparse.Namespace:
    """Run the job script's own argument parsing on ``argv`` and stop there (nothing runs)."""
    spec = importlib.util.spec_from_file_location(f"_deploy_check_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    sys.path.insert(0, str(script.parent))
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_and_stop
    try:
        spec.loader.exec_module(module)
        module.main(argv)
    except _Parsed as parsed:
        return parsed.args_
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.path.remove(str(script.parent))
        for name in set(sys.modules) - before:  # the scripts' sibling imports (jobs/common.py)
            del sys.modules[name]
    raise AssertionError(f"{script} returned without parsing its arguments")


@pytest.mark.parametrize("where,argv,cwd", job_commands(), ids=[c[0] for c in job_commands()])
def test_job_launches_name_existing_scripts_configs_and_options(where, argv, cwd):
    script = in_repo(argv[0], cwd)
    assert script.parent == ROOT / "jobs" and script.is_file(), f"{where}: {script} does not exist"
    try:
        args = parse_job_args(script, argv[1:])
    except SystemExit as e:
        raise AssertionError(f"{where}: {script.name} rejects {argv[1:]}") from e
    config = in_repo(str(args.config), cwd)
    expected = f"{script.stem}-s3.yaml" if variant(where) == "object storage" else f"{script.stem}.yaml"
    assert config == ROOT / "jobs/configs" / expected and config.is_file(), (
        f"{where}: {script.name} should run with jobs/configs/{expected} ({variant(where)}), got {args.config}")


@pytest.mark.parametrize("where,argv,cwd", job_commands(), ids=[c[0] for c in job_commands()])
def test_job_launches_read_and_write_their_variants_storage(where, argv, cwd):
    locations = launch_locations(argv, cwd)
    assert set(locations) == set(LOCATIONS[Path(argv[0]).stem]), f"{where}: a location is not set: {locations}"
    for name, location in locations.items():
        if variant(where) == "object storage":
            assert location.startswith("s3://"), f"{where}: {name} is {location}, not on the bucket"
        elif variant(where) == "rwx":
            assert location.startswith("/data/"), f"{where}: {name} is {location}, not on the shared volume at /data"
        else:
            assert location.startswith("/") and "://" not in location, f"{where}: {name} is {location}"


def test_cron_line_and_systemd_unit_run_the_same_command():
    fields, cron = readme_cron_line()
    exec_start = systemd_exec_start()
    script_at = next(i for i, a in enumerate(cron) if a.endswith("reanalyze.py"))
    assert cron[script_at:] == exec_start[1:]
    assert fields == ["0", "2", "*", "*", "*"]
    assert "OnCalendar=*-*-* 02:00:00" in (DEPLOY / "systemd/lrpscale-reanalyze.timer").read_text()
    assert "flock -n" in " ".join(cron), "the cron line should not start a run while one is going"


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_base_image_workdir_and_copy_sources():
    instructions = dockerfile()
    base = [args for op, args in instructions if op == "FROM"]
    assert len(base) == 1
    match = re.fullmatch(r"rayproject/ray:(2\.60\.\d+)-py311-(gpu|cu\d+)", base[0])
    assert match, f"FROM {base[0]}: expected a Ray 2.60 GPU image for Python 3.11"
    ray_version = match[1]
    assert any(op == "RUN" and f'"ray[data]=={ray_version}"' in args for op, args in instructions), (
        "pip install of lrpscale should pin ray to the base image's version")
    assert [args for op, args in instructions if op == "WORKDIR"] == [IMAGE_APP_DIR]
    copies = [shlex.split(args) for op, args in instructions if op == "COPY"]
    for copy_args in copies:
        sources = [a for a in copy_args[:-1] if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository (the build context)"
    assert ["jobs/", "jobs/"] == [a for a in copies[-1] if not a.startswith("--")], "jobs/ should land in /app/jobs"
    assert any("lrpscale/" in c for c in copies) and any("pyproject.toml" in c for c in copies)
    for manifest in manifests():
        for cluster in ray_cluster_specs(manifest.doc):
            assert cluster["rayVersion"] == ray_version, f"{manifest.source}: rayVersion differs from the image's Ray"
    import ray
    assert ray.__version__ == ray_version, "the image's Ray differs from the Ray the project is tested with"


def lrpscale_images() -> dict[str, set[str]]:
    images: dict[str, set[str]] = {}
    for manifest in manifests():
        for pod in pod_specs(manifest.doc):
            for container in pod["containers"]:
                images.setdefault(container["image"], set()).add(manifest.source)
    for name in RAY_UP:
        images.setdefault(ray_up(name)["docker"]["image"], set()).add(name)
    readme = (DEPLOY / "README.md").read_text()
    for image in re.findall(r"docker (?:build .*?-t|push) (\S+)", readme):
        images.setdefault(image, set()).add("README.md")
    return images


def test_one_lrpscale_image_everywhere():
    images = lrpscale_images()
    kubectl = {image for image in images if "kubectl" in image}
    assert len(kubectl) == 1 and not next(iter(kubectl)).endswith(":latest"), "pin the kubectl image's tag"
    ours = {image: where for image, where in images.items() if image not in kubectl}
    assert len(ours) == 1, f"the lrpscale image differs between files: {ours}"
    assert "README.md" in next(iter(ours.values())), "the README should build and push the image the manifests use"


VARIANT_DIRS = {"object storage": "k8s/", "rwx": RWX_DIR}


@pytest.mark.parametrize("name", VARIANT_DIRS)
def test_ray_clusters_share_one_spec(name):
    folder = VARIANT_DIRS[name]
    standing = only("RayCluster", f"{folder}raycluster.yaml")["spec"]
    assert only("RayJob", f"{folder}rayjob-audit.yaml")["spec"]["rayClusterSpec"] == standing
    reduce = only("RayJob", f"{folder}rayjob-reduce.yaml")["spec"]["rayClusterSpec"]
    assert reduce["headGroupSpec"] == standing["headGroupSpec"] and "workerGroupSpecs" not in reduce
    scheduled = only("RayCronJob", f"{folder}raycronjob-reanalyze.yaml")["spec"]["jobTemplate"]
    assert scheduled["rayClusterSpec"] == standing
    fallback = only("RayJob", f"{folder}cronjob-reanalyze.yaml:rayjob.yaml")["spec"]
    assert fallback == scheduled, "the CronJob fallback should create the same RayJob as the RayCronJob"
    for source, spec in ray_job_specs():
        assert spec["shutdownAfterJobFinishes"] is True, source
        assert spec["ttlSecondsAfterFinished"] > 0 and "backoffLimit" in spec, source


def test_head_takes_no_work_and_workers_have_one_gpu():
    clusters = [(m.source, c) for m in manifests() for c in ray_cluster_specs(m.doc)]
    assert len(clusters) == 10, "five Ray clusters per storage variant"
    for source, cluster in clusters:
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0", source
        assert not any("nvidia.com/gpu" in c.get("resources", {}).get(kind, {})
                       for c in head["template"]["spec"]["containers"] for kind in ("requests", "limits")), source
        for group in cluster.get("workerGroupSpecs", []):
            (container,) = group["template"]["spec"]["containers"]
            for kind in ("requests", "limits"):
                assert str(container["resources"][kind]["nvidia.com/gpu"]) == "1", f"{source}: {kind}"


def ray_groups(doc: dict) -> list[dict]:
    return [group for cluster in ray_cluster_specs(doc)
            for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]]


def test_pods_have_resources_and_memory_backed_shm():
    for manifest in manifests():
        for group in ray_groups(manifest.doc):
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            (container,) = pod["containers"]
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            shm = mounts["/dev/shm"]["emptyDir"]
            assert shm["medium"] == "Memory", manifest.source
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys() <= resources["limits"].keys()
            memory = quantity(resources["limits"]["memory"])
            object_store = quantity(group["rayStartParams"]["object-store-memory"])
            assert object_store < quantity(shm["sizeLimit"]) < memory, (
                f"{manifest.source}: object store < /dev/shm sizeLimit < memory limit")
        for pod in pod_specs(manifest.doc):
            for container in pod["containers"]:
                assert {"requests", "limits"} <= container["resources"].keys(), manifest.source


IRSA = "eks.amazonaws.com/role-arn"
GKE_WORKLOAD_IDENTITY = "iam.gke.io/gcp-service-account"
SHARED_FILESYSTEMS = {"persistentVolumeClaim", "nfs", "hostPath", "csi", "ephemeral", "cephfs", "glusterfs"}


def object_storage_problems(docs: list[Manifest]) -> list[str]:
    """Why a set of manifests does not run on object storage: a claim or a shared file system, or a
    Ray pod without a service account that carries cloud credentials (IRSA) or without the storage
    environment (the ConfigMap every Ray container reads)."""
    problems = []
    accounts = {m.doc["metadata"]["name"]: m.doc for m in docs if m.doc["kind"] == "ServiceAccount"}
    config_maps = {m.doc["metadata"]["name"] for m in docs if m.doc["kind"] == "ConfigMap"}
    for m in docs:
        if m.doc["kind"] == "PersistentVolumeClaim":
            problems.append(f"{m.source}: a PersistentVolumeClaim {m.doc['metadata']['name']}")
        for group in ray_groups(m.doc):
            pod = group["template"]["spec"]
            where = f"{m.source}: {group.get('groupName', 'head')}"
            shared = [v["name"] for v in pod.get("volumes", []) if SHARED_FILESYSTEMS & v.keys()]
            if shared:
                problems.append(f"{where} mounts shared storage {shared}")
            account = accounts.get(pod.get("serviceAccountName", "default"))
            if account is None or not account["metadata"].get("annotations", {}).get(IRSA):
                problems.append(f"{where} runs as {pod.get('serviceAccountName', 'default')!r}, "
                                f"not a service account with an {IRSA} annotation: no credentials for the bucket")
            for container in pod["containers"]:
                read = {e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e}
                if not read & config_maps:
                    problems.append(f"{where}: {container['name']} does not read the storage environment")
    return problems


def test_default_manifests_use_object_storage_and_the_irsa_service_account():
    default = in_variant("object storage")
    assert object_storage_problems(default) == []
    assert len([m for m in default if ray_groups(m.doc)]) == 5
    account = only("ServiceAccount", "k8s/object-storage.yaml")
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", account["metadata"]["annotations"][IRSA])
    assert account["automountServiceAccountToken"] is False, "Ray pods do not call the Kubernetes API"
    text = (DEPLOY / "k8s/object-storage.yaml").read_text()
    assert re.search(rf"^\s*# {re.escape(GKE_WORKLOAD_IDENTITY)}: \S+@\S+\.iam\.gserviceaccount\.com$", text, re.M), (
        "object-storage.yaml should show the GKE Workload Identity annotation as a commented alternative")
    # the checks bite: the shared-volume variant, and a default pod that lost its service account
    assert any("PersistentVolumeClaim" in p for p in object_storage_problems(in_variant("rwx")))
    broken = [Manifest(m.source, copy.deepcopy(m.doc)) for m in default]
    cluster = next(m.doc for m in broken if m.doc["kind"] == "RayCluster")
    del cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["serviceAccountName"]
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"].append(
        {"name": "data", "persistentVolumeClaim": {"claimName": "lrpscale-data"}})
    assert len(object_storage_problems(broken)) == 2


def test_rwx_variant_mounts_its_claim():
    pvc = only("PersistentVolumeClaim", f"{RWX_DIR}storage.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every Ray node mounts the data volume"
    pods = [(m.source, group["template"]["spec"]) for m in in_variant("rwx") for group in ray_groups(m.doc)]
    pods += [(m.source, m.doc["spec"]) for m in in_variant("rwx") if m.doc["kind"] == "Pod"]
    assert len(pods) == 10
    for source, pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts["/data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], source


def as_shared_volume(doc: dict, claim: str) -> dict:
    """A default (object storage) manifest turned into its shared-volume namesake: no service account
    or storage environment in the Ray pods, the claim mounted at /data, entrypoints left out."""
    doc = copy.deepcopy(doc)
    for group in ray_groups(doc):
        pod = group["template"]["spec"]
        del pod["serviceAccountName"]
        pod["volumes"].insert(0, {"name": "data", "persistentVolumeClaim": {"claimName": claim}})
        for container in pod["containers"]:
            del container["envFrom"]
            container["volumeMounts"].insert(0, {"name": "data", "mountPath": "/data"})
    return without_entrypoints(doc)


def without_entrypoints(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    for spec in (doc["spec"], doc["spec"].get("jobTemplate", {})):
        spec.pop("entrypoint", None)
    return doc


def test_rwx_variant_is_the_default_with_the_volume_instead_of_the_bucket():
    claim = only("PersistentVolumeClaim", f"{RWX_DIR}storage.yaml")["metadata"]["name"]
    pairs = 0
    for manifest in in_variant("object storage"):
        if not ray_groups(manifest.doc):
            continue
        twin = only(manifest.doc["kind"], manifest.source.replace("k8s/", RWX_DIR, 1))
        assert as_shared_volume(manifest.doc, claim) == without_entrypoints(twin), manifest.source
        pairs += 1
    assert pairs == 5
    default = [m.doc for m in manifests() if m.source == "k8s/cronjob-reanalyze.yaml" and m.doc["kind"] != "ConfigMap"]
    rwx = [m.doc for m in manifests() if m.source == f"{RWX_DIR}cronjob-reanalyze.yaml" and m.doc["kind"] != "ConfigMap"]
    assert default == rwx, "the CronJob fallback and its RBAC are the same in both variants"
    scripts = [only("ConfigMap", f"{folder}cronjob-reanalyze.yaml")["data"]["submit.sh"] for folder in VARIANT_DIRS.values()]
    assert scripts[0] == scripts[1]


def walk(value):
    yield value
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    for child in children:
        yield from walk(child)


def test_nothing_listens_outside_the_cluster():
    for manifest in manifests():
        doc = manifest.doc
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", manifest.source
        assert doc["kind"] != "Ingress", manifest.source
        for cluster in ray_cluster_specs(doc):
            head = cluster["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
        for node in walk(doc):
            if isinstance(node, dict):
                assert not node.get("hostNetwork") and "hostPort" not in node, manifest.source


def kubectl_verbs(script: str) -> set[str]:
    """The RBAC verbs on RayJobs that the kubectl commands in a shell script need."""
    needs = {"create": {"create"}, "get": {"get"}, "wait": {"get", "list", "watch"}, "delete": {"delete"},
             "apply": {"get", "create", "patch"}, "patch": {"patch"}, "replace": {"update"}}
    verbs = set()
    for command in re.findall(r"kubectl\s+([a-z-]+)([^\n)|;]*)", script):
        verb, rest = command
        assert verb in needs, f"kubectl {verb}: add its RBAC verbs to kubectl_verbs"
        named = verb != "get" or re.search(r'"\$\w+"|\w+/\w+', rest)
        verbs |= needs[verb] if named else {"list"}
    return verbs


@pytest.mark.parametrize("source", [f"{folder}cronjob-reanalyze.yaml" for folder in VARIANT_DIRS.values()])
def test_rbac_allows_exactly_what_the_cronjob_does(source):
    cronjob = only("CronJob", source)
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_map = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    files = only("ConfigMap", source)["data"]
    assert only("ConfigMap", source)["metadata"]["name"] == config_map
    mounted = {f"{mounts[v['name']]}/{key}": text for v in pod["volumes"] if "configMap" in v
               for key, text in files.items()}
    script_path = container["command"][-1]
    assert script_path in mounted, f"the CronJob runs {script_path}, which its ConfigMap does not provide"
    script = mounted[script_path]
    for template in re.findall(r"kubectl create -f (\S+)", script):
        assert yaml.safe_load(mounted[template])["kind"] == "RayJob"
    role, binding = only("Role", source), only("RoleBinding", source)
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": sorted(kubectl_verbs(script))}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": cronjob["metadata"]["namespace"]}]
    assert only("ServiceAccount", source)["metadata"]["name"] == pod["serviceAccountName"]
    assert not only("ServiceAccount", source)["metadata"].get("annotations"), "the submitter needs no cloud role"


def cron_period_s(schedule: str) -> int:
    minute, hour, day, month, weekday = schedule.split()
    if minute.isdigit() and hour.isdigit() and (day, month) == ("*", "*"):
        return 86400 if weekday == "*" else 7 * 86400
    raise AssertionError(f"schedule {schedule!r}: teach cron_period_s its period")


@pytest.mark.parametrize("name", VARIANT_DIRS)
def test_scheduled_runs_cannot_overlap(name):
    folder = VARIANT_DIRS[name]
    raycron = only("RayCronJob", f"{folder}raycronjob-reanalyze.yaml")["spec"]
    cronjob = only("CronJob", f"{folder}cronjob-reanalyze.yaml")["spec"]
    assert raycron["schedule"] == cronjob["schedule"] and raycron["timeZone"] == cronjob["timeZone"]
    period = cron_period_s(raycron["schedule"])
    ray_deadline = raycron["jobTemplate"]["activeDeadlineSeconds"]
    watcher = cronjob["jobTemplate"]["spec"]
    assert ray_deadline < watcher["activeDeadlineSeconds"] < period, (
        "the RayJob must end before its watcher, the watcher before the next run")
    assert watcher["backoffLimit"] == 0, "a retried watcher would create a second RayJob"


def test_one_namespace():
    (namespace,) = [m.doc["metadata"]["name"] for m in of_kind("Namespace")]
    for manifest in manifests():
        if manifest.doc["kind"] != "Namespace":
            assert manifest.doc["metadata"].get("namespace") == namespace, manifest.source


def test_operator_values_enable_raycronjob():
    values = yaml.safe_load((DEPLOY / "kuberay-operator-values.yaml").read_text())
    assert {"name": "RayCronJob", "enabled": True} in values["featureGates"]
    readme = (DEPLOY / "README.md").read_text()
    assert re.search(r"helm install kuberay-operator kuberay/kuberay-operator --version 1\.7\.\d+", readme)
    assert "-f deploy/kuberay-operator-values.yaml" in readme


def test_readme_names_only_existing_files():
    readme = (DEPLOY / "README.md").read_text()
    named = set(re.findall(r"(?<![\w/])((?:deploy|jobs)/[\w./-]*\w)", readme))
    assert named, "deploy/README.md should point at the files it uses"
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"deploy/README.md names files that do not exist: {missing}"


# -- object storage: the configs, the IAM policy, no keys anywhere --------------------------------

def job_config(name: str) -> dict:
    return yaml.safe_load((ROOT / "jobs/configs" / name).read_text())


def s3_locations() -> dict[str, str]:
    """"<job>.<setting>" -> s3:// location, of every location the object-storage configs name."""
    return {f"{job}.{name}": job_config(f"{job}-s3.yaml")[name] for job in LOCATIONS for name in LOCATIONS[job]}


def split_s3(uri: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(.+?)/?", uri)
    assert match, f"{uri}: not s3://BUCKET/KEY with a valid bucket name"
    return match[1], match[2]


def the_bucket() -> str:
    (bucket,) = {split_s3(uri)[0] for uri in s3_locations().values()}
    return bucket


@pytest.mark.parametrize("job", LOCATIONS)
def test_s3_configs_are_the_local_ones_on_the_bucket(job):
    local, remote = job_config(f"{job}.yaml"), job_config(f"{job}-s3.yaml")
    assert local.keys() == remote.keys(), "the object-storage config should have the same settings"
    for name in local:
        if name in LOCATIONS[job]:
            assert str(local[name]).startswith("/") and str(remote[name]).startswith("s3://"), name
        else:
            assert local[name] == remote[name], f"{job}-s3.yaml differs from {job}.yaml in {name}"
    assert {split_s3(uri)[0] for uri in s3_locations().values()} == {the_bucket()}, "one bucket for every job"


def wildcard(pattern: str, value: str, case: bool = True) -> bool:
    """IAM's * and ? wildcards (in actions, resources and StringLike)."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, 0 if case else re.IGNORECASE) is not None


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def conditions_hold(condition: dict, context: dict) -> bool:
    for operator, pairs in condition.items():
        for key, expected in pairs.items():
            value, expected = context.get(key), _as_list(expected)
            if operator == "StringLike":
                ok = value is not None and any(wildcard(e, value) for e in expected)
            elif operator == "StringEquals":
                ok = value is not None and value in expected
            elif operator == "Null":
                ok = (value is None) == (expected == ["true"])
            else:
                raise AssertionError(f"condition operator {operator}: teach conditions_hold")
            if not ok:
                return False
    return True


def policy_allows(policy: dict, action: str, resource: str, context: dict | None = None) -> bool:
    """Whether an identity policy allows a request (IAM's evaluation for the elements these policies
    use: an explicit Deny wins, else any matching Allow; NotAction/NotResource are not supported)."""
    allowed = False
    for statement in policy["Statement"]:
        assert not {"NotAction", "NotResource", "Principal"} & statement.keys(), "teach policy_allows"
        if not any(wildcard(a, action, case=False) for a in _as_list(statement["Action"])):
            continue
        if not any(wildcard(r, resource) for r in _as_list(statement["Resource"])):
            continue
        if not conditions_hold(statement.get("Condition", {}), context or {}):
            continue
        if statement["Effect"] == "Deny":
            return False
        allowed = True
    return allowed


def s3_policy_problems(policy: dict, locations: dict[str, str]) -> list[str]:
    """What the policy refuses that lrpscale does at the configs' locations (requests as pyarrow's S3
    filesystem makes them: listings with a prefix, HEAD of a key, which S3 answers 404 only to a role
    that may list it, GET, and for a run PUT/DELETE/multipart; HeadBucket, authorised as ListBucket
    without a prefix, from create_dir), and what it allows beyond that."""
    problems = []
    bucket = the_bucket()
    arn = f"arn:aws:s3:::{bucket}"

    def expect(allowed: bool, action: str, resource: str, context: dict | None = None, why: str = ""):
        if policy_allows(policy, action, resource, context) != allowed:
            problems.append(f"{'refuses' if allowed else 'allows'} {action} on {resource} {context or ''} {why}")

    expect(True, "s3:ListBucket", arn, {}, "(HeadBucket: pyarrow's create_dir asks whether the bucket exists)")
    for where, uri in locations.items():
        _, key = split_s3(uri)
        job, name = where.split(".")
        for prefix in (key, f"{key}/"):
            expect(True, "s3:ListBucket", arn, {"s3:prefix": prefix}, f"({where})")
        writes = LOCATIONS[job][name] == "write"
        expect(True, "s3:GetObject", f"{arn}/{key}", why=f"({where}: the object, or HEAD of a folder)")
        for obj in (f"{key}/", f"{key}/0/a.png"):  # a folder marker pyarrow writes, a file below
            expect(True, "s3:GetObject", f"{arn}/{obj}", why=f"({where})")
            for action in ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
                expect(writes, action, f"{arn}/{obj}", why=f"({where})")
        if not writes:
            expect(False, "s3:PutObject", f"{arn}/{key}", why=f"({where} is only read)")
    prefixes = {split_s3(uri)[1].split("/")[0] for uri in locations.values()}
    for other in ("other", "other/", f"x{min(prefixes)}/", ""):
        expect(False, "s3:ListBucket", arn, {"s3:prefix": other}, "(a prefix no config uses)")
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        expect(False, action, f"{arn}/other/x")
        expect(False, action, f"arn:aws:s3:::{bucket}-other/{min(prefixes)}/x", why="(another bucket)")
    for action in ("s3:PutBucketPolicy", "s3:DeleteBucket", "s3:PutObjectAcl", "s3:GetObjectAcl", "iam:PassRole"):
        expect(False, action, arn)
        expect(False, action, f"{arn}/{min(prefixes)}/x")
    needed = {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    for statement in policy["Statement"]:
        extra = {a for a in _as_list(statement["Action"]) if a not in needed}
        if extra:
            problems.append(f"{statement.get('Sid')}: {sorted(extra)} beyond what lrpscale does ({sorted(needed)})")
        for resource in _as_list(statement["Resource"]):
            inside = resource == arn or any(resource in (f"{arn}/{p}", f"{arn}/{p}/*") for p in prefixes)
            if not inside:
                problems.append(f"{statement.get('Sid')}: {resource} is not the bucket or a prefix the configs use")
    return problems


def iam_policies() -> list[Path]:
    return sorted((DEPLOY / "aws").glob("*.json"))


@pytest.mark.parametrize("path", iam_policies(), ids=lambda p: p.name)
def test_iam_policies_are_valid_documents(path):
    policy = json.loads(path.read_text())
    assert policy["Version"] == "2012-10-17"
    sids = [s.get("Sid") for s in policy["Statement"]]
    assert all(sids) and len(set(sids)) == len(sids), "every statement names what it is for"
    for statement in policy["Statement"]:
        assert statement["Effect"] in ("Allow", "Deny")
        for action in _as_list(statement["Action"]):
            assert action != "*" and not action.endswith(":*"), f"{statement['Sid']}: {action} grants a whole service"
    validation = pytest.importorskip("moto.iam.policy_validation", reason="moto (dev extra) checks IAM syntax")
    if "trust" in path.name:
        validation.IAMTrustPolicyDocumentValidator(path.read_text()).validate()
    else:
        validation.IAMPolicyDocumentValidator(path.read_text()).validate()


def test_s3_policy_grants_what_the_jobs_do_at_the_configs_locations_and_no_more():
    policy = json.loads(S3_POLICY.read_text())
    assert s3_policy_problems(policy, s3_locations()) == []
    # and the check bites: writes on the data, a listing of the whole bucket, another bucket, no runs
    broken = {
        "data writable": lambda p: p["Statement"].append(
            {"Sid": "X", "Effect": "Allow", "Action": "s3:PutObject", "Resource": p["Statement"][2]["Resource"]}),
        "list without prefixes": lambda p: p["Statement"][0].pop("Condition"),
        "any bucket": lambda p: p["Statement"][4].update(Resource="arn:aws:s3:::*/runs/*"),
        "no run writes": lambda p: p["Statement"][4].update(Action=["s3:GetObject"]),
        "no HEAD of an empty run root": lambda p: p["Statement"].pop(3),
        "ACLs on runs": lambda p: p["Statement"][4]["Action"].append("s3:PutObjectAcl"),
        "no HeadBucket": lambda p: p["Statement"].pop(1),
    }
    for name, breakage in broken.items():
        copy_ = copy.deepcopy(policy)
        breakage(copy_)
        assert s3_policy_problems(copy_, s3_locations()), f"{name}: the broken policy passed"


def test_accounts_roles_and_profiles_agree():
    """One AWS account everywhere; the IRSA role is the one the README's eksctl creates; the head's
    autoscaler may pass exactly the workers' role; the README creates the instance profiles ray up names."""
    readme = (DEPLOY / "README.md").read_text()
    service_account = only("ServiceAccount", "k8s/object-storage.yaml")["metadata"]
    role = service_account["annotations"][IRSA]
    account, role_name = re.fullmatch(r"arn:aws:iam::(\d{12}):role/(.+)", role).groups()
    config = ray_up("ray-up/aws.yaml")
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Arn"] for name, t in config["available_node_types"].items()}
    for arn in profiles.values():
        assert arn.startswith(f"arn:aws:iam::{account}:instance-profile/"), arn
    worker = profiles["gpu"].rsplit("/", 1)[1]
    autoscaler = json.loads((DEPLOY / "aws/ray-up-autoscaler-policy.json").read_text())
    passes = [s for s in autoscaler["Statement"] if "iam:PassRole" in _as_list(s["Action"])]
    assert [s["Resource"] for s in passes] == [f"arn:aws:iam::{account}:role/{worker}"]
    eksctl = re.search(r"eksctl create iamserviceaccount (.+?)(?<!\\)\n", readme, re.S)
    assert eksctl, "the README should create the IRSA role with eksctl"
    command = shlex.split(eksctl[1].replace("\\\n", " "))
    assert {("--role-name", role_name), ("--name", service_account["name"]),
            ("--namespace", service_account["namespace"])} <= set(zip(command, command[1:])), command
    assert "--role-only" in command, "the service account comes from object-storage.yaml, eksctl makes the role only"
    loops = re.findall(r"for role in ([\w -]+); do\n(.*?)\ndone", readme, re.S)
    created = {name for names, body in loops if 'create-instance-profile --instance-profile-name "$role"' in body
               for name in names.split()}
    assert {arn.rsplit("/", 1)[1] for arn in profiles.values()} <= created, "the README should create the profiles"


CREDENTIAL_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_CLIENT_SECRET",
                    "AZURE_STORAGE_ACCOUNT_KEY", "GOOGLE_APPLICATION_CREDENTIALS_JSON"}
KEY_PATTERNS = {
    "an AWS access key id": r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",
    "a secret key set in plain text": r"(?i)\b(?:aws_)?secret_access_key\b\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{16,}",
    "keys in a URI": r"\b(?:s3|gs|abfs|hdfs)://[^/\s:@]+:[^/\s@]+@",
    "a private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
}


def credential_problems(text: str, docs: list[dict]) -> list[str]:
    """Keys in a file's text, or in its Kubernetes objects: a Secret with data, a credential variable
    with a value (only valueFrom, a reference, is allowed), a ConfigMap key named like a credential."""
    problems = [what for what, pattern in KEY_PATTERNS.items() if re.search(pattern, text)]
    for doc in docs:
        if doc.get("kind") == "Secret":
            problems.append("a Secret in a manifest: create it with kubectl instead")
        if doc.get("kind") == "ConfigMap" and CREDENTIAL_NAMES & set(doc.get("data", {})):
            problems.append("a credential in a ConfigMap")
        for node in walk(doc):
            if isinstance(node, dict) and node.get("name") in CREDENTIAL_NAMES and "value" in node:
                problems.append(f"{node['name']} set in plain text")
    return problems


def test_no_file_carries_a_storage_key():
    files = [p for p in [*DEPLOY.rglob("*"), *(ROOT / "jobs").rglob("*")] if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) > 20
    for path in files:
        text = path.read_text()
        docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)] if path.suffix == ".yaml" else []
        embedded = [m.doc for m in manifests() if m.source.startswith(f"{path.relative_to(DEPLOY)}:")] \
            if path.is_relative_to(DEPLOY) else []
        assert credential_problems(text, docs + embedded) == [], path
    # the check bites
    cluster = copy.deepcopy(only("RayCluster", "k8s/raycluster.yaml"))
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "made-up"}]
    assert credential_problems("", [cluster]) == ["AWS_SECRET_ACCESS_KEY set in plain text"]
    assert len(credential_problems("AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY\n"
                                   "id: AKIAIOSFODNN7EXAMPLE\ninput: s3://AKIA:secret@bucket/x", [])) == 3
    assert credential_problems("", [{"kind": "Secret", "data": {"k": "dg=="}}])
    secret_ref = {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    assert credential_problems("", [{"kind": "Pod", "spec": {"containers": [{"env": [secret_ref]}]}}]) == []


# -- deploy/README.md and the files agree ---------------------------------------------------------

def readme_replacements() -> dict[str, list[str]]:
    """placeholder -> the paths the README's `grep -rl PLACEHOLDER PATHS | xargs sed -i ...` lines cover."""
    readme = (DEPLOY / "README.md").read_text()
    return {placeholder: paths.split() for placeholder, paths in
            re.findall(r"grep -rl (\S+) ([\w./ -]+?) \| xargs sed -i", readme)}


def test_readme_replaces_each_placeholder_everywhere_it_is_used():
    replacements = readme_replacements()
    placeholders = {the_bucket(): "the bucket",
                    re.search(r"::(\d{12}):", json.dumps(ray_up("ray-up/aws.yaml")))[1]: "the AWS account",
                    "registry.example.com/lrpscale:0.1.0": "the image"}
    for placeholder, what in placeholders.items():
        assert placeholder in replacements, f"deploy/README.md should say how to replace {what} ({placeholder})"
        covered = [ROOT / path for path in replacements[placeholder]]
        users = [p for p in [*DEPLOY.rglob("*"), *(ROOT / "jobs").rglob("*")]
                 if p.is_file() and "__pycache__" not in p.parts and placeholder in p.read_text()]
        missed = [str(p.relative_to(ROOT)) for p in users if not any(p.is_relative_to(c) for c in covered)]
        assert users and not missed, f"{what}: the README's replacement misses {missed}"


def test_readme_uploads_and_reads_where_the_configs_point():
    """Every s3:// location in deploy/README.md (uploads, pandas) is one the configs use, or inside or
    above one: the data goes where the jobs read it, and the README reads the runs the jobs write."""
    readme = (DEPLOY / "README.md").read_text()
    bucket = the_bucket()
    readme = re.sub(r"\$\{?BUCKET\}?", bucket, readme)  # shell commands name it $BUCKET
    named = set(re.findall(rf"s3://{re.escape(bucket)}(?:/[\w./-]*\w)?", readme))
    assert {f"s3://{bucket}/runs/audit", f"s3://{bucket}/runs/audit/images"} <= named, "read the audit's run"
    configured = set(s3_locations().values())
    for uri in named:
        assert any(uri == c or uri.startswith(f"{c}/") or c.startswith(f"{uri}/") or uri == f"s3://{bucket}"
                   for c in configured), f"deploy/README.md names {uri}, which no config uses"
    assert 'open_run("s3://' in readme and 'pd.read_parquet("s3://' in readme
