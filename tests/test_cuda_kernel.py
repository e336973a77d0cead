"""The CUDA sampling kernel: build (nvcc, no spills), host-side logic, a numpy emulation of the kernel's
algorithm against the numpy sampler, and (``gpu``) the real kernel against the numpy sampler."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from illume_edge.runtime import sampler
from illume_edge.runtime.cuda import build, emulation as em, kernel
from illume_edge.runtime.sampler import SamplingParams

NVCC = build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set NVCC or put it on PATH)")

PTXAS_SAMPLE = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'illume_sample_f16' for 'sm_87'
ptxas info    : Function properties for illume_sample_f16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 62 registers, used 1 barriers, 34144 bytes smem, 464 bytes cmem[0], 88 bytes cmem[2]
ptxas info    : Compiling entry function 'illume_sample_f32' for 'sm_87'
ptxas info    : Function properties for illume_sample_f32
    16 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, 8 bytes lmem, 34144 bytes smem, 464 bytes cmem[0]
ptxas info    : Compiling entry function 'illume_greedy_f16' for 'sm_87'
ptxas info    : Function properties for illume_greedy_f16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1224 bytes smem, 464 bytes cmem[0]
ptxas info    : Compiling entry function 'illume_greedy_f32' for 'sm_87'
ptxas info    : Function properties for illume_greedy_f32
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1224 bytes smem, 464 bytes cmem[0]
"""


# ---------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------
def test_parse_ptxas_captured_text():
    a, b, g16, g32 = build.parse_ptxas(PTXAS_SAMPLE)
    assert (g16.function, g16.registers, g16.smem_bytes, g16.spills) == ("illume_greedy_f16", 40, 1224, False)
    assert (a.function, a.arch, a.registers, a.smem_bytes, a.spill_stores, a.spill_loads) == \
        ("illume_sample_f16", "sm_87", 62, 34144, 0, 0)
    assert not a.spills
    assert (b.registers, b.stack_bytes, b.spill_stores, b.spill_loads, b.lmem_bytes) == (255, 16, 24, 20, 8)
    assert b.spills


@needs_nvcc
@pytest.mark.parametrize("arch", build.ARCHS)
def test_nvcc_compiles_without_spills(arch, tmp_path):
    stats = build.compile_cubin(arch, tmp_path / f"s{arch}.cubin")  # raises on spills / stack / lmem
    assert {s.function for s in stats} == set(build.ENTRY_POINTS.values())
    for s in stats:
        assert s.arch == f"sm_{arch}" and not s.spills
        assert s.registers <= 65536 // build.BLOCK  # a full block fits one SM's register file
        smem = kernel.greedy_shared_memory_bytes() if "greedy" in s.function else kernel.shared_memory_bytes()
        assert s.smem_bytes == smem <= 48 * 1024  # static, no opt-in needed
    assert (tmp_path / f"s{arch}.cubin").stat().st_size > 0


def test_spills_fail_the_build(monkeypatch, tmp_path):
    class R:
        returncode, stdout, stderr = 0, "", PTXAS_SAMPLE
    monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: R())
    with pytest.raises(build.KernelBuildError, match="spills"):
        build.compile_cubin(87, tmp_path / "x.cubin", nvcc="/bin/true")


def test_package_imports_without_cuda():
    import illume_edge.runtime.cuda as pkg
    assert pkg.GpuSampler and pkg.load_kernel


def test_missing_binding_is_named(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith(("pycuda", "cuda")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(kernel.CudaUnavailableError, match="pycuda or cuda-python"):
        kernel.GpuSampler()
    with pytest.raises(build.KernelBuildError, match="cuda-python"):
        build.nvrtc_compile(90)


# ---------------------------------------------------------------------------------------------------
# loader decisions, sizes, packing
# ---------------------------------------------------------------------------------------------------
MAN = {"cuda_version": 12040, "source_sha256": build.source_sha256(),
       "cubins": {"87": "sampling.sm_87.cubin", "89": "sampling.sm_89.cubin", "90": "sampling.sm_90.cubin"}}


@pytest.mark.parametrize("sm,drv,kind,arch", [
    (87, 12040, "cubin", 87), (89, 12060, "cubin", 89), (90, 13000, "cubin", 90),
    (90, 12020, "nvrtc", 90),   # driver older than the build's toolkit
    (86, 12040, "nvrtc", 86),   # sm_87 cubin does not run on sm_86
    (80, 12040, "nvrtc", 80), (100, 13000, "nvrtc", 100), (120, 13000, "nvrtc", 120)])
def test_choose_kernel_source(sm, drv, kind, arch, tmp_path):
    c = kernel.choose_kernel_source(sm, drv, MAN, tmp_path)
    assert (c.kind, c.arch) == (kind, arch)
    if kind == "cubin":
        assert c.path == tmp_path / f"sampling.sm_{arch}.cubin"


def test_choose_without_manifest_uses_nvrtc():
    assert kernel.choose_kernel_source(90, 13000, None).kind == "nvrtc"


def test_cubins_from_another_source_are_not_loaded():
    """Cubins built from an older sampling.cu take other launch arguments (the kernel would read the ones it
    knows and ignore the rest: a silent wrong result), so a manifest without this source's hash goes to
    NVRTC, saying why."""
    for stale in ({**MAN, "source_sha256": "0" * 64}, {k: v for k, v in MAN.items() if k != "source_sha256"}):
        c = kernel.choose_kernel_source(90, 13000, stale)
        assert c.kind == "nvrtc" and "another sampling.cu" in c.reason and "make kernels" in c.reason
    assert kernel.choose_kernel_source(90, 13000, MAN).kind == "cubin"


class FakeBinding:
    """Stands in for pycuda/cuda-python: records what load_kernel does."""
    def __init__(self, sm, drv):
        self.sm, self.driver_version, self.loaded = sm, drv, None

    def load(self, image, names):
        self.loaded = image
        return dict(names)


def test_load_kernel_with_fake_driver(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text(__import__("json").dumps(MAN))
    (tmp_path / "sampling.sm_89.cubin").write_bytes(b"CUBIN89")
    b, fns, choice = kernel.load_kernel(tmp_path, FakeBinding(89, 12040))
    assert choice.kind == "cubin" and b.loaded == b"CUBIN89" and fns["float16"] == "illume_sample_f16"
    monkeypatch.setattr(kernel, "nvrtc_compile", lambda arch: f"NVRTC{arch}".encode())
    b, _, choice = kernel.load_kernel(tmp_path, FakeBinding(89, 12000))
    assert choice.kind == "nvrtc" and b.loaded == b"NVRTC89"


def test_sizes_bounded():
    assert kernel.shared_memory_bytes() < 48 * 1024  # independent of V and k
    assert kernel.workspace_bytes(8, 131072) == 8 * 3 * 4 * 131072


def test_pack_launch():
    p = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, cfg_scale=3.0, repetition_penalty=1.05)
    la = kernel.pack_launch(2, p, [0.25, 0.5], v=100, range_start=1000, has_uncond=True,
                            generated_ids_per_row=[[1000, 5, 1099, 1100], []])
    assert la.cond_row.tolist() == [0, 1] and la.uncond_row.tolist() == [2, 3]
    assert la.params.dtype == np.float64 and la.params[0].tolist() == [0.7, 0.9, 3.0, 1.05]
    assert la.top_k.tolist() == [5, 5] and la.uniforms.tolist() == [0.25, 0.5]
    assert la.pen_offsets.tolist() == [0, 2, 2] and la.pen_ids.tolist() == [1000, 1099]
    assert la.grid == (2, 1, 1) and la.block == (build.BLOCK, 1, 1)
    assert la.bans.shape == (0, 2) and la.bans.dtype == np.int32
    la = kernel.pack_launch(1, SamplingParams(temperature=0.0), None, v=10, has_uncond=True,
                            banned=[(3, 5), (1200, 1300)])
    assert la.uncond_row.tolist() == [-1]  # cfg_scale 1: no uncond read
    assert la.bans.tolist() == [[3, 5], [1200, 1300]]  # global ids: the kernel clips them to its range
    for bad in ([(5, 3)], [(-1, 2)], [(0, 2 ** 31)]):
        with pytest.raises(ValueError, match="banned"):
            kernel.pack_launch(1, SamplingParams(temperature=0.0), None, v=10, banned=bad)
    with pytest.raises(ValueError, match="uniforms"):
        kernel.pack_launch(1, SamplingParams(), None, v=10)


# ---------------------------------------------------------------------------------------------------
# emulation of the kernel's algorithm vs the numpy sampler
# ---------------------------------------------------------------------------------------------------
def _case(rng, i):
    v = int(rng.choice([37, 512, 1000, 3001, 9000]))
    x = (rng.standard_normal((1, v)) * rng.choice([0.5, 3.0, 10.0])).astype(np.float32)
    if i % 4 == 0:
        x = np.round(x * 2) / 2  # many exact ties
    if i % 6 == 0:
        x[0, rng.integers(0, v, v // 3)] = -np.inf
    if i % 9 == 0:
        x[0, rng.integers(0, v, 5)] = -0.0
    k = int(rng.choice([0, 1, 2, 17, 256, v // 2, v - 1, v, v + 5]))
    p = float(rng.choice([1.0, 1.0, 0.95, 0.8, 0.3, 1e-4]))
    t = float(rng.choice([0.0, 0.49, 0.7, 1.0, 1.5]))
    return x, k, p, t


def test_radix_kth_matches_partition():
    rng = np.random.default_rng(1)
    for _ in range(50):
        x = np.round(rng.standard_normal(2000) * 4).astype(np.float32)
        k = int(rng.integers(1, 2000))
        kth, need = em.radix_kth(em.fkey(x), k)
        ref = np.sort(x)[::-1][k - 1]
        assert em.keyf(kth) == ref and need == k - int((x > ref).sum())


def test_emulation_matches_sampler():
    rng = np.random.default_rng(1234)
    agree = total = 0
    greedy_bad = []
    for i in range(600):
        x, k, p, t = _case(rng, i)
        u = rng.random(1)
        a = int(sampler.sample(x, temperature=t, top_k=k, top_p=p, uniforms=u)[0])
        b = em.sample_row(x[0], t, k, p, float(u[0]))
        total += 1
        agree += a == b
        if t == 0 and a != b:
            greedy_bad.append(i)
    assert not greedy_bad
    assert agree / total >= 0.999, (agree, total)


def test_emulation_guided_full_vocab():
    """CFG + repetition penalty + the real sizes (98k codes, top-k 2048 / 6144 / off) as guided_sample."""
    rng = np.random.default_rng(7)
    v, start = 98304, 151680
    agree = total = 0
    for i, (k, p) in enumerate([(2048, 1.0), (6144, 0.9), (0, 0.95), (0, 1.0), (4096, 0.8), (2048, 1.0)]):
        cond = (rng.standard_normal((1, v)) * 2).astype(np.float32)
        uncond = (rng.standard_normal((1, v)) * 2).astype(np.float32)
        gen = [list(start + rng.integers(0, v, 300)) + [5, 3]]
        params = SamplingParams(temperature=[0.7, 1.0, 0.49, 1.0, 0.9, 0.0][i], top_k=k, top_p=p,
                                cfg_scale=3.0, repetition_penalty=1.05)
        for _ in range(3):
            u = rng.random(1)
            a = sampler.guided_sample(cond, uncond, params, u, range_start=start, generated_ids_per_row=gen)
            b = em.emulate_guided_sample(cond, uncond, params, u, range_start=start, generated_ids_per_row=gen)
            total += 1
            agree += int(a[0] == b[0])
    assert agree == total


def _ban_case(rng, v, start):
    """Random global [start, stop) ranges: inside the row, straddling either edge, outside it, empty."""
    cuts = np.sort(rng.integers(start - v // 4, start + v + v // 4, 2 * int(rng.integers(1, 5))))
    return [(max(int(a), 0), max(int(b), 0)) for a, b in cuts.reshape(-1, 2)]


def test_emulation_bans_match_the_masked_sampler():
    """Stage 1b: the kernel's ban ranges give guided_sample's token on logits masked on the host
    (grammar.ban_ranges), with the penalty listing banned ids too, and never a banned id; a row whose every
    id is banned is invalid (-1), as the kernel flags it."""
    from illume_edge.runtime.grammar import ban_ranges

    rng = np.random.default_rng(2024)
    agree = total = 0
    for i in range(400):
        x, k, p, t = _case(rng, i)
        v, start = x.shape[1], int(rng.choice([0, 1000]))
        bans = _ban_case(rng, v, start)
        gen = [list(start + rng.integers(0, v, 20))]
        params = SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=1.3)
        u = rng.random(1)
        masked = ban_ranges(x, bans, start)
        b = int(em.emulate_guided_sample(x, None, params, u, range_start=start, generated_ids_per_row=gen,
                                         banned=bans)[0])
        if not np.isfinite(masked).any():
            assert b == -1
            continue
        a = int(sampler.guided_sample(masked, None, params, u, range_start=start, generated_ids_per_row=gen)[0])
        assert not any(lo <= start + b < hi for lo, hi in bans), (i, b, bans)
        total += 1
        agree += a == b
    assert total > 300 and agree / total >= 0.999, (agree, total)
    everything = em.emulate_guided_sample(np.zeros((1, 10), np.float32), None, SamplingParams(temperature=0.0),
                                          None, range_start=5, banned=[(0, 100)])
    assert everything.tolist() == [-1]


def test_greedy_by_slices_is_the_samplers_greedy():
    """The greedy entry points' algorithm (a block per slice, then the slices reduced in id order) picks the
    numpy sampler's greedy token: ties inside and across slice boundaries (lowest id), slices of only -inf,
    the penalty, CFG and bans; -1 for NaN/+inf or no finite logit. Slices of 7 to 3000 make many boundaries."""
    rng = np.random.default_rng(11)
    for i in range(600):
        v = int(rng.choice([5, 37, 512, 3001, 9000]))
        cond = np.round(rng.standard_normal(v) * 2).astype(np.float32)  # many exact ties
        uncond = np.round(rng.standard_normal(v)).astype(np.float32) if i % 2 else None
        if i % 5 == 0:
            cond[: v // 2] = -np.inf  # whole slices of -inf
        pen = rng.integers(0, v, 20)
        bans = [(int(a), int(a) + int(rng.integers(0, v // 3 + 1))) for a in rng.integers(0, v, 2)]
        params = SamplingParams(temperature=0.0, cfg_scale=2.0, repetition_penalty=1.3)
        x = em.combined_logits(cond, uncond, params.cfg_scale, params.repetition_penalty, pen, bans)
        want = int(em.emulate_guided_sample(cond[None], None if uncond is None else uncond[None], params, None,
                                            generated_ids_per_row=[pen], banned=bans)[0])
        for slice_len in (7, 64, 3000):
            assert em.greedy_by_slices(x, slice_len) == want, (i, slice_len)
        if want >= 0:  # the first of the largest combined logits
            assert want == int(np.flatnonzero(x == x.max())[0])
    assert em.greedy_by_slices(np.array([1, np.nan, 2], np.float32), 2) == -1
    assert em.greedy_by_slices(np.full(10, -np.inf, np.float32), 3) == -1
    assert em.greedy_by_slices(np.array([3, 1, 3, 3], np.float32), 2) == 0


def test_emulation_invalid_rows():
    assert em.sample_row(np.full(10, -np.inf, np.float32), 1.0, 0, 1.0, 0.5) == -1
    assert em.sample_row(np.array([0, np.nan], np.float32), 1.0, 0, 1.0, 0.5) == -1


# ---------------------------------------------------------------------------------------------------
# the real kernel (needs an NVIDIA GPU; skipped otherwise by tests/conftest.py)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_sampler(tmp_path_factory):
    out = tmp_path_factory.mktemp("cubins")
    if NVCC is not None:
        build.compile_cubins(out)
    return kernel.GpuSampler(out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_kernel_matches_sampler(gpu_sampler, dtype):
    rng = np.random.default_rng(99)
    agree = total = 0
    for i in range(2000):
        x, k, p, t = _case(rng, i)
        x = x.astype(dtype)
        u = rng.random(1)
        params = SamplingParams(temperature=t, top_k=k, top_p=p)
        a = sampler.guided_sample(x.astype(np.float32), None, params, u)
        b = gpu_sampler.sample(x, None, params, u)
        if t == 0:
            assert a[0] == b[0], i
        total += 1
        agree += int(a[0] == b[0])
    assert agree / total >= 0.999, (agree, total)


def _binding_or_skip(name):
    try:
        return {"pycuda": kernel._PyCuda, "cuda-python": kernel._CudaPython}[name]()
    except ImportError as e:
        pytest.skip(f"{name} is not installed here: {e}")


@pytest.mark.gpu
@pytest.mark.parametrize("binding", ["pycuda", "cuda-python"])
@pytest.mark.parametrize("source", ["cubin", "nvrtc"])
def test_gpu_kernel_every_route_draws_the_same_tokens(binding, source, tmp_path):
    """Each binding (pycuda, cuda-python) with each source of the kernel (a cubin nvcc built, or NVRTC at
    run time: the fallback for other archs and older drivers) draws the numpy sampler's tokens, fp32 and
    fp16, guided rows included."""
    b = _binding_or_skip(binding)
    if source == "cubin":
        if NVCC is None:
            pytest.skip("nvcc not found: no cubin to load")
        build.compile_cubins(tmp_path, archs=[b.sm])
    s = kernel.GpuSampler(tmp_path, binding=b)  # with no manifest in tmp_path the kernel comes from NVRTC
    assert (s.choice.kind, s.binding.name) == (source, binding), s.choice
    rng = np.random.default_rng(7)
    agree = total = 0
    for i in range(300):
        x, k, p, t = _case(rng, i)
        u = rng.random(1)
        params = SamplingParams(temperature=t, top_k=k, top_p=p)
        for dtype in (np.float32, np.float16):
            xd = x.astype(dtype)
            want = sampler.guided_sample(xd.astype(np.float32), None, params, u)
            total += 1
            agree += int(s.sample(xd, None, params, u)[0] == want[0])
    v, start = 98304, 151680
    cond, uncond = ((rng.standard_normal((4, v)) * 2).astype(np.float32) for _ in range(2))
    params = SamplingParams(temperature=0.7, top_k=2048, top_p=0.9, cfg_scale=3.0)
    u = rng.random(4)
    guided = s.sample(cond, uncond, params, u, range_start=start)
    total += 4
    agree += int((guided == sampler.guided_sample(cond, uncond, params, u, range_start=start)).sum())
    assert agree / total >= 0.999, (agree, total)


@pytest.mark.gpu
@pytest.mark.parametrize("binding", ["pycuda", "cuda-python"])
def test_gpu_token_reads_one_step_late(binding, tmp_path):
    """Each binding: tokens read one step late (`read_async` after each launch, `wait` after the next launch
    was queued, as the decode loops do with DevicePick) are the numpy sampler's, although every launch writes
    the same 8-byte buffer and uploads its own uniform: the copy back and the uploads keep stream order."""
    b = _binding_or_skip(binding)
    s = kernel.GpuSampler(tmp_path, binding=b)
    rng = np.random.default_rng(5)
    v, steps = 5000, 24
    x = (rng.standard_normal((steps, v)) * 3).astype(np.float32)
    u = rng.random(steps)
    params = SamplingParams(temperature=0.9, top_k=64, top_p=0.95)
    logits, out = b.alloc(x.nbytes), b.alloc(8)
    b.htod(logits, x)
    got, ticket = [], None
    for i in range(steps):
        la = kernel.pack_launch(1, params, u[i:i + 1], v=v)
        s.sample_device(b.ptr(logits) + i * v * 4, "float32", v, 0, la, b.ptr(out))
        following = s.read_async(b.ptr(out))
        if ticket is not None:
            got.append(s.wait(ticket))
        ticket = following
    got.append(s.wait(ticket))
    want = [int(sampler.guided_sample(x[i:i + 1], None, params, u[i:i + 1])[0]) for i in range(steps)]
    assert got == want


@pytest.mark.gpu
def test_gpu_kernel_bans(gpu_sampler):
    """Stage 1b on the device: the kernel's tokens equal the emulation's with ban ranges (text decoding)."""
    rng = np.random.default_rng(31)
    agree = total = 0
    for i in range(500):
        x, k, p, t = _case(rng, i)
        start = int(rng.choice([0, 1000]))
        bans = _ban_case(rng, x.shape[1], start)
        params = SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=1.3)
        gen = [list(start + rng.integers(0, x.shape[1], 20))]
        u = rng.random(1)
        want = int(em.emulate_guided_sample(x, None, params, u, range_start=start, generated_ids_per_row=gen,
                                            banned=bans)[0])
        if want < 0:
            with pytest.raises(ValueError, match="no finite logit"):
                gpu_sampler.sample(x, None, params, u, range_start=start, generated_ids_per_row=gen, banned=bans)
            continue
        got = int(gpu_sampler.sample(x, None, params, u, range_start=start, generated_ids_per_row=gen,
                                     banned=bans)[0])
        total += 1
        agree += got == want
    assert agree / total >= 0.999, (agree, total)


@pytest.mark.gpu
def test_gpu_kernel_guided_rows(gpu_sampler):
    rng = np.random.default_rng(5)
    v, start, rows = 98304, 151680, 4
    agree = total = 0
    for step in range(50):
        cond = (rng.standard_normal((rows, v)) * 2).astype(np.float32)
        uncond = (rng.standard_normal((rows, v)) * 2).astype(np.float32)
        gen = [list(start + rng.integers(0, v, 200)) for _ in range(rows)]
        params = SamplingParams(temperature=0.7, top_k=[2048, 6144, 0][step % 3], top_p=[1.0, 0.9][step % 2],
                                cfg_scale=3.0, repetition_penalty=1.05)
        u = rng.random(rows)
        a = sampler.guided_sample(cond, uncond, params, u, range_start=start, generated_ids_per_row=gen)
        b = gpu_sampler.sample(cond, uncond, params, u, range_start=start, generated_ids_per_row=gen)
        total += rows
        agree += int((a == b).sum())
    assert agree / total >= 0.999


@pytest.mark.gpu
def test_gpu_kernel_greedy_over_many_blocks(gpu_sampler):
    """The greedy entry points at the text head's width (151,704 logits: 19 slices a row) draw the numpy
    sampler's greedy tokens: exact ties planted across slice boundaries, CFG pairs, the penalty, bans, slices
    of only -inf, fp32 and fp16; a NaN row gives -1. Each launch leaves the row counters at zero for the next
    (a stale counter would make a wrong block the last)."""
    rng = np.random.default_rng(17)
    v, start = 151704, 0
    for step in range(60):
        rows = 1 + step % 2
        cond = (rng.standard_normal((rows, v)) * 2).astype(np.float32)
        uncond = (rng.standard_normal((rows, v)) * 2).astype(np.float32) if step % 3 else None
        top = float(cond.max()) + 1
        for r in range(rows):  # the same largest value in three slices: the lowest id must win
            cond[r, rng.choice(v, 3, replace=False)] = top
        if step % 4 == 0:
            cond[:, : build.GREEDY_SLICE * 5] = -np.inf
        gen = [list(rng.integers(0, v, 300)) for _ in range(rows)]
        params = SamplingParams(temperature=0.0, cfg_scale=1.0 if uncond is None else 3.0,
                                repetition_penalty=[1.0, 1.2][step % 2])
        bans = [(int(a), int(a) + 5000) for a in rng.integers(0, v - 5000, 2)]
        for dtype in (np.float32, np.float16):
            c = cond.astype(dtype).astype(np.float32)
            u = None if uncond is None else uncond.astype(dtype).astype(np.float32)
            want = em.emulate_guided_sample(c, u, params, None, generated_ids_per_row=gen, banned=bans)
            got = gpu_sampler.sample(cond.astype(dtype), None if uncond is None else uncond.astype(dtype), params,
                                     None, generated_ids_per_row=gen, banned=bans)
            assert got.tolist() == want.tolist(), (step, dtype)
    bad = (rng.standard_normal((1, v))).astype(np.float32)
    bad[0, 100000] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gpu_sampler.sample(bad, None, SamplingParams(temperature=0.0), None)
    ok = gpu_sampler.sample(cond[:1], None, SamplingParams(temperature=0.0), None)  # after the bad row
    assert ok.tolist() == [int(np.argmax(cond[0]))]


@pytest.mark.gpu
def test_gpu_kernel_distribution_chi_square(gpu_sampler):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 16)).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9)
    n = 20000
    us = rng.random(n)
    got = np.bincount([int(gpu_sampler.sample(x, None, params, [u])[0]) for u in us], minlength=16)
    # expected: the numpy sampler's kept set and probabilities
    ref = np.bincount([int(sampler.sample(x, temperature=0.8, top_k=10, top_p=0.9, uniforms=[u])[0])
                       for u in rng.random(n)], minlength=16)
    keep = (got + ref) > 0
    table = np.stack([got[keep], ref[keep]])
    assert stats.chi2_contingency(table)[1] > 1e-3


def _torch_sample(logits, t, k, p, u):
    import torch
    x = torch.as_tensor(logits, device="cuda")
    x = x / t
    if 0 < k < x.shape[-1]:
        kth = torch.topk(x, k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    pr = torch.softmax(x, dim=-1)
    if p < 1:
        sp, si = torch.sort(pr, descending=True, dim=-1)
        cum = sp.cumsum(-1)
        sp = sp.masked_fill(cum - sp > p, 0)
        pr = torch.zeros_like(pr).scatter(-1, si, sp)
    cdf = pr.cumsum(-1)
    return torch.searchsorted(cdf, torch.as_tensor(u, device="cuda").unsqueeze(-1) * cdf[..., -1:])


@pytest.mark.gpu
def test_gpu_kernel_timing(gpu_sampler, capsys):
    """Prints the kernel's time against the numpy and a torch sampler (speed goals live in the benches, not in
    assertions); asserts only that the timed calls drew the same tokens."""
    rng = np.random.default_rng(0)
    rows, v = 2, 98304
    x = (rng.standard_normal((rows, v)) * 2).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_k=2048, top_p=0.9)
    u = rng.random(rows)
    res = {}
    for name, fn in [("numpy", lambda: sampler.guided_sample(x, None, params, u)),
                     ("kernel(host arrays)", lambda: gpu_sampler.sample(x, None, params, u))]:
        fn()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        res[name] = (time.perf_counter() - t0) / 20
    try:
        import torch
        if torch.cuda.is_available():
            _torch_sample(x, 0.7, 2048, 0.9, u)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                _torch_sample(x, 0.7, 2048, 0.9, u)
            torch.cuda.synchronize()
            res["torch"] = (time.perf_counter() - t0) / 20
    except ImportError:
        pass
    # the runtime's path: logits already on the device, the token read back (8 bytes), at the text head's width
    b, tv = gpu_sampler.binding, 151704
    logits = (rng.standard_normal((1, tv)) * 2).astype(np.float32)
    dl, do, tok = b.alloc(logits.nbytes), b.alloc(8), np.zeros(1, np.int64)
    b.htod(dl, logits)
    device = {}
    for name, p, us in (("greedy (many blocks)", SamplingParams(temperature=0.0), None),
                        ("top-k 2048 / top-p 0.9 (a block a row)", params, [0.5])):
        la = kernel.pack_launch(1, p, us, v=tv)
        for i in range(21):
            if i == 1:
                t0 = time.perf_counter()
            gpu_sampler.sample_device(b.ptr(dl), "float32", tv, 0, la, b.ptr(do))
            b.dtoh(tok, do)
        device[name] = (time.perf_counter() - t0) / 20
        if p.temperature == 0:
            assert tok[0] == int(np.argmax(logits[0]))
    b.free(dl)
    b.free(do)
    with capsys.disabled():
        print(f"\nsampling step, 2 x 98304, top-k 2048, top-p 0.9 ({gpu_sampler.binding.name}, "
              f"{gpu_sampler.choice.kind} sm_{gpu_sampler.choice.arch}): " +
              ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in res.items()))
        print(f"device logits, 1 x {tv}, launch + token read back: " +
              ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in device.items()))
    drawn = sampler.guided_sample(x, None, params, u), gpu_sampler.sample(x, None, params, u)
    assert drawn[0].tolist() == drawn[1].tolist()


def test_sample_device_reuses_its_argument_buffers(tmp_path):
    """The image loop launches once per sampled token: the eight argument arrays go up in one copy into one
    buffer, which like the workspace is allocated once and reused, and only grown (the old one freed) when a
    launch needs more; a launch whose arguments are the last one's (greedy text steps) copies nothing. The
    kernel's pointers are that buffer's base plus each array's offset."""
    (tmp_path / "manifest.json").write_text(__import__("json").dumps(MAN))
    (tmp_path / "sampling.sm_89.cubin").write_bytes(b"CUBIN89")

    class Device(FakeBinding):
        def __init__(self):
            super().__init__(89, 12040)
            self.allocs, self.freed, self.launches, self.copied, self.args = [], [], 0, [], []

        def alloc(self, nbytes):
            self.allocs.append(max(int(nbytes), 8))
            return len(self.allocs)  # a handle

        def free(self, buf):
            self.freed.append(buf)

        def ptr(self, buf):
            return 4096 * buf

        def make_stream(self):
            return "stream", 77

        def htod(self, dst, arr, stream=None):
            self.copied.append((dst, np.asarray(arr).copy()))
            self.streams.append(stream)

        def zero(self, dst, nbytes, stream=None):
            self.streams.append(stream)

        def launch(self, fn, grid, block, args, stream=None):
            self.launches += 1
            self.args.append(args)
            self.streams.append(stream)

    dev = Device()
    dev.streams = []
    sampler = kernel.GpuSampler(tmp_path, dev)
    assert sampler.stream_handle == 77
    params = SamplingParams(temperature=1.0, top_k=8, repetition_penalty=1.1)
    for step in range(4):
        la = kernel.pack_launch(1, params, [0.5 if step < 3 else 0.25], v=1000, has_uncond=True,
                                generated_ids_per_row=[[1, 2]], banned=[(3, 9)])
        sampler.sample_device(1 << 20, "float32", 1000, 0, la, 1 << 21)
    assert dev.launches == 4 and dev.freed == [] and len(dev.allocs) == 2  # the arguments + the workspace
    assert set(dev.streams) == {"stream"}  # every upload and launch on the sampler's stream
    # one copy for the three identical launches, one for the fourth's new uniform
    assert dev.allocs[-1] == kernel.workspace_bytes(1, 1000) and len(dev.copied) == 2
    assert {dst for dst, _ in dev.copied} == {1}  # every launch's arguments into the first launch's buffer
    # each pointer argument, read back from the copied bytes at its offset, is the array pack_launch made
    host = dev.copied[-1][1]
    pointers = [a for _, a in dev.args[-1][4:12]]  # cond_row .. bans, in the kernel's order
    for name, address in zip(kernel.ARGUMENT_ARRAYS, pointers):
        want = getattr(la, name)
        off = address - dev.ptr(1)
        assert off % kernel.ARGUMENT_ALIGN == 0, name
        got = host[off:off + want.nbytes].view(want.dtype).reshape(want.shape)
        np.testing.assert_array_equal(got, want, err_msg=name)
    la = kernel.pack_launch(1, params, [0.5], v=4000, has_uncond=True, generated_ids_per_row=[[1, 2, 3, 4, 5]])
    sampler.sample_device(1 << 20, "float32", 4000, 0, la, 1 << 21)
    assert dev.freed == [1, 2] and dev.allocs[2:] == [kernel.pack_arguments(la)[0].nbytes,
                                                       kernel.workspace_bytes(1, 4000)]  # both grew


def test_pycuda_binding_prepares_once_and_works_on_its_stream(tmp_path, monkeypatch):
    """The pycuda binding, on a fake pycuda: each function is prepared once with the kernel's argument format
    (pointer, int64, int32 as in sampling.cu's ILLUME_ARGS) and launched by prepared calls (the H100's host
    spent ~30 us a step in pycuda's per-call argument inspection, docs/gpu.md), on the sampler's own stream,
    with no context synchronize; the arguments go up asynchronously from page-locked memory (an upload from
    pageable memory may wait for the stream's earlier work: the llm and head runs), the greedy counters are
    zeroed on the stream, and `read` is the one wait: the copy back on the stream, then the stream's
    synchronize. Without a stream (stream=False) the same calls are the synchronous ones."""
    import sys
    import types

    calls, pinned = [], []

    class Function:
        def __init__(self, name):
            self.name = name

        def prepare(self, fmt):
            calls.append(("prepare", self.name, fmt))

        def prepared_call(self, grid, block, *args):
            calls.append(("call", self.name, grid, block, args))

        def prepared_async_call(self, grid, block, stream, *args):
            calls.append(("async call", self.name, grid, block, args, stream))

    class Context:
        def push(self):
            pass

        def pop(self):
            pass

        @staticmethod
        def synchronize():
            calls.append(("synchronize",))

    class Stream:
        handle = 0x5EED

        def __init__(self, flags=0):
            assert flags == kernel.STREAM_FLAGS == 1  # non-blocking, as onnxruntime's own streams

        def synchronize(self):
            calls.append(("stream synchronize",))

    class Event:
        def __init__(self, flags=0):
            assert flags == kernel.EVENT_DISABLE_TIMING
            calls.append(("event",))

        def record(self, stream):
            calls.append(("record", stream, self))

        def synchronize(self):
            calls.append(("event synchronize", self))

    def pagelocked_empty(n, dtype):
        pinned.append(np.zeros(n, dtype))
        return pinned[-1]

    def is_pinned(a):
        return any(np.shares_memory(a, p) for p in pinned)

    def dtoh_async(dst, src, stream):
        dst.view(np.int64)[0] = 4242  # the token the kernel wrote
        calls.append(("dtoh async", stream, is_pinned(dst)))

    drv = types.ModuleType("pycuda.driver")
    drv.init = lambda: None
    drv.Device = lambda i: types.SimpleNamespace(retain_primary_context=Context, compute_capability=lambda: (8, 9))
    drv.get_driver_version = lambda: 12040
    drv.Context, drv.Stream, drv.pagelocked_empty, drv.Event = Context, Stream, pagelocked_empty, Event
    drv.event_flags = types.SimpleNamespace(DISABLE_TIMING=kernel.EVENT_DISABLE_TIMING)
    drv.module_from_buffer = lambda image: types.SimpleNamespace(get_function=Function)
    drv.mem_alloc = lambda n: types.SimpleNamespace(n=n, free=lambda: None, __int__=lambda self: 4096)
    drv.memcpy_htod = lambda dst, arr: calls.append(("htod", arr.nbytes))
    drv.memcpy_htod_async = lambda dst, arr, stream: calls.append(("htod async", arr.nbytes, stream,
                                                                    is_pinned(arr)))
    drv.memset_d8 = lambda dst, value, n: calls.append(("memset", n))
    drv.memset_d8_async = lambda dst, value, n, stream: calls.append(("memset async", n, stream))
    drv.memcpy_dtoh = lambda dst, src: calls.append(("dtoh",)) or dst.view(np.int64).fill(77)
    drv.memcpy_dtoh_async = dtoh_async
    pkg = types.ModuleType("pycuda")
    pkg.driver = drv
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    monkeypatch.setattr("atexit.register", lambda fn: None)
    (tmp_path / "manifest.json").write_text(__import__("json").dumps(MAN))
    (tmp_path / "sampling.sm_89.cubin").write_bytes(b"CUBIN89")
    b = kernel._PyCuda()
    b.ptr = lambda buf: 4096  # the fake allocations' address
    sampler = kernel.GpuSampler(tmp_path, b)
    stream = sampler._stream
    assert isinstance(stream, Stream) and sampler.stream_handle == Stream.handle
    la = kernel.pack_launch(1, SamplingParams(temperature=0.7), [0.5], v=1000)
    token = np.zeros(1, np.int64)
    for _ in range(3):
        sampler.sample_device(1 << 20, "float16", 1000, 0, la, 1 << 21, 2, 2)
        sampler.read(token, 1 << 21)
    assert token[0] == 4242
    prepared = [c for c in calls if c[0] == "prepare"]
    assert prepared == [("prepare", "illume_sample_f16", "PqiiPPPPPPPPiqPqiPPPqq")]
    launches = [c for c in calls if c[0] == "async call"]
    assert len(launches) == 3 and launches[0][2:4] == (la.grid, la.block) and launches[0][5] is stream
    assert all(type(a) is int for a in launches[0][4]) and launches[0][4][:4] == (1 << 20, 1000, 0, 1000)
    assert not [c for c in calls if c[0] in ("synchronize", "call", "htod", "dtoh", "memset")]
    (up,) = [c for c in calls if c[0] == "htod async"]  # the arguments, once: the launches repeat them
    assert up == ("htod async", kernel.pack_arguments(la)[0].nbytes, stream, True)
    kinds = [c[0] for c in calls if c[0] in ("async call", "dtoh async", "stream synchronize")]
    assert kinds == ["async call", "dtoh async", "stream synchronize"] * 3
    assert all(c[1] is stream and c[2] for c in calls if c[0] == "dtoh async")  # into page-locked memory
    # greedy rows: the greedy entry point (same arguments), one block per slice of the row
    calls.clear()
    la = kernel.pack_launch(1, SamplingParams(temperature=0.0), None, v=20000)
    sampler.sample_device(1 << 20, "float32", 20000, 0, la, 1 << 21, 2, 2)
    assert [c[1:] for c in calls if c[0] == "prepare"] == [("illume_greedy_f32", "PqiiPPPPPPPPiqPqiPPPqq")]
    (launch,) = [c for c in calls if c[0] == "async call"]
    assert launch[2] == (1, -(-20000 // build.GREEDY_SLICE), 1) == (1, 3, 1)
    # its arguments, and its counters and slice results zeroed on the stream when first allocated
    assert [c[1] for c in calls if c[0] == "htod async"] == [kernel.pack_arguments(la)[0].nbytes]
    assert [c[1:] for c in calls if c[0] == "memset async"] == [(kernel.greedy_workspace_bytes(1, 20000), stream)]
    sampler.read(token, 1 << 21)
    calls.clear()  # the A/B switch: greedy in one block a row again
    sampler.many_block_greedy = False
    sampler.sample_device(1 << 20, "float32", 20000, 0, la, 1 << 21, 2, 2)
    assert [c[1] for c in calls if c[0] == "prepare"] == ["illume_sample_f32"]
    assert [c[2] for c in calls if c[0] == "async call"] == [la.grid]
    sampler.read(token, 1 << 21)
    # a token read one step late: read_async copies into a page-locked slot on the stream and records an event
    # behind it; the next step's launch goes in; wait synchronizes on the first read's event only
    calls.clear()
    values = iter(range(100, 200))

    def dtoh_counting(dst, src, stream):
        dst.view(np.int64)[0] = next(values)
        calls.append(("dtoh async", stream, is_pinned(dst)))

    drv.memcpy_dtoh_async = dtoh_counting
    la = kernel.pack_launch(1, SamplingParams(temperature=0.7), [0.25], v=1000)
    first = sampler.read_async(1 << 21)
    sampler.sample_device(1 << 20, "float16", 1000, 0, la, 1 << 21, 2, 2)
    second = sampler.read_async(1 << 21)
    assert sampler.wait(first) == 100
    third = sampler.read_async(1 << 21)
    assert (sampler.wait(second), sampler.wait(third)) == (101, 102)
    events = [c[2] for c in calls if c[0] == "record"]
    assert [c[0] for c in calls if c[0] != "event"] == [
        "dtoh async", "record", "htod async", "async call", "dtoh async", "record", "event synchronize",
        "dtoh async", "record", "event synchronize", "event synchronize"]
    assert all(c[1] is stream and c[2] for c in calls if c[0] == "dtoh async")  # on the stream, page-locked
    assert all(c[1] is stream for c in calls if c[0] == "record")
    waited = [c[1] for c in calls if c[0] == "event synchronize"]
    assert waited == [events[0], events[1], events[2]] and events[2] is events[0]  # slot 0 free again
    assert not [c for c in calls if c[0] == "stream synchronize"]
    with pytest.raises(RuntimeError, match="no token read 1 is queued"):
        sampler.wait(second)
    tickets = [sampler.read_async(1 << 21) for _ in range(kernel.READ_SLOTS)]
    with pytest.raises(RuntimeError, match=f"{kernel.READ_SLOTS} token reads queued.*ticket {tickets[0]}"):
        sampler.read_async(1 << 21)
    assert [sampler.wait(t) for t in tickets[::-1]] == [106, 105, 104, 103]  # out of order: each its slot's
    # without a stream of its own: the synchronous calls, on the legacy default stream
    calls.clear()
    plain = kernel.GpuSampler(tmp_path, b, stream=False)
    assert plain.stream_handle is None
    plain.sample_device(1 << 20, "float32", 20000, 0, la, 1 << 21, 2, 2)
    plain.read(token, 1 << 21)
    ticket = plain.read_async(1 << 21)
    assert plain.wait(ticket) == token[0] == 77
    assert [c[0] for c in calls if c[0] != "prepare"] == ["htod", "call", "dtoh", "dtoh"]


def test_staging_keeps_in_flight_uploads_intact():
    """Uploads on a stream read page-locked staging memory until a later token read on the stream is done:
    uploads not yet released never share bytes; waiting for the read that closed an epoch frees that epoch's
    chunks (and earlier ones) but not a later epoch's, whose copies may still be in flight; freed chunks are
    reused by size, so a loop stops allocating; a stream synchronize frees everything."""
    made = []

    def pinned(n):
        made.append(np.zeros(n, np.uint8))
        return made[-1]

    st = kernel._Staging(pinned)
    a = st.up(np.arange(10, dtype=np.int64))  # 80 bytes
    b = st.up(np.arange(20, dtype=np.int32))  # 80 bytes
    assert not np.shares_memory(a, b) and a.view(np.int64).tolist() == list(range(10))
    assert st.close() == 0  # a token read queued behind a and b
    c = st.up(np.ones(300, np.uint8))  # the next step's upload, epoch 1: a 512-byte chunk
    assert not any(np.shares_memory(c, x) for x in (a, b))
    assert st.close() == 1
    st.release(0)  # read 0 waited for: a's and b's chunks are free, c's is not
    d = st.up(np.full(4, 7, np.int16))
    e = st.up(np.full(4, 9, np.int16))
    assert {d.ctypes.data, e.ctypes.data} == {a.ctypes.data, b.ctypes.data}  # reused, no new memory
    assert c.tolist() == [1] * 300  # untouched
    n = len(made)
    for step in range(50):  # a decode loop: one upload per step, its read waited for one step late
        st.up(np.arange(step % 7 + 1, dtype=np.float64))
        epoch = st.close()
        st.release(epoch - 1)
    assert len(made) <= n + 2  # the pool serves the loop
    st.synchronized()
    assert not st._busy


def test_binding_falls_through_to_cuda_python_and_names_both(monkeypatch):
    """A pycuda that imports but cannot reach a driver (its own error type from cuInit) falls through to
    cuda-python; when neither works the error names both."""
    class PyCudaError(Exception):
        pass

    def broken():
        raise PyCudaError("cuInit failed: no CUDA-capable device is detected")

    monkeypatch.setattr(kernel, "_PyCuda", broken)
    monkeypatch.setattr(kernel, "_CudaPython", lambda: "cuda-python binding")
    assert kernel._binding() == "cuda-python binding"

    def missing():
        raise ImportError("No module named 'cuda'")

    monkeypatch.setattr(kernel, "_CudaPython", missing)
    with pytest.raises(kernel.CudaUnavailableError, match="pycuda: PyCudaError: cuInit failed.*cuda-python: "
                                                          "ImportError"):
        kernel._binding()


def test_the_wheel_ships_what_the_kernel_build_writes():
    """`make kernels` writes the cubins and their manifest into build.DEFAULT_OUT, inside the package, and the
    package data globs take exactly those files into the wheel (`make wheel`), where load_kernel looks."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["illume_edge"]
    package = root / "illume_edge"
    out = build.DEFAULT_OUT
    written = [out / f"sampling.sm_{a}.cubin" for a in build.ARCHS] + [out / "manifest.json"]
    for path in written:
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel
    assert kernel.DEFAULT_OUT == build.DEFAULT_OUT
