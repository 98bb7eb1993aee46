"""The production cluster configs (cluster/kuberay-rayservice.yaml, cluster/aws-cluster.yaml):
rendered from serve_config.yaml, never edited by hand, and able to run what it asks for.

No cluster needed (unit tier). The resource checks re-derive capacity from the rendered files
themselves — container limits, rayStartParams, node types — not from cluster/render.py's plan.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import render
from deskgen.paths import PROJECT_ROOT

pytestmark = pytest.mark.unit


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return load(render.SERVE_CONFIG)


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return load(render.KUBERAY_FILE)


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return load(render.AWS_FILE)


# ----------------------------------------------------------------------------------------------
# Never drift
# ----------------------------------------------------------------------------------------------


def test_committed_configs_equal_a_fresh_render() -> None:
    stale = render.stale_files(render.render_all())
    assert not stale, "stale generated files, run `python -m cluster.render`:\n" + "\n".join(stale.values())


def test_check_mode_passes_now_and_reports_drift() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.render", "--check"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    drifted = {render.KUBERAY_FILE: render.KUBERAY_FILE.read_text().replace("maxReplicas: 3", "maxReplicas: 9")}
    stale = render.stale_files(drifted)
    assert list(stale) == [render.KUBERAY_FILE]
    assert "-      maxReplicas: 3" in stale[render.KUBERAY_FILE] and "+      maxReplicas: 9" in stale[render.KUBERAY_FILE]


def test_serve_config_v2_is_serve_config_verbatim(rayservice: dict[str, Any], serve_config: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    embedded = rayservice["spec"]["serveConfigV2"]
    assert embedded == render.SERVE_CONFIG.read_text()
    parsed = yaml.safe_load(embedded)
    assert parsed == serve_config
    schema = ServeDeploySchema.model_validate(parsed)
    assert [a.name for a in schema.applications] == ["deskgen"]
    assert schema.applications[0].import_path == "graph:app"


def test_ray_is_pinned_to_one_version_everywhere(rayservice: dict[str, Any], launcher: dict[str, Any]) -> None:
    import ray

    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    assert f'"ray[serve,train]=={render.RAY_VERSION}"' in pyproject
    assert ray.__version__ == render.RAY_VERSION
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == render.RAY_VERSION
    images = [c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster["workerGroupSpecs"]:
        images += [c["image"] for c in group["template"]["spec"]["containers"]]
    images += [launcher["docker"]["image"]] + [
        t["docker"]["worker_image"] for t in launcher["available_node_types"].values() if "docker" in t
    ]
    for image in images:
        assert re.fullmatch(rf"{re.escape(render.REFERENCE_IMAGE_REPO)}:{re.escape(render.RAY_VERSION)}-py311(-gpu)?", image), image
    dockerfile = (PROJECT_ROOT / "cluster" / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE={render.RAY_GPU_IMAGE}\n" in dockerfile
    assert render.RAY_CPU_IMAGE in dockerfile and render.RAY_GPU_IMAGE == f"rayproject/ray:{render.RAY_VERSION}-py311-gpu"


# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------


def test_rayservice_structure(rayservice: dict[str, Any]) -> None:
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayservice["metadata"]["name"])
    spec = rayservice["spec"]
    assert isinstance(spec["serveConfigV2"], str)
    cluster = spec["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}  # Ray 2.60 clients expect token auth
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica next to the GCS / controller
    (head_container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379
    assert ports["serve"] == yaml.safe_load(spec["serveConfigV2"])["http_options"]["port"]
    groups = cluster["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["cpu", "gpu"]
    for g in groups:
        assert 1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())  # KubeRay wants strings
        (container,) = g["template"]["spec"]["containers"]
        assert container["resources"]["limits"] == container["resources"]["requests"]


def test_launcher_config_passes_rays_own_validation(launcher: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["gpu"]["resourcez"] = {}
    with pytest.raises(Exception, match="resourcez"):
        validate_config(prepare_config(broken))


def test_launcher_structure(launcher: dict[str, Any]) -> None:
    assert launcher["provider"]["type"] == "aws" and launcher["provider"]["region"]
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] == "head" and set(types) == {"head", "cpu", "gpu"}
    assert types["head"]["resources"] == {"CPU": 0}
    for name in ("cpu", "gpu"):
        assert 1 <= types[name]["min_workers"] <= types[name]["max_workers"]
        assert types[name]["node_config"]["InstanceType"]
    assert launcher["max_workers"] == types["cpu"]["max_workers"] + types["gpu"]["max_workers"]
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--head" in head_start
    worker_start = " ".join(launcher["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in worker_start and "--address=$RAY_HEAD_IP:6379" in worker_start
    assert "~/.ray/auth_token" in launcher["file_mounts"]


# ----------------------------------------------------------------------------------------------
# The groups can run what serve_config.yaml asks for
# ----------------------------------------------------------------------------------------------


def asks(serve_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """deployment -> {"cpus", "gpus", "custom", "max"} as serve_config.yaml states them."""
    out = {}
    for d in serve_config["applications"][0]["deployments"]:
        options = d.get("ray_actor_options", {})
        scaling = d.get("autoscaling_config")
        out[d["name"]] = {
            "cpus": float(options.get("num_cpus", 1)),
            "gpus": float(options.get("num_gpus", 0)),
            "custom": dict(options.get("resources", {})),
            "max": int(scaling["max_replicas"]) if scaling else int(d.get("num_replicas", 1)),
        }
    return out


def fits(ask: dict[str, Any], node: dict[str, float]) -> bool:
    return (
        ask["cpus"] <= node.get("CPU", 0)
        and ask["gpus"] <= node.get("GPU", 0)
        and all(v <= node.get(k, 0) for k, v in ask["custom"].items())
    )


def capacity_ok(groups: dict[str, tuple[dict[str, float], int]], wants: dict[str, dict[str, Any]]) -> bool:
    """Every deployment's max replicas placed on the groups' nodes at their max counts (greedy)."""
    nodes = [dict(shape) for shape, count in groups.values() for _ in range(count)]
    replicas = sorted(
        (ask for ask in wants.values() for _ in range(ask["max"])), key=lambda a: (a["gpus"], a["cpus"]), reverse=True
    )
    for ask in replicas:
        node = next((n for n in nodes if fits(ask, n)), None)
        if node is None:
            return False
        node["CPU"] -= ask["cpus"]
        node["GPU"] = node.get("GPU", 0) - ask["gpus"]
    return True


def kube_quantity(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def kube_groups(rayservice: dict[str, Any]) -> dict[str, tuple[dict[str, float], int]]:
    """groupName -> (what one pod declares to Ray, maxReplicas), head included (its num-cpus)."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = {}
    head = cluster["headGroupSpec"]
    out["head"] = ({"CPU": float(head["rayStartParams"]["num-cpus"])}, 1)
    for g in cluster["workerGroupSpecs"]:
        (container,) = g["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        declared = {"CPU": kube_quantity(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        param = g["rayStartParams"]["resources"]
        assert param.startswith('"') and param.endswith('"'), param  # KubeRay's quoting
        declared.update(json.loads(param[1:-1].replace('\\"', '"')))
        out[g["groupName"]] = (declared, g["maxReplicas"])
    return out


def launcher_groups(launcher: dict[str, Any]) -> dict[str, tuple[dict[str, float], int]]:
    return {
        name: ({k: float(v) for k, v in t["resources"].items()}, t.get("max_workers", 1))
        for name, t in launcher["available_node_types"].items()
    }


@pytest.mark.parametrize("target", ["kuberay", "launcher"])
def test_groups_cover_what_the_deployments_ask_for(
    target: str, rayservice: dict[str, Any], launcher: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    groups = kube_groups(rayservice) if target == "kuberay" else launcher_groups(launcher)
    wants = asks(serve_config)
    # The pins: CPU deployments only fit CPU nodes, GPU deployments only GPU nodes, nothing the head.
    where = {name: sorted(g for g, (shape, _) in groups.items() if fits(ask, shape)) for name, ask in wants.items()}
    assert where == {"Ingress": ["cpu"], "Classifier": ["cpu"], "Recorder": ["cpu"], "Captioner": ["gpu"], "Generator": ["gpu"],
                     "Locator": ["gpu"], "JobConsumer": ["cpu"]}  # fmt: skip
    assert wants["Generator"]["gpus"] == 1 and wants["Captioner"]["gpus"] == 0.25 and wants["Locator"]["gpus"] == 0.25
    assert groups["gpu"][0]["GPU"] >= 1 and groups["gpu"][0]["gpu_node"] >= 1
    assert groups["cpu"][0]["cpu_node"] >= 1 and "cpu_node" not in groups["gpu"][0]
    # And room for every deployment at its max replicas when the groups are at their max size.
    assert capacity_ok(groups, wants)
    one_node_less = dict(groups, gpu=(groups["gpu"][0], groups["gpu"][1] - 1))
    assert not capacity_ok(one_node_less, wants), "the gpu group is larger than the max replicas need"


def test_render_refuses_a_deployment_it_cannot_place(serve_config: dict[str, Any]) -> None:
    config = copy.deepcopy(serve_config)
    classifier = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Classifier")
    del classifier["ray_actor_options"]["resources"]
    with pytest.raises(ValueError, match=r"`Classifier` must either ask for `num_gpus` or be pinned to CPU nodes"):
        render.plan(config, render.KUBE_CPU, render.KUBE_GPU)


def test_raising_max_replicas_grows_the_group(serve_config: dict[str, Any]) -> None:
    config = copy.deepcopy(serve_config)
    generator = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Generator")
    before = {p.name: p.max_nodes for p in render.plan(config, render.KUBE_CPU, render.KUBE_GPU)}
    generator["autoscaling_config"]["max_replicas"] += 4
    after = {p.name: p.max_nodes for p in render.plan(config, render.KUBE_CPU, render.KUBE_GPU)}
    assert after == {"cpu": before["cpu"], "gpu": before["gpu"] + 2}  # two generators per 2-GPU pod


# ----------------------------------------------------------------------------------------------
# Images: a deployable render names its registry; the committed files cannot be pulled by accident
# ----------------------------------------------------------------------------------------------


def all_images(rayservice: dict[str, Any], launcher: dict[str, Any]) -> list[str]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    images = [c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster["workerGroupSpecs"]:
        images += [c["image"] for c in group["template"]["spec"]["containers"]]
    images += [launcher["docker"]["image"]]
    return images + [t["docker"]["worker_image"] for t in launcher["available_node_types"].values() if "docker" in t]


def test_a_deployable_render_uses_the_given_registry(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.render", "--image-repo", "ghcr.io/acme/deskgen", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path
    rendered = load(folder / render.KUBERAY_FILE.name), load(folder / render.AWS_FILE.name)
    images = set(all_images(*rendered))
    assert images == {f"ghcr.io/acme/deskgen:{render.CPU_TAG}", f"ghcr.io/acme/deskgen:{render.GPU_TAG}"}
    # Everything but the images is the reference rendering.
    reference = load(render.KUBERAY_FILE)
    assert json.dumps(rendered[0]).replace("ghcr.io/acme/deskgen", render.REFERENCE_IMAGE_REPO) == json.dumps(reference)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "a deployable render needs `--image-repo` (or $DESKGEN_IMAGE_REPO)"),
        (["--image-repo", "ghcr.io/acme/deskgen:v1"], {}, "`--image-repo` must be a repository without a tag"),
        (["--image-repo", "Not A Repo"], {}, "`--image-repo` must be a repository without a tag"),
        (["--image-repo", "registry.invalid/deskgen"], {}, "is the reference files' placeholder"),
    ],
)  # fmt: skip
def test_a_deployable_render_without_a_registry_fails_loudly(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    import os

    environment = {k: v for k, v in os.environ.items() if k != render.IMAGE_REPO_ENV} | env
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.render", "--out", str(tmp_path / "never-written"), *args],
        cwd=PROJECT_ROOT, capture_output=True, text=True, env=environment,
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "never-written").exists()


def test_the_reference_files_name_an_unresolvable_registry(rayservice: dict[str, Any], launcher: dict[str, Any]) -> None:
    assert {image.split("/")[0] for image in all_images(rayservice, launcher)} == {"registry.invalid"}
    assert "--image-repo" in render.KUBERAY_FILE.read_text().split("apiVersion")[0]


# ----------------------------------------------------------------------------------------------
# The two targets agree, and pods give Ray's object store real shared memory
# ----------------------------------------------------------------------------------------------


def test_both_targets_remove_idle_nodes_after_the_same_time(rayservice: dict[str, Any], launcher: dict[str, Any]) -> None:
    kube_s = rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]["idleTimeoutSeconds"]
    assert kube_s == launcher["idle_timeout_minutes"] * 60 == render.IDLE_TIMEOUT_S


def test_group_sizes_differ_only_by_node_shape_and_say_so(serve_config: dict[str, Any]) -> None:
    header = render.KUBERAY_FILE.read_text().split("apiVersion")[0]
    for line in render.group_sizes_note(serve_config).splitlines():
        assert line in header and line in render.AWS_FILE.read_text()
    kube = {p.name: p for p in render.plan(serve_config, render.KUBE_CPU, render.KUBE_GPU)}
    aws = {p.name: p for p in render.plan(serve_config, render.AWS_CPU, render.AWS_GPU)}
    for name in ("cpu", "gpu"):  # the same replicas; node counts follow from the shapes alone
        assert kube[name].demands == aws[name].demands
        total_gpus = sum(d.gpus * d.max_replicas for d in kube[name].demands)
        assert kube[name].max_nodes * kube[name].shape.gpus >= total_gpus
        assert aws[name].max_nodes * aws[name].shape.gpus >= total_gpus


def test_every_pod_mounts_memory_backed_dev_shm(rayservice: dict[str, Any]) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for spec in specs:
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert volumes[mount["name"]]["emptyDir"] == {"medium": "Memory"}


# ----------------------------------------------------------------------------------------------
# The real schemas: KubeRay's CRD, Ray's cluster-launcher schema, Serve's models with unknown keys refused
# ----------------------------------------------------------------------------------------------

CRD_SCHEMA = PROJECT_ROOT / "tests" / "data" / "kuberay" / "rayservice-v1.schema.json"


def crd_unknown_fields(document: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields of ``document`` the structural schema does not declare. The API server prunes them
    silently (``kubectl apply --validate=strict`` refuses them): for a config, that is a typo lost."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(document, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in document.items():
            where = f"{path}.{key}" if path else key
            if properties is not None and key in properties:
                out += crd_unknown_fields(value, properties[key], where)
            elif isinstance(extra, dict):
                out += crd_unknown_fields(value, extra, where)
            elif properties is not None or extra is False:
                out.append(where)
    elif isinstance(document, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(document):
            out += crd_unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def crd_problems(document: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = json.loads(CRD_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
    return errors + [f"{field}: unknown field" for field in crd_unknown_fields(document, schema)]


def test_the_rayservice_is_valid_against_kuberays_crd(rayservice: dict[str, Any]) -> None:
    assert crd_problems(rayservice) == []


def test_the_crd_check_catches_typos_and_wrong_types(rayservice: dict[str, Any]) -> None:
    broken = copy.deepcopy(rayservice)
    cluster = broken["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["maxReplica"] = 3
    cluster["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["volumeMount"] = []
    cluster["autoscalerOptions"]["idleTimeoutSeconds"] = "five minutes"
    problems = crd_problems(broken)
    assert "spec.rayClusterConfig.workerGroupSpecs[0].maxReplica: unknown field" in problems
    assert "spec.rayClusterConfig.workerGroupSpecs[1].template.spec.containers[0].volumeMount: unknown field" in problems
    assert any(p.startswith("spec.rayClusterConfig.autoscalerOptions.idleTimeoutSeconds: ") for p in problems)


def test_the_launcher_config_is_valid_against_rays_schema_file(launcher: dict[str, Any]) -> None:
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    broken = copy.deepcopy(launcher)
    broken["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        jsonschema.validate(broken, schema)


def test_serve_config_keys_are_all_known_to_serve(serve_config: dict[str, Any]) -> None:
    render.check_serve_config(serve_config)
    for where, mutate in [
        ("applications[0].deployments[1].autoscaling_config.max_replica",
         lambda c: c["applications"][0]["deployments"][1]["autoscaling_config"].update(max_replica=3)),
        ("applications[0].deployments[0].ray_actor_option",
         lambda c: c["applications"][0]["deployments"][0].update(ray_actor_option={})),
        ("http_options.prot", lambda c: c["http_options"].update(prot=8000)),
    ]:  # fmt: skip
        broken = copy.deepcopy(serve_config)
        mutate(broken)
        with pytest.raises(ValueError, match=re.escape(f"['{where}']")):
            render.check_serve_config(broken)
