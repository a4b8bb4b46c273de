"""The kernel sources are written once: each backend's source is its prelude around the same body.

Runs everywhere (no GPU needed): the Metal kernels cannot be compiled off Apple silicon, so this
is what checks their sources there.
"""

import re

import pytest

from velox.kernels import source

CUDA_ONLY = ["__shfl", "__syncthreads", "__shared__", "__device__", "__expf", "__int_as_float", "__half",
             "__nv_bfloat16", "__popc", "threadIdx", "blockIdx", "blockDim", "gridDim", "fmaxf"]
METAL_ONLY = ["threadgroup", "simd_", "mem_flags", "metal::", "thread_position", "popcount", "INFINITY"]


def words(text: str, tokens: list[str]) -> list[str]:
    return [t for t in tokens if t in text]


@pytest.mark.parametrize("name", sorted(source.KERNELS))
def test_both_backends_render_the_same_body(name):
    body = source.KERNELS[name][2]
    cuda, metal = source.render(name, "cuda"), source.render(name, "metal")
    for header, src in (cuda, metal):
        assert body in src and source.HELPERS in header
    assert cuda[0] != metal[0] and cuda[1] != metal[1]  # the preludes differ
    assert cuda[0].replace(source.CUDA.header, "") == metal[0].replace(source.METAL.header, "")
    assert cuda[1].replace(source.CUDA.index, "") == metal[1].replace(source.METAL.index, "")


@pytest.mark.parametrize("name", sorted(source.KERNELS))
def test_no_backend_tokens_leak(name):
    """The shared text spells nothing one backend's compiler would reject, and each rendered
    source holds nothing of the other backend."""
    shared = source.HELPERS + source.KERNELS[name][2]
    assert words(shared, CUDA_ONLY + METAL_ONLY) == []
    assert not re.search(r"\buint\b", shared)  # Metal's spelling; CUDA C++ has only unsigned int
    assert "[&]" not in shared  # Metal has no lambdas
    assert words("".join(source.render(name, "metal")), CUDA_ONLY) == []
    assert words("".join(source.render(name, "cuda")), METAL_ONLY) == []


def test_metal_thread_attributes_are_named_in_the_source():
    """MLX's Metal wrapper adds a [[thread attribute]] argument only when the source (not the
    header) names it: the index macros must travel in the source."""
    for name in source.KERNELS:
        header, src = source.render(name, "metal")
        for attribute in ("thread_position_in_threadgroup", "threadgroup_position_in_grid"):
            assert attribute in src and attribute not in header
