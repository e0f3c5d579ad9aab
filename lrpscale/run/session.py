"""The Ray session of an audit: join a cluster or start a loopback-only local Ray, and size the
pool of analyser actors from the cluster's resources."""
from __future__ import annotations

import os
from contextlib import contextmanager

from lrpscale.config import RunConfig


def ensure_ray(address: str | None = None, **local_options) -> None:
    """Join the cluster at ``address`` / RAY_ADDRESS, or start a local Ray: loopback only, no
    dashboard, at least 4 logical CPUs; ``local_options`` go to ``ray.init`` for a local start."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    options = {"include_dashboard": False, "log_to_driver": False, "num_cpus": max(4, os.cpu_count() or 1)}
    with _loopback_only():
        ray.init(**{**options, **local_options})


@contextmanager
def _loopback_only():
    """Start a local Ray whose processes listen on 127.0.0.1 only.

    Ray takes the machine's outward address as the node address and its GCS, raylet and agents
    then listen on every interface (ray-project/ray#59110). Its single-machine switch,
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, keeps them on loopback; Ray reads it when it is
    imported, so the driver's already-imported constant is set too. Both are restored after
    the start: the processes Ray started keep the setting, a later join of a real cluster does not.
    """
    from ray._private import ray_constants

    variable, saved = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    enabled = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[variable], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled
        if saved is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved


# The standard variables through which stores take credentials and endpoints (docs: README, "Object storage")
STORAGE_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "HADOOP_HOME", "ARROW_LIBHDFS_DIR",
)


def storage_options() -> dict:
    """Ray options for tasks and actors that read or write a run or a dataset: the driver's
    storage environment (``STORAGE_VARIABLES`` that are set) as ``runtime_env`` variables, so
    workers reach the same store as the driver (an endpoint set on the command line, keys in a
    shell). Where the nodes have their own credentials (an instance profile, IRSA, Workload
    Identity) the driver has none of these set and nothing is passed."""
    variables = {name: os.environ[name] for name in STORAGE_VARIABLES if name in os.environ}
    return {"runtime_env": {"env_vars": variables}} if variables else {}


def default_actors(config: RunConfig) -> tuple[int, dict]:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    # a CPU actor gets 2 CPUs: Ray limits its torch threads to them (and leaves the rest of a
    # small machine to the decode tasks)
    resources = config.actor_resources or ({"num_gpus": 1} if gpus else {"num_cpus": 2})
    if config.num_actors:
        return config.num_actors, resources
    if "num_gpus" in resources and gpus:
        return max(1, int(gpus / resources["num_gpus"])), resources
    custom = resources.get("resources", {})
    if custom:  # e.g. one accelerator slot per actor advertised as a custom resource
        name, amount = next(iter(custom.items()))
        return max(1, int(ray.cluster_resources().get(name, 0) // amount)), resources
    return 1, resources

