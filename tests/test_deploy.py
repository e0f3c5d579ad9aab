"""deploy/: every manifest parses and passes the schema the cluster would check it against, and the
pieces agree with each other and with the repository (job scripts, configs, image, RBAC).

Core Kubernetes kinds go through kubernetes-validate (strict, Kubernetes 1.33). KubeRay kinds go
through the openAPIV3Schema of KubeRay 1.7's CRDs (../shared/kuberay-crds, or LRPSCALE_KUBERAY_CRDS),
with the API server's defaulting applied first and unknown fields rejected. Nothing here needs a
cluster, Docker or the network.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
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
                  "ray-up/aws.yaml": "test_ray_up_config_passes_rays_schema"}


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
    assert {"Dockerfile", "README.md", "k8s/raycluster.yaml", "k8s/rayjob-audit.yaml", "k8s/rayjob-reduce.yaml",
            "k8s/raycronjob-reanalyze.yaml", "k8s/cronjob-reanalyze.yaml", "ray-up/aws.yaml",
            "systemd/lrpscale-reanalyze.service", "systemd/lrpscale-reanalyze.timer"} <= names


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
    cronjob = copy.deepcopy(only("CronJob"))
    cronjob["spec"]["concurrencyPolcy"] = "Forbid"  # a typo: strict validation rejects unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, KUBERNETES_VERSION, strict=True)
    pvc = copy.deepcopy(only("PersistentVolumeClaim"))
    pvc["spec"]["accessModes"] = "ReadWriteMany"  # a string where a list belongs
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pvc, KUBERNETES_VERSION, strict=True)


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
    cluster = copy.deepcopy(only("RayCluster"))
    assert crd_errors(cluster, crd_schemas) == []
    BREAKAGES[breakage](cluster)
    assert crd_errors(cluster, crd_schemas), f"{breakage}: the broken RayCluster was accepted"


def test_crd_validator_applies_defaults_and_int_or_string(crd_schemas):
    cluster = copy.deepcopy(only("RayCluster"))
    worker = cluster["spec"]["workerGroupSpecs"][0]
    del worker["minReplicas"], worker["maxReplicas"]  # required, but defaulted (0, 2^31-1) by the server
    worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 8  # int-or-string
    assert crd_errors(cluster, crd_schemas) == []
    assert any("minReplicas" in e for e in crd_errors(cluster, crd_schemas, defaults=False))


# -- the ray up config and the systemd units ----------------------------------------------------

def test_ray_up_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "ray-up/aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # the defaults `ray up` merges, then its schema
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] == 1 for t in workers)
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "ray start" in c)

    config["available_node_types"]["gpu"]["resourcez"] = {"GPU": 1}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


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
    return commands


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
    assert config == ROOT / "jobs/configs" / f"{script.stem}.yaml" and config.is_file(), (
        f"{where}: {script.name} should run with jobs/configs/{script.stem}.yaml, got {args.config}")


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
    ray_up = yaml.safe_load((DEPLOY / "ray-up/aws.yaml").read_text())
    images.setdefault(ray_up["docker"]["image"], set()).add("ray-up/aws.yaml")
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


def test_ray_clusters_share_one_spec():
    standing = only("RayCluster")["spec"]
    assert only("RayJob", "k8s/rayjob-audit.yaml")["spec"]["rayClusterSpec"] == standing
    reduce = only("RayJob", "k8s/rayjob-reduce.yaml")["spec"]["rayClusterSpec"]
    assert reduce["headGroupSpec"] == standing["headGroupSpec"] and "workerGroupSpecs" not in reduce
    scheduled = only("RayCronJob")["spec"]["jobTemplate"]
    assert scheduled["rayClusterSpec"] == standing
    fallback = only("RayJob", "k8s/cronjob-reanalyze.yaml:rayjob.yaml")["spec"]
    assert fallback == scheduled, "the CronJob fallback should create the same RayJob as the RayCronJob"
    for source, spec in ray_job_specs():
        assert spec["shutdownAfterJobFinishes"] is True, source
        assert spec["ttlSecondsAfterFinished"] > 0 and "backoffLimit" in spec, source


def test_head_takes_no_work_and_workers_have_one_gpu():
    clusters = [(m.source, c) for m in manifests() for c in ray_cluster_specs(m.doc)]
    assert len(clusters) == 5
    for source, cluster in clusters:
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0", source
        assert not any("nvidia.com/gpu" in c.get("resources", {}).get(kind, {})
                       for c in head["template"]["spec"]["containers"] for kind in ("requests", "limits")), source
        for group in cluster.get("workerGroupSpecs", []):
            (container,) = group["template"]["spec"]["containers"]
            for kind in ("requests", "limits"):
                assert str(container["resources"][kind]["nvidia.com/gpu"]) == "1", f"{source}: {kind}"


def test_pods_have_resources_shared_data_and_memory_backed_shm():
    pvc = only("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every Ray node mounts the data volume"
    for manifest in manifests():
        for cluster in ray_cluster_specs(manifest.doc):
            for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
                pod = group["template"]["spec"]
                volumes = {v["name"]: v for v in pod["volumes"]}
                (container,) = pod["containers"]
                mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
                assert mounts["/data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
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


def test_rbac_allows_exactly_what_the_cronjob_does():
    cronjob = only("CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_map = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    files = only("ConfigMap")["data"]
    assert only("ConfigMap")["metadata"]["name"] == config_map
    mounted = {f"{mounts[v['name']]}/{key}": text for v in pod["volumes"] if "configMap" in v
               for key, text in files.items()}
    script_path = container["command"][-1]
    assert script_path in mounted, f"the CronJob runs {script_path}, which its ConfigMap does not provide"
    script = mounted[script_path]
    for template in re.findall(r"kubectl create -f (\S+)", script):
        assert yaml.safe_load(mounted[template])["kind"] == "RayJob"
    role, binding = only("Role"), only("RoleBinding")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": sorted(kubectl_verbs(script))}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": cronjob["metadata"]["namespace"]}]
    assert only("ServiceAccount")["metadata"]["name"] == pod["serviceAccountName"]


def cron_period_s(schedule: str) -> int:
    minute, hour, day, month, weekday = schedule.split()
    if minute.isdigit() and hour.isdigit() and (day, month) == ("*", "*"):
        return 86400 if weekday == "*" else 7 * 86400
    raise AssertionError(f"schedule {schedule!r}: teach cron_period_s its period")


def test_scheduled_runs_cannot_overlap():
    raycron, cronjob = only("RayCronJob")["spec"], only("CronJob")["spec"]
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
