"""serve_config.yaml is valid for Ray and for every deployment's own config model."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deployments.captioner import CaptionerConfig
from deployments.classifier import ClassifierConfig
from deployments.generator import DEFAULT_CACHE, MixCache
from deployments.ingress_models import IngressConfig
from deskgen.mixes import NAMED_MIXES, MixCatalog
from deskgen.paths import PROJECT_ROOT
from deskgen.serve_config import load_serve_config
from graph import DeskgenArgs

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load_serve_config()


def deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (app,) = config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def test_config_validates_against_rays_schema(config: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "graph:app"
    assert {d.name for d in app.deployments} == {"Ingress", "Classifier", "Captioner", "Generator", "Recorder", "Locator",
                                                 "JobConsumer"}


def test_resources_match_the_brief(config: dict[str, Any]) -> None:
    d = deployments(config)
    assert d["Captioner"]["ray_actor_options"]["num_gpus"] == 0.25
    assert d["Generator"]["ray_actor_options"]["num_gpus"] == 1
    assert "num_gpus" not in d["Classifier"]["ray_actor_options"]
    for name in ("Classifier", "Generator"):
        auto = d[name]["autoscaling_config"]
        assert auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0
    # A classifier replica must be able to fill a whole batch.
    assert d["Classifier"]["max_ongoing_requests"] >= d["Classifier"]["user_config"]["max_batch_size"]


def test_user_configs_parse_into_the_deployments_models(config: dict[str, Any]) -> None:
    d = deployments(config)
    ingress = IngressConfig.model_validate(d["Ingress"]["user_config"])
    ClassifierConfig.model_validate(d["Classifier"]["user_config"])
    CaptionerConfig.model_validate(d["Captioner"]["user_config"])
    (app,) = config["applications"]
    DeskgenArgs.model_validate(app["args"])
    # The config's catalogue is the documented one, and every mix in it resolves.
    assert ingress.mixes == NAMED_MIXES
    catalog = MixCatalog(["dalle", "ott", "3d"], ingress.mixes)
    assert catalog.resolve("ott_3d").id == "3d:0.5+ott:0.7"
    assert sum(ingress.ab_split.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"ab_split": {"nope": 1.0}}, "not one of the named mixes"),
        ({"ab_split": {"mix": 0}}, "must be > 0"),
        ({"colour": "blue"}, "Extra inputs"),
        ({"default_guidance": 99}, "less than or equal to 30"),
        ({"ab_policy": {"allocation": "greedy"}}, "ab_policy.allocation"),
        ({"ab_policy": {"alpha": 0.5}}, "ab_policy.alpha"),
        ({"ab_policy": {"alpha": 0}}, "ab_policy.alpha"),
        ({"ab_policy": {"mde": 0}}, "ab_policy.mde"),
        ({"ab_policy": {"update_every_s": 0.5}}, "ab_policy.update_every_s"),
        ({"ab_policy": {"primary_metric": "love"}}, "ab_policy.primary_metric"),
        ({"ab_split": {"dalle_ott": 1, "ott_3d": 1}, "ab_policy": {"allocation": "thompson", "floors": {"dalle_ott": 0.6, "ott_3d": 0.5}}},
         "ab_policy.floors: the arms' floors sum to 1.1, past 1"),
        ({"ab_split": {"dalle_ott": 1, "ott_3d": 1}, "ab_policy": {"floors": {"mix": 0.1}}}, "ab_policy.floors: ['mix'] are not arms"),
    ],
)
def test_bad_ingress_config_is_refused(patch: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("[", r"\[")):
        IngressConfig.model_validate(patch)


def test_unknown_config_keys_are_refused() -> None:
    with pytest.raises(ValidationError):
        ClassifierConfig.model_validate({"treshold": 0.4})
    with pytest.raises(ValidationError):
        CaptionerConfig.model_validate({"prefixes": ["a"] * 9})
    with pytest.raises(ValidationError):
        DeskgenArgs.model_validate({"generator": "x"})


def test_a_misspelt_generator_option_fails_the_build_naming_it() -> None:
    """`serve deploy` builds the graph: a typo in generator_options fails there, not in the GPU replica."""
    from deskgen.errors import InvalidParameter
    from graph import build_app

    build_app(DeskgenArgs(generator_options={"fuse_hot_mix": "ott_3d"}))  # a valid option builds
    with pytest.raises(InvalidParameter) as info:
        build_app(DeskgenArgs(generator_options={"fuse_hot_mx": "ott_3d"}))
    assert info.value.field == "fuse_hot_mx" and "not a generator setting" in info.value.message


def test_the_generator_cache_is_checked_at_build_and_keeps_as_many_adapters_as_mixes(config: dict[str, Any]) -> None:
    """`args.generator_cache` sizes Serve's multiplexed LRU and the adapters kept per Generator replica; a bad
    value fails the build naming the field, not a replica later."""
    from graph import build_app

    (app,) = config["applications"]
    assert DeskgenArgs.model_validate(app["args"]).generator_cache == DEFAULT_CACHE == MixCache(mixes=4, keep_adapters=4)
    assert DeskgenArgs(generator_cache={"mixes": 6}).generator_cache.keep_adapters == 6  # type: ignore[arg-type]
    assert MixCache(mixes=6, keep_adapters=None).keep_adapters == 6  # type: ignore[arg-type]  # null in YAML
    assert MixCache(mixes=6, keep_adapters=0).keep_adapters == 0
    build_app(DeskgenArgs(generator_cache=MixCache(mixes=2, keep_adapters=1)))  # what reaches a replica: the serve tier
    for bad, field in (({"mixes": 0}, "mixes"), ({"mixes": "four"}, "mixes"), ({"keep_adapters": -1}, "keep_adapters"),
                       ({"mixs": 3}, "mixs")):  # fmt: skip
        with pytest.raises(ValidationError, match=rf"generator_cache\.{field}"):
            DeskgenArgs.model_validate({"generator_cache": bad})


def test_importing_the_graph_loads_no_model_library() -> None:
    """The ingress process imports graph.py and every deployment module: none may pull in TensorFlow,
    torch, diffusers or transformers (models load in the replicas' constructors)."""
    import subprocess
    import sys

    code = (
        "import sys, graph, deployments.ingress\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
