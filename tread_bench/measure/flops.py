"""Forward and training cost of any network called as ``net(x, noise_labels, class_labels, **kw)``.

Convention (DiT, Peebles & Xie 2023, "Gflops"): one multiply-add (MAC) counts as ONE FLOP, forward pass, batch 1,
no classifier-free-guidance doubling; training cost per image = 3 x forward. Two independent counters must agree:
fvcore (jit trace, on a CPU copy) and ``torch.utils.flop_counter`` (dispatch, MATH SDPA backend, on meta). A
submodule defining ``scan_macs(self, *inputs) -> int`` gets that many MACs added per call, in both counters.
Details: docs/internals.md#tread_benchmeasureflopspy
"""
from __future__ import annotations

import copy
import inspect
import math
from itertools import chain
from typing import Dict, Optional, Sequence

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import einsum_flop_jit, get_shape
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, flop_registry

CONVENTION = ("GFLOPs = 1e9 multiply-adds (DiT convention: 1 MAC = 1 FLOP), forward, batch 1, no CFG; "
              "train = 3 x forward per image; scans by scan_macs (selective scan 9BLDN/direction, Bi-WKV 29TC)")


# ------------------------------------------------------------------------------------------------
# fvcore op handles for what it misses
# ------------------------------------------------------------------------------------------------

def sdpa_macs(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """MACs of softmax(Q K^T) V: Q K^T and A V, each (batch * heads) * Lq * Lk * head_dim."""
    batch_heads = math.prod(q_shape[:-2])
    lq, lk = q_shape[-2], k_shape[-2]
    return batch_heads * lq * lk * (q_shape[-1] + v_shape[-1])


def _sdpa_handle(inputs, outputs) -> int:
    return sdpa_macs(*(get_shape(v) for v in inputs[:3]))


def _baddbmm_handle(inputs, outputs) -> int:
    (b, n, m), (_, _, p) = get_shape(inputs[1]), get_shape(inputs[2])
    return b * n * m * p


def _einsum_handle(inputs, outputs) -> float:
    if "," not in inputs[0].toIValue():  # one operand: a transpose/reduction, no multiply-adds
        return 0
    return einsum_flop_jit(inputs, outputs)


FVCORE_EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_handle,
    "aten::baddbmm": _baddbmm_handle,
    "aten::einsum": _einsum_handle,
}


# ------------------------------------------------------------------------------------------------
# scan hooks, token hooks, inputs
# ------------------------------------------------------------------------------------------------

def scan_modules(root: nn.Module) -> Dict[str, nn.Module]:
    """{qualified name: module} of every submodule that defines ``scan_macs``."""
    return {name: m for name, m in root.named_modules() if callable(getattr(m, "scan_macs", None))}


def call_scan_macs(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """``module.scan_macs`` on the inputs of its forward call: all of them if it takes ``*inputs``,
    else as many leading positional inputs as it names (BiWKV.scan_macs(k) for forward(k, v))."""
    fn = module.scan_macs
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return fn(*args, **kwargs)
    return fn(*args[:sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)])


class _ScanHooks:
    """Adds up ``scan_macs`` over every call of a scan module, and tracks whether one is running."""

    def __init__(self, root: nn.Module):
        self.macs, self.calls, self.depth, self._handles = 0, 0, 0, []
        for module in scan_modules(root).values():
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit, with_kwargs=True))

    def _enter(self, module, args):
        self.depth += 1

    def _exit(self, module, args, kwargs, output):
        self.depth -= 1
        self.calls += 1
        self.macs += int(call_scan_macs(module, args, kwargs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


class _TokenHooks:
    """Records the sequence length each block receives (token reduction shows up here); ``net.blocks`` is
    the hook point of a method network (methods.Method.blocks) and of a bare backbone."""

    def __init__(self, net: nn.Module):
        blocks = getattr(net, "blocks", [])
        self.tokens = [None] * len(blocks)
        self._handles = [b.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(blocks)]

    def _hook(self, index):
        def record(module, args):
            self.tokens[index] = int(args[0].shape[1])
        return record

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def _device(net: nn.Module) -> torch.device:
    for tensor in chain(net.parameters(), net.buffers()):
        return tensor.device
    return torch.device("cpu")


def example_inputs(input_size: int, in_channels: int, num_classes: int, device, batch: int = 1):
    """(x, noise_labels, class_labels) of batch 1; values do not matter for counting."""
    x = torch.zeros(batch, in_channels, input_size, input_size, device=device)
    noise = torch.zeros(batch, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    return x, noise, labels


def materialize_cpu(net: nn.Module) -> nn.Module:
    """A zero-filled CPU copy of a (meta) network, for counters that must really run it."""
    clone = copy.deepcopy(net).to_empty(device="cpu")
    with torch.no_grad():
        for tensor in chain(clone.parameters(), clone.buffers()):
            tensor.zero_()
    return clone


class _CallWithKwargs(nn.Module):
    """fvcore traces positional inputs only; this passes ``force_rate`` and friends through."""

    def __init__(self, net: nn.Module, kwargs: dict):
        super().__init__()
        self.net, self.kwargs = net, kwargs

    def forward(self, *inputs):
        return self.net(*inputs, **self.kwargs)


class _Mode:
    """Puts the net in the mode that does (or does not) reduce tokens, and restores its modes after.

    (The fp32 block a method may run after a route end only changes dtypes, not MACs; the router skips
    autocast on the meta device, and fvcore's CPU copy runs in fp32 anyway.)"""

    def __init__(self, net: nn.Module, routed: bool, force_rate: Optional[float]):
        self.net, self.kwargs = net, {}
        self.train = routed and force_rate is None  # methods reduce tokens in train mode ...
        if routed and force_rate is not None:  # ... or in eval mode at a forced rate
            self.kwargs = {"force_rate": float(force_rate)}

    def __enter__(self):
        self.saved = {m: m.training for m in self.net.modules()}
        self.net.train(self.train)
        return self.kwargs

    def __exit__(self, *exc):
        for module, training in self.saved.items():
            module.training = training


# ------------------------------------------------------------------------------------------------
# the two counters
# ------------------------------------------------------------------------------------------------

def fvcore_macs(net: nn.Module, inputs: tuple, kwargs: Optional[dict] = None) -> dict:
    """fvcore MACs of one forward call, with the handles above and scan_macs added."""
    wrapped = _CallWithKwargs(net, dict(kwargs or {}))
    with _ScanHooks(wrapped) as scans:
        analysis = FlopCountAnalysis(wrapped, inputs).set_op_handle(**FVCORE_EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counted = analysis.total()  # runs the trace (once), which fires the scan hooks
    return {"macs": counted + scans.macs, "counted": counted, "scan": scans.macs, "scan_calls": scans.calls,
            "by_operator": dict(analysis.by_operator())}


def _skip_inside_scan_functions(scans: _ScanHooks) -> dict:
    """FlopCounterMode mapping that drops ops run in no-grad mode inside a scan module (see module doc)."""

    def wrap(formula):
        def counted(*args, out_val=None, **kwargs):
            if scans.depth and not torch.is_grad_enabled():
                return 0
            return formula(*args, out_val=out_val, **kwargs)
        counted._get_raw = True  # already shape-wrapped by torch's registry
        return counted

    return {op: wrap(formula) for op, formula in flop_registry.items()}


def torch_macs(net: nn.Module, inputs: tuple, kwargs: Optional[dict] = None, backward: bool = False) -> dict:
    """FlopCounterMode count (FLOPs / 2) of one forward call (and its backward when asked),
    under the MATH SDPA backend, with scan_macs added (x3 with backward: the convention)."""
    with _ScanHooks(net) as scans, _TokenHooks(net) as tokens:
        counter = FlopCounterMode(display=False, custom_mapping=_skip_inside_scan_functions(scans))
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            out = net(*inputs, **(kwargs or {}))
            if backward:
                out.float().sum().backward()
    if backward:
        net.zero_grad(set_to_none=True)
    counted = counter.get_total_flops() / 2
    scan = scans.macs * (3 if backward else 1)
    by_op = {str(op): n / 2 for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"macs": counted + scan, "counted": counted, "scan": scan, "scan_calls": scans.calls,
            "by_operator": by_op, "tokens_per_block": tokens.tokens}


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------

def torch_forward_macs(net: nn.Module, data_shape, num_classes: int, routed: bool = True,
                       force_rate: Optional[float] = None, cpu_copy: Optional[nn.Module] = None) -> dict:
    """The torch counter's count (:func:`torch_macs`) of one batch-1 forward of ``net`` in the mode
    :func:`count_forward_macs` describes, on ``net``'s device; a meta net whose backbone refuses the meta device
    is counted on ``cpu_copy`` (made with :func:`materialize_cpu` when not given)."""
    c, h, _ = data_shape
    device = _device(net)
    try:
        with _Mode(net, routed, force_rate) as kwargs:
            return torch_macs(net, example_inputs(h, c, num_classes, device), kwargs)
    except (RuntimeError, NotImplementedError):
        if device.type != "meta":
            raise
        # Some backbone op has no meta support (e.g. torch.autocast(device_type="meta")): run the copy.
        copy = cpu_copy if cpu_copy is not None else materialize_cpu(net)
        with _Mode(copy, routed, force_rate) as kwargs:
            return torch_macs(copy, example_inputs(h, c, num_classes, _device(copy)), kwargs)


def count_forward_macs(net: nn.Module, input_size: int, in_channels: int, num_classes: int,
                       force_rate: Optional[float] = None, routed: bool = True,
                       fvcore_net: Optional[nn.Module] = None) -> dict:
    """Forward MACs of ``net`` at batch 1 by both counters.

    ``routed=True`` counts with routing active: train mode at the routes' own rates, or eval mode
    with ``force_rate``; ``routed=False`` counts the full network (eval mode, nothing forced).
    A net on the meta device is counted there by the torch counter (on ``fvcore_net`` if a backbone op
    refuses the meta device); fvcore gets ``fvcore_net`` (a CPU copy of the same structure), made
    here with :func:`materialize_cpu` when not given.
    Returns fvcore_macs, torch_macs, their relative difference, scan MACs, tokens per block.
    """
    if fvcore_net is None:
        fvcore_net = materialize_cpu(net) if _device(net).type == "meta" else net
    by_torch = torch_forward_macs(net, (in_channels, input_size, input_size), num_classes, routed, force_rate,
                                  cpu_copy=fvcore_net)
    with _Mode(fvcore_net, routed, force_rate) as kwargs:
        inputs = example_inputs(input_size, in_channels, num_classes, _device(fvcore_net))
        by_fvcore = fvcore_macs(fvcore_net, inputs, kwargs)
    f, t = by_fvcore["macs"], by_torch["macs"]
    return {
        "fvcore_macs": f, "torch_macs": t, "rel_diff": abs(f - t) / max(f, t, 1),
        "scan_macs": by_torch["scan"], "tokens_per_block": by_torch["tokens_per_block"],
        "routed": routed, "force_rate": force_rate, "fvcore": by_fvcore, "torch": by_torch,
    }


def training_macs(net: nn.Module, input_size: int, in_channels: int, num_classes: int,
                  force_rate: Optional[float] = None, routed: bool = True, measure: bool = False,
                  forward: Optional[dict] = None) -> dict:
    """Per-image training MACs (forward + backward) by the convention 3 x forward MACs.

    ``forward`` reuses a :func:`count_forward_macs` result. ``measure=True`` also measures forward +
    backward with FlopCounterMode (scans at 3 x scan_macs; meaningful for nets without scans, whose
    backward ops the counter sees): ``measured_macs`` and ``measured_over_forward``.
    """
    if forward is None:
        forward = count_forward_macs(net, input_size, in_channels, num_classes, force_rate, routed)
    out = {"train_macs": 3 * forward["fvcore_macs"], "forward_macs": forward["fvcore_macs"],
           "method": "3 x forward (fvcore)"}
    if measure:
        device = _device(net)
        with _Mode(net, routed, force_rate) as kwargs:
            measured = torch_macs(net, example_inputs(input_size, in_channels, num_classes, device), kwargs,
                                  backward=True)["macs"]
        out.update(measured_macs=measured, measured_over_forward=measured / forward["torch_macs"])
    return out


def _tokens_summary(tokens: Sequence[int]) -> str:
    """[256, 256, 128, 128, 256] -> '2x256,2x128,1x256'."""
    runs = []
    for n in tokens:
        if runs and runs[-1][1] == n:
            runs[-1][0] += 1
        else:
            runs.append([1, n])
    return ",".join(f"{count}x{n}" for count, n in runs)


def flops_row(net: nn.Module, input_size: int, in_channels: int, num_classes: int) -> dict:
    """One table row (GFLOPs in DiT's convention) of a method network (methods.Method), built on the meta
    device (no memory, no init); fvcore runs a CPU copy. ``gflops_train`` is the training cost per image of
    the network as it trains (= unreduced when the method reduces nothing). The tokens each block received
    must be the ones the method declares (``tokens_per_block``)."""
    cpu_net = materialize_cpu(net)
    data = (input_size, in_channels, num_classes)
    full = count_forward_macs(net, *data, routed=False, fvcore_net=cpu_net)
    routed = count_forward_macs(net, *data, routed=True, fvcore_net=cpu_net)
    declared = net.tokens_per_block()
    if routed["tokens_per_block"] != declared:
        raise RuntimeError(f"{type(net).__name__} declares tokens per block {declared}, but its blocks received "
                           f"{routed['tokens_per_block']}; fix its tokens_per_block")
    return {
        "params": sum(p.numel() for p in net.parameters()),  # the method's own layers too (fusion, decoders)
        "tokens": net.backbone.num_tokens, "setting": net.describe(), "selection": net.selection,
        "tokens_per_block": _tokens_summary(declared),
        "gflops_fwd": full["fvcore_macs"] / 1e9, "gflops_fwd_routed": routed["fvcore_macs"] / 1e9,
        "gflops_fwd_torch": full["torch_macs"] / 1e9, "gflops_fwd_routed_torch": routed["torch_macs"] / 1e9,
        "gflops_train": training_macs(net, *data, forward=routed)["train_macs"] / 1e9,
        "gflops_train_unrouted": training_macs(net, *data, routed=False, forward=full)["train_macs"] / 1e9,
        "ratio": full["fvcore_macs"] / routed["fvcore_macs"],
        "counter_rel_diff": max(full["rel_diff"], routed["rel_diff"]),
        "scan_gflops": full["scan_macs"] / 1e9,
        "convention": CONVENTION,
    }



def train_macs_per_stage(net: nn.Module, stages, data_shape, num_classes: int) -> list[float]:
    """Training MACs per image (forward + backward, DiT convention) of method network ``net`` (on the meta device)
    as it trains: one value for its own settings, then one per schedule stage (methods.Stage: the settings the
    trainer applies through ``apply_settings``). Changes ``net``'s settings."""
    c, h, _ = data_shape
    macs = [flops_row(net, h, c, num_classes)["gflops_train"] * 1e9]
    for stage in stages:
        net.apply_settings(**stage.settings)
        macs.append(flops_row(net, h, c, num_classes)["gflops_train"] * 1e9)
    return macs


def flops_table_row(backbone: str, size: str, kind: Optional[str] = None, input_size: int = 32,
                    in_channels: int = 4, num_classes: int = 1000, **method_args) -> dict:
    """:func:`flops_row` of registered ``backbone`` at ``size`` in method ``kind`` (methods.DEFAULT_KIND when
    None) with ``method_args``, built by methods.build_network on the meta device."""
    from tread_bench.methods import DEFAULT_KIND, build_network  # local: keeps `import tread_bench.measure.flops` light

    with torch.device("meta"):
        net = build_network(backbone, size, (in_channels, input_size, input_size), num_classes, kind or DEFAULT_KIND,
                            **method_args)
    return {"backbone": backbone, "size": size, **flops_row(net, input_size, in_channels, num_classes)}


def pass_macs(net, data_shape, num_classes: int, force_rate=None) -> float:
    """Forward MACs of one pass of ``net`` per image: unreduced, or at ``force_rate``."""
    return torch_forward_macs(net, data_shape, num_classes, routed=force_rate is not None, force_rate=force_rate)["macs"]


def sampling_macs(net, data_shape, num_classes: int, ev, full: float) -> float:
    """MACs of one guided evaluation in mode ``ev`` (an EvalConfig); ``full`` is one unreduced pass."""
    if ev.sparse_guidance:
        g1, g2, _ = ev.sparse_guidance
        per_eval = pass_macs(net, data_shape, num_classes, g1)
        return per_eval + (0 if g1 == g2 else pass_macs(net, data_shape, num_classes, g2))
    if ev.cfg_scale == 1.0:
        return full
    if ev.uncond_rate is not None:
        return full + pass_macs(net, data_shape, num_classes, ev.uncond_rate)
    return 2 * full


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m tread_bench.measure.flops dit:XL/2:2-24@0.5 [...]``: one JSON row per backbone:size[:start-end[@rate]]."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("entries", nargs="+", help="backbone:size[:start-end[@rate]], e.g. dit:S/2:2-8@0.5")
    parser.add_argument("--selection", default="auto")
    for spec in parser.parse_args(argv).entries:
        name, size, *route = spec.split(":")
        routes = []
        if route:
            span, _, rate = route[0].partition("@")
            start, end = span.split("-")
            routes = [{"start": int(start), "end": int(end), "rate": float(rate or 0.5)}]
        selection = parser.parse_args(argv).selection
        print(json.dumps(flops_table_row(name, size, routes=routes, selection=selection)), flush=True)


if __name__ == "__main__":
    main()
