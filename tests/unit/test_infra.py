"""infra/: the image, the KubeRay manifests and the AWS cluster config agree with each other and with
the package (versions, image tag, CLI commands, job specs), and each has the fields its tool needs."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from helpers import REPO
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


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every Ray cluster spec in infra/: the RayJob specs' rayClusterSpec, and RayCluster objects."""
    found = [(where, spec["rayClusterSpec"]) for where, spec in rayjob_specs()]
    found += [(f"{path.name}:RayCluster", obj["spec"]) for path, obj in k8s_objects() if obj["kind"] == "RayCluster"]
    return found


def deletes_its_cluster(spec: dict) -> bool:
    """Whether a RayJob spec deletes its Ray cluster once the job succeeds and once it fails: with
    shutdownAfterJobFinishes, or with deletionStrategy rules (KubeRay >= 1.5) that do it."""
    if spec.get("shutdownAfterJobFinishes") is True:
        return True
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules", [])
    done = {r["condition"].get("jobStatus") for r in rules if r["policy"] in ("DeleteCluster", "DeleteSelf")}
    return {"SUCCEEDED", "FAILED"} <= done


def walk(value, path=""):
    """Every (key path, value) in a parsed document, descending into YAML held in strings (ConfigMaps)."""
    if isinstance(value, str) and "\n" in value:
        try:
            inner = yaml.safe_load(value)
        except yaml.YAMLError:
            inner = None
        if isinstance(inner, (dict, list)):
            yield from walk(inner, path + "|")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{path}.{key}", key
            yield from walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from walk(item, f"{path}[{i}]")


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
        assert deletes_its_cluster(spec), where  # the cluster exists for the job only
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
        pool = job.resources.pose_actors
        largest = pool[1] if isinstance(pool, tuple) else pool
        assert largest is None or largest <= gpus, f"{where}: more pose actors than GPUs the cluster may have"


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
    # Both schedulers run the same nightly command, which grows one output with append runs.
    assert rayjob["spec"]["entrypoint"] == cron["jobTemplate"]["entrypoint"]
    nightly = parse_job_spec(yaml.safe_load(job_spec_configmaps()["raypose-nightly"]["data"]["job.yaml"]))
    assert nightly.output.mode == "append" and "--set" not in cron["jobTemplate"]["entrypoint"]


def test_every_ray_cluster_autoscales_its_worker_groups():
    specs = ray_cluster_specs()
    assert len(specs) == 3
    for where, cluster in specs:
        assert cluster.get("enableInTreeAutoscaling") is True, where
        for group in cluster["workerGroupSpecs"]:
            low, high = group["minReplicas"], group["maxReplicas"]
            assert 0 <= low < high, f"{where}: group {group['groupName']} cannot scale ({low}..{high})"
            assert low <= group.get("replicas", low) <= high, where


def test_job_specs_ask_for_an_autoscaling_pose_pool():
    """A job spec in a ConfigMap that sizes its pose pool gives [min, max], and every cluster that runs
    it may grow to max GPU workers (one GPU per pose actor)."""
    config_maps = job_spec_configmaps()
    assert config_maps
    runs_on: dict[str, list[int]] = {}
    for where, spec in rayjob_specs():
        name = _mounted_job_spec(spec, shlex.split(spec["entrypoint"])[2])
        gpus = sum(g["maxReplicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
        runs_on.setdefault(name, []).append(gpus)
    for name, obj in config_maps.items():
        resources = yaml.safe_load(obj["data"]["job.yaml"]).get("resources", {})
        if "pose_actors" not in resources:
            continue
        pool = resources["pose_actors"]
        assert isinstance(pool, list) and len(pool) == 2, f"{name}: pose_actors {pool!r} is not [min, max]"
        low, high = pool
        assert 0 < low < high, f"{name}: pose_actors {pool}"
        assert resources.get("gpus_per_pose_actor", 1) == 1
        assert all(high <= gpus for gpus in runs_on.get(name, [])), f"{name}: max {high} > the GPU workers {runs_on[name]}"


def _exposes_dashboard(cluster: dict) -> bool:
    head = cluster["headGroupSpec"]
    ports = [p for c in head["template"]["spec"]["containers"] for p in c.get("ports", [])]
    return (head.get("rayStartParams", {}).get("dashboard-host") == "0.0.0.0"
            or any(p.get("containerPort") == 8265 or p.get("name") == "dashboard" for p in ports)
            or head.get("enableIngress") is True or "serviceType" in head)


def test_exposed_dashboards_take_a_ray_token():
    """Where the head serves the dashboard / Jobs API beyond itself, KubeRay's authOptions turns on Ray's
    token auth (KubeRay >= 1.5.1, Ray >= 2.52)."""
    exposed = [(where, cluster) for where, cluster in ray_cluster_specs() if _exposes_dashboard(cluster)]
    assert exposed
    for where, cluster in exposed:
        assert cluster.get("authOptions", {}).get("mode") == "token", f"{where}: the dashboard has no token auth"
        major, minor = (int(n) for n in cluster["rayVersion"].split(".")[:2])
        assert (major, minor) >= (2, 52), f"{where}: Ray token auth needs Ray >= 2.52"


def test_deletion_uses_deletion_strategy_not_deletion_policy():
    for path in YAML_FILES:
        assert "deletionPolicy" not in path.read_text(), f"{path.name}: KubeRay >= 1.5 calls it deletionStrategy"
        for doc in documents(path):
            keys = {key for _, key in walk(doc)}
            assert "deletionPolicy" not in keys, path.name
    used = 0
    for where, spec in rayjob_specs():
        strategy = spec.get("deletionStrategy")
        if strategy is None:
            continue
        used += 1
        rules = strategy["deletionRules"]  # the rules form; onSuccess/onFailure are deprecated in 1.5
        assert rules and set(strategy) == {"deletionRules"}, where
        # KubeRay refuses deletionRules next to shutdownAfterJobFinishes (and a TTL without it).
        assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec, where
        ttls: dict[tuple[str, str], dict[str, int]] = {}
        for rule in rules:
            assert rule["policy"] in ("DeleteCluster", "DeleteSelf", "DeleteNone"), where  # DeleteWorkers: not with autoscaling
            condition = rule["condition"]
            [(kind, status)] = [(k, v) for k, v in condition.items() if k in ("jobStatus", "jobDeploymentStatus")]
            assert status in {"jobStatus": ("SUCCEEDED", "FAILED"), "jobDeploymentStatus": ("Failed",)}[kind], where
            per = ttls.setdefault((kind, status), {})
            assert rule["policy"] not in per, f"{where}: two {rule['policy']} rules for {status}"
            per[rule["policy"]] = condition.get("ttlSeconds", 0)
        for per in ttls.values():  # KubeRay: the cluster goes no later than the RayJob
            if "DeleteCluster" in per and "DeleteSelf" in per:
                assert per["DeleteCluster"] <= per["DeleteSelf"], where
    assert used >= 1  # the RayCronJob's RayJobs delete themselves (KubeRay >= 1.6 there)


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


def test_aws_nodes_have_instance_profiles_and_the_head_its_own():
    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    types = config["available_node_types"]
    profiles = {name: t["node_config"].get("IamInstanceProfile") for name, t in types.items()}
    for name, profile in profiles.items():
        assert profile and (profile.get("Name") or profile.get("Arn")), f"{name}: no IamInstanceProfile"
    head = profiles.pop(config["head_node_type"])
    assert head["Name"] == "raypose-head"
    assert {p["Name"] for p in profiles.values()} == {"raypose-worker"}


# --- the README --------------------------------------------------------------------------------


def test_readme_covers_every_file():
    text = (INFRA / "README.md").read_text()
    for path in INFRA.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert path.relative_to(INFRA).as_posix() in text, f"infra/README.md does not mention {path.name}"


def test_the_readmes_head_policy_grants_what_the_launcher_needs():
    text = (INFRA / "README.md").read_text()
    [block] = re.findall(r"```json\n(\{\n  \"Version\".*?)```", text, re.S)
    statements = json.loads(block)["Statement"]
    actions = {a for st in statements for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags",
            "iam:PassRole", "s3:ListBucket", "s3:GetObject", "s3:PutObject"} <= actions
    [pass_role] = [st for st in statements if st["Action"] == "iam:PassRole"]
    assert pass_role["Resource"].endswith(":role/raypose-worker")
    assert all(st["Effect"] == "Allow" for st in statements)
