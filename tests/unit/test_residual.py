"""The residual that recovers exact base weights from fused ones (:mod:`deskgen.generator.residual`).

Every 16-bit pattern (zeros, subnormals, inf, NaN) is a base value here, against estimates as close as a
subtraction gives and as far as a random pattern; the checksum must catch one changed element."""

from __future__ import annotations

from typing import Any

import pytest

from deskgen.generator import residual

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")

DTYPES = ("bfloat16", "float16", "float32")


def every_pattern(dtype: Any) -> Any:
    """All 65,536 bit patterns of a 16-bit float dtype."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def same_bits(a: Any, b: Any) -> bool:
    view = residual._bits_dtype(a.dtype)
    return a.shape == b.shape and torch.equal(a.view(view), b.view(view))


@pytest.mark.parametrize("name", ("bfloat16", "float16"))
def test_keys_count_the_floats_in_order(name: str) -> None:
    """Sorted by key, the non-NaN floats are sorted by value, adjacent floats have adjacent keys (-0.0 just
    below +0.0), and from_keys inverts keys on every pattern."""
    dtype = getattr(torch, name)
    values = every_pattern(dtype)
    keyed = residual.keys(values)
    assert same_bits(residual.from_keys(keyed, dtype), values)
    assert torch.unique(keyed).numel() == values.numel()
    numbers = ~torch.isnan(values)
    order = torch.argsort(keyed[numbers])
    ranked = values[numbers][order].float()
    assert bool((ranked[1:] >= ranked[:-1]).all())
    assert bool((torch.diff(keyed[numbers][order]) == 1).all())  # NaNs sit at both ends of the key range
    zero = torch.tensor([-0.0, 0.0], dtype=dtype)
    assert residual.keys(zero).tolist() == [-1, 0]


@pytest.mark.parametrize("name", ("bfloat16", "float16"))
def test_every_16_bit_base_comes_back_exactly(name: str) -> None:
    dtype = getattr(torch, name)
    base = every_pattern(dtype)
    gen = torch.Generator().manual_seed(0)
    delta = (torch.randn(base.shape, generator=gen) * 0.05).to(dtype)
    random = torch.randint(-(2**15), 2**15, base.shape, generator=gen, dtype=torch.int32).to(torch.int16).view(dtype)
    # fused - delta is near the base, or far where |delta| dominates; a random "fused" is far everywhere.
    for fused in (base + delta, random):
        found = residual.encode(base, fused, delta)
        back, ok = residual.decode(found, fused, delta)
        assert bool(ok) and same_bits(back, base)
    zero = torch.zeros_like(base)  # nothing fused: only NaNs escape (arithmetic may change their payload)
    found = residual.encode(base, base, zero)
    assert 0 < found.escaped <= int(torch.isnan(base).sum())
    assert bool(torch.isnan(base[found.escape_index.long()]).all())


@pytest.mark.parametrize("name", DTYPES)
def test_a_fused_weight_costs_about_two_bits_a_weight(name: str) -> None:
    """A LoRA-sized delta (8 % of the weights' rms): most codes are 0 or +-1, few escape, and the residual
    is a small fraction of a copy. Odd sizes pack (the last byte padded)."""
    dtype = getattr(torch, name)
    gen = torch.Generator().manual_seed(1)
    base = (torch.randn(301, 257, generator=gen) * 0.03).to(dtype)
    delta = (torch.randn(301, 257, generator=gen) * 0.0025).to(dtype)
    fused = base + delta
    found = residual.encode(base, fused, delta)
    back, ok = residual.decode(found, fused, delta)
    assert bool(ok) and same_bits(back, base)
    assert found.packed.numel() == (base.numel() + 3) // 4
    assert found.escaped < 0.05 * base.numel()
    assert found.nbytes < 0.25 * base.numel() * base.element_size()


@pytest.mark.parametrize("name", DTYPES)
def test_the_checksum_catches_an_estimate_one_ulp_off(name: str) -> None:
    """The scheme's one assumption is that unfuse computes the very ``fused - delta`` the fuse encoded
    against (same weights, same recomputed delta); one that is one ulp off in a single element, or in two
    offsetting elements, fails the checksum."""
    dtype = getattr(torch, name)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(64, 96, generator=gen).to(dtype)
    delta = (torch.randn(64, 96, generator=gen) * 0.1).to(dtype)
    fused = base + delta
    found = residual.encode(base, fused, delta)
    bits = residual._bits_dtype(dtype)
    one = fused.clone()
    one.view(bits)[5, 7] += 1
    pair = fused.clone()
    pair.view(bits)[5, 7] += 1
    pair.view(bits)[9, 2] -= 1
    for wrong in (one, pair):
        back, ok = residual.decode(found, wrong, delta)
        assert not bool(ok) and not same_bits(back, base)
    assert bool(residual.decode(found, fused, delta)[1])


def test_mismatched_inputs_are_refused() -> None:
    base = torch.zeros(4, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="differ"):
        residual.encode(base, base, torch.zeros(4, 4, dtype=torch.float16))
    small = torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"residual of 16 elements for fused \(8,\)"):
        residual.decode(residual.encode(base, base, base), small, small)
    with pytest.raises(TypeError, match="16- and 32-bit floating point"):
        residual.keys(torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name", DTYPES)
def test_the_compiled_codec_gives_the_eager_bits(name: str) -> None:
    """What a GPU replica runs (``torch.compile`` of the elementwise passes; inductor's C++ backend here)
    gives the eager codec's codes, escapes and checksum, and the same base back, from every 16-bit
    pattern (a 32-bit sample): the one float subtraction rounds where eager rounds."""
    dtype = getattr(torch, name)
    gen = torch.Generator().manual_seed(3)
    if dtype == torch.float32:
        base = torch.randn(50_001, generator=gen)
        base[:4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")])
    else:
        base = every_pattern(dtype)
    delta = (torch.randn(base.shape, generator=gen) * 0.05).to(dtype)
    delta[::7] = 0
    fused = base + delta
    compiled = residual.Codec(compiled=True)
    want = residual.encode(base, fused, delta)
    found = compiled.encode(base, fused, delta)
    assert torch.equal(found.packed, want.packed) and torch.equal(found.escape_index, want.escape_index)
    assert same_bits(found.escape_bits.view(dtype), want.escape_bits.view(dtype))
    assert torch.equal(found.checksum, want.checksum)
    back, ok = compiled.decode(found, fused, delta)
    assert bool(ok) and same_bits(back, base)
    compiled.warm_up(dtype, "cpu")


def test_a_compiled_codec_that_fails_falls_back_to_eager(caplog: pytest.LogCaptureFixture) -> None:
    """A compiler that cannot build the kernels on some machine must not take the replica down: the codec
    warns once and runs eager from then on, with the same bits."""
    codec = residual.Codec(compiled=True)

    def broken(*args: Any) -> Any:
        raise RuntimeError("no compiler here")

    codec._encode = broken
    base = torch.randn(1000, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    delta = (base * 0.1).to(torch.bfloat16)
    fused = base + delta
    with caplog.at_level("WARNING"):
        found = codec.encode(base, fused, delta)
    assert not codec.compiled and "no compiler here" in caplog.text
    assert torch.equal(found.packed, residual.encode(base, fused, delta).packed)
    back, ok = codec.decode(found, fused, delta)
    assert bool(ok) and same_bits(back, base)
