"""The fused CPU selective scan (backbones/mamba_cpu.py, mamba_cpu_scan.cpp) against the literal
per-step loop of the recurrence and the pure-PyTorch scan: outputs and every gradient, shapes that
leave partial channel slabs, threads, and the fallback when the kernel cannot be built."""
import pytest
import torch
from torch.nn import functional as F

from backbones import mamba_cpu
from backbones.mamba import MambaMixer, selective_scan
from test_mamba import scan_inputs, selective_scan_loop

pytestmark = [pytest.mark.skipif(mamba_cpu.load() is None, reason="the fused CPU scan did not build (no C++ compiler?)"),
              pytest.mark.usefixtures("one_thread")]
NAMES = "u delta A B C D z delta_bias".split()


def grads_of(out, inputs, seed=1):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, grad_out)


# 64 channels make one slab in the kernel: 70 and 130 leave partial slabs (64 + 6, 64 + 64 + 2); 300 steps
# fill the backward's per-row state buffer well past the sizes above.
@pytest.mark.parametrize("batch,channels,states,length", [(1, 3, 2, 1), (2, 7, 4, 5), (3, 70, 16, 37),
                                                          (2, 130, 1, 9), (1, 40, 16, 300)])
def test_kernel_matches_the_literal_loop(batch, channels, states, length):
    inputs = [t.requires_grad_() for t in scan_inputs(batch, channels, states, length, seed=channels)]
    u, delta, A, B, C, D, z, bias = inputs
    ours = selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, cpu_kernel=True)
    expected = selective_scan_loop(*inputs)
    assert torch.allclose(ours, expected, rtol=1e-10, atol=1e-12)
    for name, got, want in zip(NAMES, grads_of(ours, inputs), grads_of(expected, inputs)):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-11), name


def test_kernel_without_softplus_matches_the_pure_scan():
    inputs = [t.requires_grad_() for t in scan_inputs(2, 9, 3, 11, seed=5)]
    u, delta, A, B, C, D, z, bias = inputs
    delta_pos = delta.detach().abs().requires_grad_()  # dt itself, no softplus
    outs = [selective_scan(u, delta_pos, A, B, C, D, z=z, delta_bias=bias, delta_softplus=False, cpu_kernel=k)
            for k in (True, False)]
    leaves = [u, delta_pos, A, B, C, D, z, bias]
    assert torch.allclose(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for name, got, want in zip(NAMES, grads_of(outs[0], leaves), grads_of(outs[1], leaves)):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-11), name


def test_float32_kernel_agrees_with_the_float64_loop():
    # float32 with exp from glibc's vector library and reassociated sums: within float32 rounding
    inputs = scan_inputs(4, 96, 16, 64, seed=2, dtype=torch.float32)
    out = selective_scan(*inputs[:6], z=inputs[6], delta_bias=inputs[7], cpu_kernel=True)
    expected = selective_scan_loop(*(t.double() for t in inputs))
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_softplus_kernel_matches_torch_on_both_sides_of_the_threshold():
    x = torch.cat([torch.linspace(-30, 30, 2001), torch.tensor([19.99, 20.0, 20.01, -88.0, 88.0])]).double()
    out = torch.empty_like(x)
    mamba_cpu.load().softplus_f64(x.numel(), x.data_ptr(), out.data_ptr())
    assert torch.allclose(out, F.softplus(x), rtol=1e-14, atol=1e-300)


def test_two_threads_give_bitwise_the_same_result():
    # the work is split over batch rows, each output element has one writer: no order changes
    inputs = [t.float().requires_grad_() for t in scan_inputs(4, 70, 16, 20, seed=7)]
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = selective_scan(*inputs[:6], z=inputs[6], delta_bias=inputs[7], cpu_kernel=True)
        results.append([out] + list(grads_of(out, inputs)))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_mixer_training_step_matches_the_pure_path():
    torch.manual_seed(0)
    mixer = MambaMixer(32).double()
    x = torch.randn(3, 24, 32, dtype=torch.float64, requires_grad=True)
    results = []
    for kernel in (True, False):
        mixer.use_fused_kernels = kernel
        out = mixer(x)
        results.append([out] + list(torch.autograd.grad(out.square().sum(), [x] + list(mixer.parameters()))))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-11)


def test_switched_off_or_unbuildable_falls_back_to_none(monkeypatch, tmp_path):
    build = mamba_cpu.load.__wrapped__  # the uncached loader
    monkeypatch.setenv("TREAD_BENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("TREAD_CPU_SCAN", "0")
    assert build() is None
    monkeypatch.setenv("TREAD_CPU_SCAN", "1")
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="did not build"):
        assert build() is None
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left in the cache


def test_builds_into_the_cache_once(monkeypatch, tmp_path):
    build = mamba_cpu.load.__wrapped__
    monkeypatch.setenv("TREAD_BENCH_CACHE", str(tmp_path))
    assert build() is not None
    (built,) = tmp_path.glob("mamba_cpu_scan-*.so")
    stamp = built.stat().st_mtime_ns
    assert build() is not None and built.stat().st_mtime_ns == stamp  # loaded, not rebuilt
