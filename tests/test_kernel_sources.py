"""The kernel sources are written once: each backend's source is its prelude around the same body.

Runs everywhere (no GPU needed): the Metal kernels cannot be compiled off Apple silicon, so this
is what checks their sources there.
"""

import re

import pytest

from conftest import load_script
from velox.kernels import source

CUDA_ONLY = ["__shfl", "__syncthreads", "__shared__", "__device__", "__expf", "__int_as_float", "__half",
             "__nv_bfloat16", "__popc", "__threadfence", "atomicAdd", "__ldcg", "threadIdx", "blockIdx", "blockDim", "gridDim", "fmaxf"]
METAL_ONLY = ["threadgroup", "simd_", "mem_flags", "metal::", "thread_position", "popcount", "INFINITY", "atomic_", "thread_scope"]


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


# ---------------------------------------------------------------- the CUDA source compiles

def _nvrtc():
    """(libnvrtc, CUDA include dir) from the nvidia-cuda-* wheels (dev extra), or skip."""
    try:
        import nvidia.cuda_nvrtc
        import nvidia.cuda_runtime
    except ImportError:
        pytest.skip("needs the nvidia-cuda-nvrtc-cu12 and nvidia-cuda-runtime-cu12 wheels")
    import ctypes
    from pathlib import Path

    lib = Path(list(nvidia.cuda_nvrtc.__path__)[0]) / "lib" / "libnvrtc.so.12"
    return ctypes.CDLL(str(lib)), Path(list(nvidia.cuda_runtime.__path__)[0]) / "include"


CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "uint32": "uint32_t",
              "uint64": "unsigned long long"}


def mlx_cuda_source(inputs: list[str], input_types: list[str], outputs: list[str], output_types: list[str],
                    header: str, body: str, template: dict) -> str:
    """The translation unit MLX's cuda_kernel builds (mlx/backend/cuda/custom_kernel.cpp), with
    stand-ins for what MLX's device headers provide (Shape, fixed-width ints)."""
    args = []
    for n, t in zip(inputs, input_types):
        args.append(f"const {CUDA_TYPES[t]}* {n}")
        if f"{n}_shape" in body:
            args.append(f"const __grid_constant__ Shape {n}_shape")
    args += [f"{CUDA_TYPES[t]}* {n}" for n, t in zip(outputs, output_types)]
    consts = source.constants(template.items(), "cuda")  # FusedDecode bakes the template into the body
    return ("#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
            "typedef unsigned int uint32_t;\ntypedef unsigned char uint8_t;\n"
            "struct Shape { int v[8]; __device__ int operator[](int i) const { return v[i]; } };\n"
            + header + "namespace mlx { namespace core { namespace cu {\n__global__ void kernel(\n"
            + ",\n".join(args) + ") {\n" + consts + body + "\n}\n}}}\n")


def nvrtc_build(src: str, arch: str = "compute_90", extra: tuple[str, ...] = ()) -> tuple[int, str, bytes]:
    """(NVRTC's result, its log, the cubin: empty unless arch is a real one like sm_90) of
    compiling src for arch with extra options."""
    import ctypes

    lib, include = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"decode.cu", 0, None, None) == 0
    opts = [b"--gpu-architecture=" + arch.encode(), b"--std=c++17", b"-I" + str(include).encode()]
    opts += [x.encode() for x in extra]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    cubin = b""
    if rc == 0 and arch.startswith("sm_"):
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        out = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, out)
        cubin = out.raw
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(), cubin


def nvrtc_compile(src: str, arch: str = "compute_90", extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """(NVRTC's result, its log) of compiling src for arch (sm_90 by default) with extra options."""
    return nvrtc_build(src, arch, extra)[:2]


DECODE_INPUT_TYPES = {"q": "float16", "kw": "uint32", "vw": "uint32", "kn": "float16", "vn": "float16",
                      "counter": "uint32", "chain": "float16", "sinks": "float16", "kx": "float16", "vx": "float16"}
# the benchmark shape (Llama-3-8B: 4 query heads per KV head, head_dim 128) at a long context
BENCH_TEMPLATE = dict(R=4, D=128, T=1024, CPT=16, KB=4, VB=4, KSH=True, VSH=True, KPAIR=True, VPAIR=True, PSAME=True,
                      PF=4, MG=8, ROTATE=True, HAD=True, FINISH=True, HAS_SINKS=False, OT="float16", APPEND=False,
                      NDT="float16")


def decode_unit(header: str, body: str, extra_outputs: tuple[tuple[str, str], ...] = (), **template) -> str:
    """The decode kernel's translation unit (``mlx_cuda_source``) for BENCH_TEMPLATE updated with
    template; extra_outputs: (name, type) after the kernel's own outputs."""
    inputs, outputs, _ = source.KERNELS["decode"]
    t = {**BENCH_TEMPLATE, **template}
    return mlx_cuda_source(inputs, [DECODE_INPUT_TYPES.get(n, "float32") for n in inputs],
                           outputs + [n for n, _ in extra_outputs],
                           [t["OT"]] + ["float32"] + [ty for _, ty in extra_outputs], header, body, t)


def test_cuda_decode_kernel_compiles_with_nvrtc():
    """The template combinations the dispatcher launches compile for an sm_90 GPU (tensor-core
    passes) and, for two of them, an sm_75 one (CUDA-core passes), on any machine: the parity tests
    need MLX's CUDA backend, this catches a broken body before that. APPEND (the launch encodes
    the new token) with every rotation and table kind."""
    import itertools

    header, body = (source.compact(x) for x in source.render("decode", "cuda"))  # as FusedDecode compiles it
    combos = [(r, d, cpt, kb, vb) for r, d, cpt in [(4, 128, 16), (3, 64, 16), (8, 128, 8)]
              for kb, vb in [(4, 4), (2, 4), (2, 2)] if cpt * min(kb, vb) % 32 == 0]
    variants = list(itertools.product([True, False], [True, False],
                                      [(True, True, False), (True, True, True), (False, False, False)]))
    # each shape/width combination and each variant at least once (every compile takes ~0.5 s)
    for i in range(max(len(combos), len(variants))):
        (R, D, CPT, KB, VB), (shared, had, (rotate, finish, sinks)) = combos[i % len(combos)], variants[i % len(variants)]
        template = dict(R=R, D=D, T=256, CPT=CPT, KB=KB, VB=VB, KSH=shared, VSH=shared, KPAIR=shared, VPAIR=shared,
                        PSAME=shared and KB == VB, PF=4, ROTATE=rotate, HAD=had, FINISH=finish, HAS_SINKS=sinks,
                        OT="float16" if finish else "float32", APPEND=rotate and finish and not sinks)
        src = decode_unit(header, body, **template)
        rc, log = nvrtc_compile(src)
        assert rc == 0, (template, log[:3000])
        if i < 2:  # before sm_80 (no mma.m16n8k16) the scores and values passes run on CUDA cores, as on Metal
            rc, log = nvrtc_compile(src, "compute_75")
            assert rc == 0, (template, log[:3000])


def test_cuda_decode_kernel_fits_four_blocks_per_sm():
    """Registers decide how many 128-thread blocks share an SM, and the passes are latency-bound:
    above 128 registers a thread, three blocks fit instead of four. The benchmark shape (4 query
    heads per KV head, head_dim 128, pair tables), one query head per KV head, the test model's
    (3, head_dim 64), 2-bit keys and calibrated per-coordinate codebooks at head_dim 64 stay at or
    below 128 without spills (NVRTC, sm_90), with and without APPEND (generation's launches encode
    the new token, bench_attention's do not). ptxas's allocation swings with small edits (a cheaper
    Walsh-Hadamard index took 2-bit keys from 119 to 156 until its loops were kept rolled).
    Known exception: per-coordinate codebooks at head_dim 128 (130)."""
    import re

    header, body = (source.compact(x) for x in source.render("decode", "cuda"))
    for R, D, KB, shared, append in [(4, 128, 4, True, False), (4, 128, 4, True, True), (1, 128, 4, True, True),
                                     (3, 64, 4, True, True), (4, 128, 2, True, True), (3, 64, 4, False, True)]:
        template = dict(R=R, D=D, KB=KB, KSH=shared, VSH=shared, KPAIR=shared, VPAIR=shared, PSAME=shared and KB == 4,
                        T=1024 if KB == 4 else 512, APPEND=append)  # T: what fits next to the pair tables (fused._pairing)
        src = decode_unit(header, body, **template)
        rc, log = nvrtc_compile(src, "sm_90", ("--ptxas-options=-v",))
        used = re.search(r"Used (\d+) registers", log)
        assert rc == 0 and used, log[:3000]
        assert int(used.group(1)) <= 128 and " 0 bytes spill stores" in log, (template, log[-600:])


def test_cuda_append_kernel_compiles_with_nvrtc():
    """The append kernel (one token's codes written into the cache in place) compiles for sm_90
    with every width the dispatcher sends it, dense and Walsh-Hadamard rotations, and each input dtype."""
    inputs, outputs, _ = source.KERNELS["append"]
    header, body = (source.compact(x) for x in source.render("append", "cuda"))
    types = {"kw": "uint32", "vw": "uint32", "kn": "float16", "vn": "float16", "slot": "float16"}
    for D, KB, VB, KHAD, VHAD, x in [(128, 4, 4, True, True, "float16"), (64, 2, 4, False, True, "bfloat16"),
                                     (128, 8, 1, True, False, "float32"), (64, 4, 2, False, False, "float16")]:
        input_types = [x if n in ("kx", "vx") else types.get(n, "float32") for n in inputs]
        template = dict(D=D, KB=KB, VB=VB, KHAD=KHAD, VHAD=VHAD, NDT="float16")
        rc, log = nvrtc_compile(mlx_cuda_source(inputs, input_types, outputs, ["float32"], header, body, template))
        assert rc == 0, (template, log[:3000])


def test_kernel_timeline_instruments_the_current_body():
    """scripts/kernel_timeline.py finds every phase boundary in the body and its kernel compiles."""
    timeline = load_script("kernel_timeline")
    body = timeline.instrumented_body()
    assert body.count("VX_TICK(") == 9 and body.count("ticks[tick_row * 9 + 8] = 0") == 2  # both levels of the merge
    rc, log = nvrtc_compile(decode_unit(source.render("decode", "cuda")[0] + timeline.TICK, source.CUDA.index + body,
                                        extra_outputs=(("ticks", "uint64"),)))
    assert rc == 0, log[:3000]


def test_kernel_scalars_stay_out_of_mlx_small_pool():
    """Scalars the kernels read (the softmax scale) are > 8 bytes: MLX's CUDA allocator puts arrays
    of <= 8 bytes in one managed pool that the CPU writes every Python scalar into, and a kernel
    reading from it stalled ~10 µs per launch on the H200 (the query-rotation phase: 10.8 -> 0.3 µs)."""
    from velox.kernels import fused

    s = fused._scalar(0.125)
    assert s.nbytes > 8 and s[0].item() == 0.125


def test_kernel_variants_edit_the_current_body():
    """scripts/kernel_variants.py finds the text each of its edits replaces, and every edited
    kernel (and one read from a copy of source.py) compiles."""
    variants = load_script("kernel_variants")
    plain = variants.render("plain")
    for name in [*variants.EDITS, f"file:{source.__file__}"]:
        header, body = (source.compact(x) for x in variants.render(name))
        assert (header, body) != plain or name.startswith("file:")
        rc, log = nvrtc_compile(decode_unit(header, body))
        assert rc == 0, (name, log[:3000])
    assert variants.render(f"file:{source.__file__}") == plain == source.render("decode", "cuda")


def test_kernel_sass_counts_the_tensor_core_passes(capsys):
    """scripts/kernel_sass.py compiles the benchmark shape for sm_90 and reads its machine code:
    both passes run on tensor cores, within 6 instructions per code (the CUDA-core passes took ~8)."""
    import re

    _nvrtc()  # skips without the NVRTC wheels
    sass = load_script("kernel_sass")
    try:
        sass.nvdisasm()
    except SystemExit:
        pytest.skip("needs nvdisasm (the nvidia-cuda-nvdisasm wheel)")
    assert sass.main([]) == 0
    out = capsys.readouterr().out
    per_code = [float(x) for x in re.findall(r"\(([\d.]+) per code of a lane\)", out)]
    assert len(per_code) == 2 and all(x <= 6.0 for x in per_code), out
