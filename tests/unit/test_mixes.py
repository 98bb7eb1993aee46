"""deskgen.mixes: canonical ids, the named catalogue, the ad-hoc grammar and its errors."""

from __future__ import annotations

import pytest

from deployments.http_errors import status_of
from deskgen.errors import InvalidParameter, UnknownMix
from deskgen.mixes import BASE_MIX_ID, NAMED_MIXES, Mix, MixCatalog, parse_mix_spec

pytestmark = pytest.mark.unit

ADAPTERS = ("dalle", "ott", "3d")


@pytest.fixture
def catalog() -> MixCatalog:
    return MixCatalog(ADAPTERS)


def test_equal_mixes_have_one_canonical_id(catalog: MixCatalog) -> None:
    spellings = ["ott:0.7+3d:0.5", "3d:.50+ott:0.70", " 3d:0.5 + ott:0.7 ", "ott_3d", "3d:0.5+ott:0.7+dalle:0"]
    ids = {catalog.resolve(spec).id for spec in spellings}
    assert ids == {"3d:0.5+ott:0.7"}
    assert Mix.from_weights({"ott": 0.7, "3d": 0.5}) == catalog.resolve("ott_3d")
    assert Mix.from_weights({"ott": 0.70000001, "3d": 0.5}).id == "3d:0.5+ott:0.7"


def test_different_mixes_have_different_ids(catalog: MixCatalog) -> None:
    ids = [catalog.resolve(name).id for name in NAMED_MIXES]
    assert len(set(ids)) == len(ids)
    assert catalog.resolve("ott:0.7").id != catalog.resolve("ott:0.71").id


@pytest.mark.parametrize(
    ("name", "expected_id"),
    [
        ("dalle_only", "dalle:1.0"),
        ("ott_only", "ott:1.0"),
        ("3d_only", "3d:1.0"),
        ("dalle_ott", "dalle:0.7+ott:0.5"),
        ("dalle_3d", "3d:0.5+dalle:0.7"),
        ("ott_3d", "3d:0.5+ott:0.7"),
        ("mix", "3d:0.4+dalle:0.6+ott:0.4"),
    ],
)
def test_named_mixes_resolve_to_documented_weights(catalog: MixCatalog, name: str, expected_id: str) -> None:
    mix = catalog.resolve(name)
    assert mix.as_dict() == NAMED_MIXES[name]
    assert mix.id == expected_id
    assert list(mix.adapters) == sorted(NAMED_MIXES[name])


def test_base_and_all_zero_mixes_are_the_empty_mix(catalog: MixCatalog) -> None:
    assert catalog.resolve("base") == Mix(())
    assert Mix.from_weights({"dalle": 0.0, "ott": 0}).id == BASE_MIX_ID
    assert catalog.resolve("dalle:0+ott:0.00001") == Mix(())  # rounds to 4 decimals, then drops zeros
    assert Mix(()).adapters == ()


def test_empty_spec_is_refused() -> None:
    with pytest.raises(InvalidParameter, match=r"^`mix` is empty: name a mix or write `adapter:weight\+\.\.\.`\.$"):
        parse_mix_spec("   ")


def test_bare_adapter_name_means_weight_one() -> None:
    assert parse_mix_spec("dalle+ott:0.5") == {"dalle": 1.0, "ott": 0.5}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dalle:2.5", "`mix`: the weight of 'dalle' must be in [0, 2] but is 2.5."),
        ("dalle:-0.1", "`mix`: the weight of 'dalle' must be in [0, 2] but is -0.1."),
        ("dalle:nan", "`mix`: the weight of 'dalle' must be a number but is nan."),
        ("dalle:abc", "`mix`: the weight of 'dalle' must be a number but is 'abc'."),
        ("dalle:1+dalle:0.5", "`mix`: adapter 'dalle' appears twice in 'dalle:1+dalle:0.5'."),
        ("../x:1", "`mix`: adapter names are 1-64 letters, digits, '_' or '-' (no paths) but got '../x'."),
        ("a/b:1", "`mix`: adapter names are 1-64 letters, digits, '_' or '-' (no paths) but got 'a/b'."),
    ],
)
def test_bad_specs_raise_precise_invalid_parameter(catalog: MixCatalog, spec: str, message: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        catalog.resolve(spec)
    assert info.value.message == message
    assert info.value.field == "mix"
    assert status_of(info.value) == 400


def test_weight_out_of_range_in_from_weights() -> None:
    with pytest.raises(InvalidParameter, match=r"the weight of 'ott' must be in \[0, 2\] but is 3"):
        Mix.from_weights({"ott": 3})


def test_unknown_adapter_lists_available(catalog: MixCatalog) -> None:
    with pytest.raises(UnknownMix) as info:
        catalog.resolve("nope:0.5+ott:1")
    assert info.value.message == "`mix`: unknown adapter 'nope'; available adapters are ['3d', 'dalle', 'ott']."
    assert status_of(info.value) == 404
    assert info.value.to_dict() == {"code": "unknown_mix", "message": info.value.message, "field": "mix"}


def test_unknown_named_mix_lists_named_mixes(catalog: MixCatalog) -> None:
    with pytest.raises(UnknownMix) as info:
        catalog.resolve("vaporwave", field="style")
    assert info.value.field == "style"
    assert info.value.message.startswith("`style`: unknown mix 'vaporwave'; named mixes are ['3d_only', 'dalle_3d',")


def test_named_catalog_must_only_use_available_adapters() -> None:
    with pytest.raises(UnknownMix, match=r"`mixes.dalle_only`: unknown adapter 'dalle'"):
        MixCatalog(["ott", "3d"])
    custom = MixCatalog(["ott"], named={"soft": {"ott": 0.25}})
    assert custom.resolve("soft").id == "ott:0.25"
