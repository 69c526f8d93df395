"""infra/: the image, the KubeRay manifests and the AWS cluster config agree with each other and with
the package (versions, image tag, CLI commands, job specs), and each has the fields its tool needs."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement

import raypose
from raypose.config.spec import apply_override, parse_job_spec

ROOT = REPO
INFRA = ROOT / "infra"
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
CRON = re.compile(r"^(\S+\s+){4}\S+$")


def documents(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML document"
    return docs


def k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES if "kuberay" in p.parts for d in documents(p)]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def docker_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", dockerfile(), re.M))


def docker_labels() -> dict[str, str]:
    text = dockerfile().replace("\\\n", " ")
    labels = {}
    for line in re.findall(r"^LABEL\s+(.*)$", text, re.M):
        labels.update(dict(re.findall(r'([\w.-]+)="([^"]*)"', line)))
    return labels


def image() -> str:
    return docker_labels()["io.raypose.image"]


def rayjob_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec in infra/: RayJob objects, RayCronJob templates, the CronJob's template."""
    found = []
    for path, obj in k8s_objects():
        if obj["kind"] == "RayJob":
            found.append((f"{path.name}:RayJob", obj["spec"]))
        elif obj["kind"] == "RayCronJob":
            found.append((f"{path.name}:RayCronJob", obj["spec"]["jobTemplate"]))
        elif obj["kind"] == "ConfigMap":
            for key, text in obj.get("data", {}).items():
                inner = yaml.safe_load(text)
                if isinstance(inner, dict) and inner.get("kind") == "RayJob":
                    found.append((f"{path.name}:{obj['metadata']['name']}/{key}", inner["spec"]))
    return found


def job_spec_configmaps() -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for _, obj in k8s_objects()
            if obj["kind"] == "ConfigMap" and "job.yaml" in obj.get("data", {})}


def cli_commands():
    import typer.main

    from raypose.cli import app

    return typer.main.get_command(app).commands


# --- every file --------------------------------------------------------------------------------


def test_the_infra_files_are_there():
    names = {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*") if p.is_file()}
    assert {"Dockerfile", "constraints.txt", "README.md", "aws/cluster.yaml", "kuberay/rayjob.yaml",
            "kuberay/raycronjob.yaml", "kuberay/cronjob.yaml", "kuberay/nightly-spec.yaml",
            "kuberay/serviceaccount.yaml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_yaml_parses(path):
    for doc in documents(path):
        assert isinstance(doc, dict)


def test_kubernetes_objects_have_their_required_fields():
    kinds = set()
    for path, obj in k8s_objects():
        where = f"{path.name}: {obj.get('kind')}"
        assert obj.get("apiVersion") and obj.get("kind"), where
        metadata = obj.get("metadata") or {}
        assert metadata.get("name") or metadata.get("generateName"), where
        kind = obj["kind"]
        kinds.add(kind)
        required = {"RayJob": "spec", "RayCronJob": "spec", "CronJob": "spec", "ConfigMap": "data",
                    "Role": "rules", "RoleBinding": "roleRef", "ServiceAccount": "metadata"}[kind]
        assert obj.get(required), where
        if kind in ("RayJob", "RayCronJob"):
            assert obj["apiVersion"] == "ray.io/v1", where
    assert {"RayJob", "RayCronJob", "CronJob", "ConfigMap", "ServiceAccount"} <= kinds


def test_rayjobs_run_raypose_on_a_gpu_worker_group():
    specs = rayjob_specs()
    assert len(specs) == 3  # the one-off RayJob, the RayCronJob's template, the CronJob's template
    ray_version = constraints()["ray"]
    for where, spec in specs:
        assert spec["entrypoint"].strip(), where
        assert spec.get("shutdownAfterJobFinishes") is True, where  # the cluster exists for the job only
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == ray_version, where
        head = cluster["headGroupSpec"]
        assert "rayStartParams" in head, where
        [head_container] = head["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in head_container["resources"]["limits"], where
        groups = cluster["workerGroupSpecs"]
        assert groups, where
        gpu_groups = [g for g in groups if any(
            int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"
        for group in gpu_groups:
            assert group["groupName"] and "rayStartParams" in group, where
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
            for container in group["template"]["spec"]["containers"]:
                resources = container["resources"]
                assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], where


def test_entrypoints_use_raypose_commands_and_options_that_exist():
    commands = cli_commands()
    for where, spec in rayjob_specs():
        tokens = shlex.split(spec["entrypoint"])
        assert tokens[0] == "raypose", where
        command = commands.get(tokens[1])
        assert command is not None, f"{where}: `raypose {tokens[1]}` is not a command ({sorted(commands)})"
        options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for token in tokens[2:]:
            if token.startswith("-"):
                assert token.split("=", 1)[0] in options, f"{where}: raypose {tokens[1]} has no {token}"
        assert "--address" not in tokens, f"{where}: on the head, the run joins the cluster in RAY_ADDRESS"


def _mounted_job_spec(spec: dict, path: str) -> str:
    """The ConfigMap name behind a file path on the head, from the head's volumes and mounts."""
    pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in pod["containers"][0].get("volumeMounts", []):
        folder = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(folder):
            config_map = volumes[mount["name"]]["configMap"]
            items = {i["path"]: i["key"] for i in config_map.get("items", [])}
            assert items.get(path[len(folder):], path[len(folder):]) == "job.yaml"
            return config_map["name"]
    raise AssertionError(f"{path} is not mounted on the head")


def test_the_job_spec_each_entrypoint_runs_is_mounted_and_valid():
    """The spec file the entrypoint names comes from a ConfigMap in infra/, and with the
    entrypoint's --set overrides applied it is a valid raypose job (credential-free: no storage
    secrets in a ConfigMap)."""
    config_maps = job_spec_configmaps()
    for where, spec in rayjob_specs():
        tokens = shlex.split(spec["entrypoint"].replace("$(date -u +%Y-%m-%d)", "2026-01-01"))
        name = _mounted_job_spec(spec, tokens[2])
        assert name in config_maps, f"{where}: ConfigMap {name} is not in infra/"
        raw = yaml.safe_load(config_maps[name]["data"]["job.yaml"])
        for i, token in enumerate(tokens):
            if token == "--set":
                apply_override(raw, tokens[i + 1])
        job = parse_job_spec(raw)
        assert job.redacted() == job.model_dump(mode="json"), f"{where}: credentials in a ConfigMap"
        for section in (job.images.path, job.boxes.path, job.output.path):
            assert section is None or "://" in section, f"{where}: a cluster job needs URLs, got {section}"
        gpus = max(g["maxReplicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
        assert job.resources.pose_actors <= gpus, f"{where}: more pose actors than GPUs the cluster may have"


def test_scheduled_variants():
    objects = {obj["kind"]: (path, obj) for path, obj in k8s_objects() if obj["kind"] in ("RayCronJob", "CronJob")}
    cron = objects["RayCronJob"][1]["spec"]
    assert CRON.match(cron["schedule"]) and cron["jobTemplate"]["entrypoint"]
    plain = objects["CronJob"][1]
    assert plain["apiVersion"] == "batch/v1" and CRON.match(plain["spec"]["schedule"])
    assert plain["spec"]["concurrencyPolicy"] == "Forbid"
    pod = plain["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]  # create: the template uses generateName
    template_file = container["command"][3]
    mount = next(m for m in container["volumeMounts"] if template_file.startswith(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    template_map = next(obj for _, obj in k8s_objects()
                        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == volume["configMap"]["name"])
    rayjob = yaml.safe_load(template_map["data"][Path(template_file).name])
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["generateName"]
    # The scheduler may create RayJobs, and nothing else.
    role = next(obj for _, obj in k8s_objects() if obj["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]
    assert pod["serviceAccountName"] == next(
        obj for _, obj in k8s_objects() if obj["kind"] == "RoleBinding")["subjects"][0]["name"]
    # Both schedulers run the same nightly command.
    assert rayjob["spec"]["entrypoint"] == cron["jobTemplate"]["entrypoint"]


# --- the image ---------------------------------------------------------------------------------


def test_one_image_everywhere_and_it_is_the_dockerfiles():
    name = image()
    repository, tag = name.rsplit(":", 1)
    labels, pins = docker_labels(), constraints()
    assert labels["org.opencontainers.image.version"] == raypose.__version__
    assert re.fullmatch(rf"{re.escape(raypose.__version__)}-ray{re.escape(pins['ray'])}-cu\d+", tag), tag
    used = []
    for where, spec in rayjob_specs():
        cluster = spec["rayClusterSpec"]
        pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        used += [(where, c["image"]) for pod in pods for c in pod["spec"]["containers"]]
    launcher = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    docker = launcher["docker"]
    used += [("aws/cluster.yaml", docker[key]) for key in ("image", "head_image", "worker_image") if key in docker]
    for node_type in launcher["available_node_types"].values():
        used += [("aws/cluster.yaml", v) for k, v in node_type.get("docker", {}).items() if k.endswith("image")]
    assert len(used) == 7  # 3 RayJob specs x (head, gpu group) + the launcher
    assert {img for _, img in used} == {name}, [u for u in used if u[1] != name]
    assert f"-t {name} " in dockerfile()  # the build command in its header makes that tag


def test_dockerfile_pins_the_constraints_versions_and_runs_as_a_user():
    text, args, labels, pins = dockerfile(), docker_args(), docker_labels(), constraints()
    for package, arg in (("ray", "RAY_VERSION"), ("torch", "TORCH_VERSION"), ("transformers", "TRANSFORMERS_VERSION")):
        assert args[arg] == pins[package], (arg, args[arg], pins[package])
        assert labels[f"io.raypose.{package}-version"] == pins[package]
        assert re.search(rf'"{package}(\[[\w,]+\])?==\$\{{{arg}\}}"', text), f"{package} is not installed at ${{{arg}}}"
    assert args["RAYPOSE_VERSION"] == raypose.__version__
    assert "COPY infra/constraints.txt" in text
    assert len(re.findall(r"pip install -c /tmp/constraints\.txt", text)) == 2  # dependencies, then raypose
    base = args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), users
    assert re.search(rf"useradd .*--uid 1000 .*{users[-1]}", text)


def test_constraints_satisfy_the_package_requirements():
    import tomllib

    pins = constraints()
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    checked = 0
    for text in requirements:
        requirement = Requirement(text)
        pinned = pins.get(requirement.name.lower())
        if pinned is not None:
            assert requirement.specifier.contains(pinned, prereleases=True), (text, pinned)
            checked += 1
    assert {"ray", "torch", "transformers"} <= set(pins) and checked >= 8


# --- the AWS cluster launcher --------------------------------------------------------------------


def test_aws_cluster_config_is_valid_for_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers", "docker"):
        assert key in config, key
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    validate_config(config)  # Ray's own schema (ray/autoscaler/ray-schema.json), as `ray up` does
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    assert not re.match(r"(g\d|p\d)", head["node_config"]["InstanceType"])  # a CPU head
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpu = [t for t in workers if re.match(r"(g4dn|g5|g6e?|p4d|p5)\.", t["node_config"]["InstanceType"])]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] <= config["max_workers"] for t in gpu)


# --- the README --------------------------------------------------------------------------------


def test_readme_covers_every_file_and_the_1m_image_sizing():
    text = (INFRA / "README.md").read_text()
    for path in INFRA.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert path.relative_to(INFRA).as_posix() in text, f"infra/README.md does not mention {path.name}"
    for fragment in ("1M", "crops/s", "object store", "bytes per row", "assum"):
        assert fragment in text, fragment
