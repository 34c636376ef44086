"""Side-by-side with the official TREAD code (github CompVis/tread): same weights give the same
outputs, and one training step takes no longer.

    python benchmarks/compare_official.py --official /tmp/official_tread

The official checkout is imported from ``--official`` at run time (its dit.py, routing_module.py,
edm.py and rf.py); none of its code lives in this repository. Its blocks are decorated with
``@torch.compile``: "shipped" runs them as shipped (inductor on CPU), "eager" calls the same
forward undecorated. Part 1 checks float32 outputs, loss and gradients, then (1b) one Sparse
Guidance evaluation of the official ``rf.RF.sample_tread`` against our ``guided_denoise``; part 2 times
interleaved training steps (EDM loss + backward + AdamW) and prints mean/median step times and ours/theirs ratios.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import re
import statistics
import sys
import time
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones import build_backbone  # noqa: E402
from diffusion.edm import EDMConfig, EDMDenoiser, edm_loss, sample_sigma  # noqa: E402
from routing import RoutedNetwork  # noqa: E402

SIZE = dict(input_size=32, in_channels=4, num_classes=1000)
OFFICIAL_ROUTES = [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": 8}]
OUR_ROUTES = [{"start": 2, "end": 8, "rate": 0.5}]
LABEL_DROPOUT = 0.1  # official train config class_drop_prob; applied identically to both in the timing

# Official state-dict key -> ours. {i} is a block index. Every key on both sides must be used once.
KEY_MAP = [
    ("x_embedder.proj.weight", "backbone.x_embedder.proj.weight"),
    ("x_embedder.proj.bias", "backbone.x_embedder.proj.bias"),
    ("t_embedder.mlp.0.weight", "backbone.t_embedder.mlp.0.weight"),
    ("t_embedder.mlp.0.bias", "backbone.t_embedder.mlp.0.bias"),
    ("t_embedder.mlp.2.weight", "backbone.t_embedder.mlp.2.weight"),
    ("t_embedder.mlp.2.bias", "backbone.t_embedder.mlp.2.bias"),
    ("y_embedder.embedding_table.weight", "backbone.y_embedder.table.weight"),
    ("blocks.{i}.attn.qkv.weight", "backbone.blocks.{i}.attn.qkv.weight"),  # both fused q|k|v, timm layout
    ("blocks.{i}.attn.qkv.bias", "backbone.blocks.{i}.attn.qkv.bias"),
    ("blocks.{i}.attn.proj.weight", "backbone.blocks.{i}.attn.proj.weight"),
    ("blocks.{i}.attn.proj.bias", "backbone.blocks.{i}.attn.proj.bias"),
    ("blocks.{i}.mlp.fc1.weight", "backbone.blocks.{i}.mlp.fc1.weight"),
    ("blocks.{i}.mlp.fc1.bias", "backbone.blocks.{i}.mlp.fc1.bias"),
    ("blocks.{i}.mlp.fc2.weight", "backbone.blocks.{i}.mlp.fc2.weight"),
    ("blocks.{i}.mlp.fc2.bias", "backbone.blocks.{i}.mlp.fc2.bias"),
    ("blocks.{i}.adaLN_modulation.1.weight", "backbone.blocks.{i}.adaLN_modulation.1.weight"),
    ("blocks.{i}.adaLN_modulation.1.bias", "backbone.blocks.{i}.adaLN_modulation.1.bias"),
    ("final_layer.linear.weight", "backbone.final_layer.linear.weight"),
    ("final_layer.linear.bias", "backbone.final_layer.linear.bias"),
    ("final_layer.adaLN_modulation.1.weight", "backbone.final_layer.adaLN_modulation.1.weight"),
    ("final_layer.adaLN_modulation.1.bias", "backbone.final_layer.adaLN_modulation.1.bias"),
    # pos_embed: a frozen Parameter in theirs, a non-persistent buffer in ours; compared, not copied.
]


def map_official_keys(theirs: dict, ours: dict) -> dict:
    """Official key -> our key for every weight, checking both key sets are covered and shapes agree."""
    patterns = [(re.compile("^" + re.escape(a).replace(r"\{i\}", r"(\d+)") + "$"), b) for a, b in KEY_MAP]
    mapping = {}
    for key in theirs:
        if key == "pos_embed":
            continue
        hits = [(m, b) for p, b in patterns if (m := p.match(key))]
        if len(hits) != 1:
            raise SystemExit(f"official key {key} matches {len(hits)} KEY_MAP entries; update KEY_MAP")
        match, target = hits[0]
        mapping[key] = target.replace("{i}", match.group(1)) if match.groups() else target
    missing = set(ours) - set(mapping.values())
    if missing or len(set(mapping.values())) != len(mapping):
        raise SystemExit(f"KEY_MAP does not cover our keys one-to-one; unmapped: {sorted(missing)}")
    for a, b in mapping.items():
        if theirs[a].shape != ours[b].shape:
            raise SystemExit(f"shape mismatch: official {a} {tuple(theirs[a].shape)} vs ours {b} {tuple(ours[b].shape)}")
    return mapping


def load_official(path: Path):
    """Import dit.py and the EDM loss from the official checkout. Their edm.py imports deepspeed and
    diffusers (through utils.edm_helper and autoencoder); when those are missing, its functions and
    classes are executed from its own source without the module's imports (their code, unchanged)."""
    if not (path / "dit.py").is_file() or not (path / "routing_module.py").is_file():
        raise SystemExit(f"--official {path} has no dit.py/routing_module.py; check out github CompVis/tread there")
    sys.path.insert(0, str(path))
    dit = importlib.import_module("dit")
    try:
        edm = importlib.import_module("edm")
        how = "imported edm.py"
    except ImportError as err:
        tree = ast.parse((path / "edm.py").read_text())
        tree.body = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        edm = types.ModuleType("official_edm")
        edm.__dict__.update(torch=torch, nn=nn, F=F, np=np, partial=partial)
        exec(compile(tree, str(path / "edm.py"), "exec"), edm.__dict__)
        how = f"edm.py functions/classes run from source without its imports ({err})"
    return dit, edm, how


def set_official_compile(model: nn.Module, compiled: bool) -> None:
    """compiled=False: call each @torch.compile-decorated forward's original function on this instance."""
    for module in model.modules():
        fwd = type(module).forward
        original = getattr(fwd, "_torchdynamo_orig_callable", None)
        if original is None:
            continue
        if compiled:
            module.__dict__.pop("forward", None)
        else:
            module.forward = types.MethodType(original, module)


def build_official(dit, routed: bool, compiled: bool):
    model = dit.DiT_S_2(**SIZE, enable_routing=routed, routes=OFFICIAL_ROUTES if routed else None)
    set_official_compile(model, compiled)
    return model


def build_ours(routed: bool, compiled: bool = False):
    net = RoutedNetwork(build_backbone("dit", "S/2", **SIZE), routes=OUR_ROUTES if routed else [])
    if compiled:
        for block in net.blocks:
            block.compile()
    return net


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


# ---------------------------------------------------------------- part 1: numerics
def shared_pair(dit, seed: int):
    """Official and our routed DiT-S/2 with the same random weights (through KEY_MAP)."""
    torch.manual_seed(seed)
    theirs = build_official(dit, routed=True, compiled=False)
    for name, module in theirs.named_modules():  # re-randomise the adaLN-Zero / zero-init head
        if name.endswith("adaLN_modulation") or name == "final_layer":
            for p in module.parameters():
                nn.init.normal_(p, std=0.05)
    ours = build_ours(routed=True)
    t_sd, o_sd = theirs.state_dict(), ours.state_dict()
    mapping = map_official_keys(t_sd, o_sd)
    ours.load_state_dict({mapping[k]: v for k, v in t_sd.items() if k in mapping}, strict=True)
    return theirs, ours, mapping


def numerics(dit, edm, variants, batch: int, seed: int) -> None:
    theirs, ours, mapping = shared_pair(dit, seed)
    t_sd, o_sd = theirs.state_dict(), ours.state_dict()
    print(f"mapped {len(mapping)} tensors ({sum(v.numel() for v in o_sd.values()):,} values), all shapes equal")
    print(f"pos_embed   official parameter vs our buffer: max|diff| = "
          f"{max_diff(t_sd['pos_embed'], ours.backbone.pos_embed):.3e}")

    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 4, 32, 32, generator=gen)
    t = torch.randn(batch, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    n_tok, keep = 256, 256 - int(256 * 0.5)
    ids = torch.rand(batch, n_tok, generator=gen).argsort(dim=1)[:, :keep].sort(dim=1).values

    def forced_mask(x_, selection_rate=0.0):  # official Router.get_mask with the shared ids
        assert x_.shape[1] - int(x_.shape[1] * selection_rate) == keep
        return ids

    theirs.router.get_mask = forced_mask
    ours._select = lambda b, grid, n, rate, device: (ids, None)  # ascending ids, no grid (random selection)

    theirs_pre = edm.EDMDiffusion().wrap_model_with_precond(theirs)
    loss_seed = seed + 2
    for variant in variants:
        set_official_compile(theirs, variant == "shipped")
        print(f"-- official blocks: {variant}")
        with torch.no_grad():
            theirs.eval(), ours.eval()
            ref = theirs(x, t, y, class_drop_prob=0.0)
            print(f"(a) unrouted forward, eval     max|diff| = {max_diff(ours(x, t, y), ref):.3e}  (max|out| {ref.abs().max():.3f})")
            theirs.train(), ours.train()
            routed = theirs(x, t, y, class_drop_prob=0.0)
            print(f"(b) routed forward r(2->8)@0.5 max|diff| = {max_diff(ours(x, t, y), routed):.3e}  "
                  f"(routed vs unrouted differ by {max_diff(routed, ref):.3f}: the route matters)")
        # (c) EDM loss + gradients, routed, same sigma/noise: their get_training_loss draws sigma then noise
        # from the global generator; ours gets them from a generator seeded the same way.
        theirs.zero_grad(), ours.zero_grad()
        torch.manual_seed(loss_seed)
        t_loss = edm.EDMDiffusion().get_training_loss(theirs_pre, x, y, class_drop_prob=0.0).mean()
        g = torch.Generator().manual_seed(loss_seed)
        sigma = sample_sigma(batch, EDMConfig(), g)
        noise = torch.randn(x.shape, generator=g)
        o_loss = edm_loss(EDMDenoiser(ours), x, y, sigma, noise).mean()
        t_loss.backward(), o_loss.backward()
        o_named = dict(ours.named_parameters())
        grad_diff = max(max_diff(p.grad, o_named[mapping[k]].grad) for k, p in theirs.named_parameters() if k in mapping)
        grad_max = max(p.grad.abs().max().item() for p in theirs.parameters() if p.grad is not None)
        print(f"(c) EDM loss {t_loss.item():.6f} vs {o_loss.item():.6f}: |diff| = {abs(t_loss.item() - o_loss.item()):.3e}; "
              f"gradients max|diff| = {grad_diff:.3e} (max|grad| {grad_max:.3e})")


# ---------------------------------------------------------------- part 1b: Sparse Guidance
SG_RATES, SG_SCALE = (0.3, 0.7), 1.5  # the official inference.py sample_tread example: gamma1, gamma2, cfg_scale


def sparse_guidance(dit, rf, variants, batch: int, seed: int) -> None:
    """One guided evaluation of the official ``RF.sample_tread`` (1 step: dt = 1, so vtheta = z - z') against
    our ``guided_denoise(..., SamplerConfig(sparse_guidance=(gamma1, gamma2, cfg_scale)))`` on the same network,
    both routers forced to the same kept ids per kept-token count. (a) the official code as shipped drops the
    label in both branches: ours is given the null label; (b) the paper's rule, both branches conditional: the
    official network is called with class_drop_prob=0.0 inside sample_tread (a wrapper overrides it) and ours
    keeps the labels."""
    from diffusion.sampler import SamplerConfig, guided_denoise

    theirs, ours, _ = shared_pair(dit, seed)
    theirs.eval(), ours.eval()
    gamma1, gamma2 = SG_RATES
    n_tok = 256
    gen = torch.Generator().manual_seed(seed + 3)
    z = torch.randn(batch, 4, 32, 32, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    # one shared set of ascending kept ids per kept count (official count: N - int(N * rate))
    shared = {}
    for rate in SG_RATES:
        keep = n_tok - int(n_tok * rate)
        shared[keep] = torch.rand(batch, n_tok, generator=gen).argsort(dim=1)[:, :keep].sort(dim=1).values
    used = []

    def lookup(side, ids):  # each side's own code decides how many tokens it keeps; we replace which ones
        if ids.shape[1] not in shared:
            raise SystemExit(f"{side} keeps {ids.shape[1]} tokens; the other side's count is one of {sorted(shared)}")
        used.append((side, ids.shape[1]))
        return shared[ids.shape[1]]

    official_get_mask = theirs.router.get_mask
    our_select = ours._select
    theirs.router.get_mask = lambda x_, selection_rate=0.0: lookup("official", official_get_mask(x_, selection_rate))
    ours._select = lambda b, grid, n, rate, device: (lookup("ours", our_select(b, grid, n, rate, device)[0]), None)

    branches = {"official": [], "ours": []}  # each side's branch outputs, in call order (strong, weak)

    def our_denoiser(x_, sigma, labels, force_rate=None):  # the network is the prediction (t passed as is)
        out = ours(x_, sigma.expand(x_.shape[0]), labels, force_rate=force_rate)
        branches["ours"].append(out)
        return out

    def shipped(z_, t_, **kw):  # the official network, unchanged (records its output only)
        out = theirs(z_, t_, **kw)
        branches["official"].append(out)
        return out

    def conditional(z_, t_, **kw):  # the official network with class_drop_prob overridden to 0 (paper's rule)
        return shipped(z_, t_, **{**kw, "class_drop_prob": 0.0})

    print(f"official sample_tread(unet1, gamma1={gamma1}, unet2, gamma2={gamma2}, cfg_scale={SG_SCALE}) -> ours "
          f"SamplerConfig(sparse_guidance=(strong={gamma1}, weak={gamma2}, scale={SG_SCALE})): gamma1 -> strong "
          f"rate, gamma2 -> weak rate, cfg_scale -> scale; kept tokens {n_tok - int(n_tok * gamma1)} / "
          f"{n_tok - int(n_tok * gamma2)} of {n_tok}")
    cfg = SamplerConfig(sparse_guidance=(gamma1, gamma2, SG_SCALE))
    null = torch.full_like(y, SIZE["num_classes"])
    t = torch.ones(batch)  # sample_tread's t at its one step (i / sample_steps = 1)
    rf_obj = rf.RF()
    for variant in variants:
        set_official_compile(theirs, variant == "shipped")
        print(f"-- official blocks: {variant}")
        results = {}
        with torch.no_grad():
            for case, unet, labels in (("a", shipped, null), ("b", conditional, y)):
                used.clear(), branches["official"].clear(), branches["ours"].clear()
                z_next = rf_obj.sample_tread(unet, gamma1, unet, gamma2, z.clone(), sample_steps=1,
                                             cfg_scale=SG_SCALE, y=y)
                official = z - z_next  # vtheta of the one Euler step, dt = 1
                mine = guided_denoise(our_denoiser, z, t, labels, cfg, SIZE["num_classes"])
                counts = [n_tok - int(n_tok * r) for r in SG_RATES]
                if sorted(used) != sorted([("official", k) for k in counts] + [("ours", k) for k in counts]):
                    raise SystemExit(f"unexpected routing calls {used}; expected each side at kept counts {counts}")
                (t_strong, t_weak), (o_strong, o_weak) = branches["official"], branches["ours"]
                results[case] = mine
                what = ("as shipped: labels dropped in both branches; ours with the null label" if case == "a"
                        else "paper's rule: both branches conditional; ours with the labels")
                print(f"({case}) {what}")
                print(f"    branches max|diff|: strong {max_diff(o_strong, t_strong):.3e}, weak "
                      f"{max_diff(o_weak, t_weak):.3e}; guided (vtheta = z - z') max|diff| = "
                      f"{max_diff(mine, official):.3e}, z' max|diff| = {max_diff(z.double() - mine, z_next):.3e} "
                      f"(max|guided| {mine.abs().max():.3f})")
                print(f"    not vacuous: guided vs strong branch alone differ by {max_diff(mine, o_strong):.3f}, "
                      f"strong vs weak by {max_diff(o_strong, o_weak):.3f}")
        print(f"    (a) vs (b) differ by {max_diff(results['a'], results['b']):.3f}: the label matters")
    theirs.router.get_mask, ours._select = official_get_mask, our_select


# ---------------------------------------------------------------- part 2: timing
def drop_labels(y: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.rand(y.shape[0]) < LABEL_DROPOUT, SIZE["num_classes"], y)


def make_steps(dit, edm, variants, ours_compiled: bool):
    """name -> a closure running one training step (fresh sigma/noise each call)."""
    steps = {}
    opt = partial(torch.optim.AdamW, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    for mode in ("base", "tread"):
        routed = mode == "tread"
        for compiled in ([False, True] if ours_compiled else [False]):
            net = build_ours(routed, compiled).train()
            den, optimizer, gen = EDMDenoiser(net), opt(net.parameters()), torch.Generator().manual_seed(0)

            def ours_step(x, y, den=den, optimizer=optimizer, gen=gen):
                sigma = sample_sigma(x.shape[0], EDMConfig(), gen)
                loss = edm_loss(den, x, drop_labels(y), sigma, torch.randn(x.shape, generator=gen)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            steps[f"ours-{mode}" + ("[compiled]" if compiled else "")] = ours_step
        for variant in variants:
            model = build_official(dit, routed, compiled=variant == "shipped").train()
            diffusion = edm.EDMDiffusion()
            pre, optimizer = diffusion.wrap_model_with_precond(model), opt(model.parameters())

            def theirs_step(x, y, pre=pre, optimizer=optimizer, diffusion=diffusion):
                # as official train.py: loss.mean(), zero_grad, backward, step
                loss = diffusion.get_training_loss(pre, x, y, class_drop_prob=LABEL_DROPOUT).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            steps[f"theirs-{mode}[{variant}]"] = theirs_step
    return steps


def timing(dit, edm, variants, batch, warmup, repeats, ours_compiled):
    torch.manual_seed(0)
    steps = make_steps(dit, edm, variants, ours_compiled)
    x = torch.randn(batch, 4, 32, 32)
    y = torch.randint(0, 1000, (batch,))
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    order, t_start = list(steps), time.perf_counter()
    for rep in range(warmup + repeats):
        # Interleaved, and reversed every other round, so every config sees the same background load
        # and no config always runs right after the same neighbour.
        for name in (order if rep % 2 == 0 else order[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name](x, y)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rep >= warmup:
                wall[name].append(dt)
                cpu[name].append(dc)
            elif rep == 0:
                print(f"  first step {name}: {dt:.1f} s (includes compilation if compiled)", flush=True)
        print(f"  round {rep + 1}/{warmup + repeats} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    print(f"\nDiT-S/2, {batch}x4x32x32, float32, CPU {torch.get_num_threads()} threads; "
          f"{warmup} warm-up + {repeats} measured steps per config, interleaved")
    print(f"{'config':28s} {'mean s':>8s} {'median s':>9s} {'min s':>7s} {'median CPU s':>13s}")
    for name, ts in wall.items():
        print(f"{name:28s} {statistics.mean(ts):8.3f} {statistics.median(ts):9.3f} {min(ts):7.3f} "
              f"{statistics.median(cpu[name]):13.3f}")
    print("\nratio ours / theirs (<= 1.00 means ours is no slower); 'paired' = median of the per-round ratios,"
          " 'min' = fastest step / fastest step (background load only ever adds time)")
    print(f"  {'':49s} {'mean':>6s} {'median':>7s} {'paired':>7s} {'min':>6s} {'CPU':>6s}")
    for ours_name in [n for n in wall if n.startswith("ours-")]:
        mode = ours_name.split("-")[1].split("[")[0]
        for variant in variants:
            theirs_name = f"theirs-{mode}[{variant}]"
            a, b = wall[ours_name], wall[theirs_name]
            paired = statistics.median(p / q for p, q in zip(a, b))
            cpu_r = statistics.median(cpu[ours_name]) / statistics.median(cpu[theirs_name])
            print(f"  {ours_name:22s} / {theirs_name:24s} {statistics.mean(a) / statistics.mean(b):6.3f} "
                  f"{statistics.median(a) / statistics.median(b):7.3f} {paired:7.3f} {min(a) / min(b):6.3f} {cpu_r:6.3f}")
    return steps


def profile(steps, batch, modes) -> None:
    """One profiled step of ours and of theirs[eager] per mode: which ops differ in call count
    (structural differences, immune to CPU load) and where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x, y = torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,))
    for mode in modes:
        stats = {}
        for name in (f"ours-{mode}", f"theirs-{mode}[eager]"):
            steps[name](x, y)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[name](x, y)
            stats[name] = {e.key: (e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()}
            print(f"\n== profile {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        (o, t) = stats.values()
        heavy = sorted(set(o) | set(t), key=lambda k: -max(o.get(k, (0, 0))[1], t.get(k, (0, 0))[1]))[:20]
        same = [k for k in heavy if o.get(k, (0, 0))[0] == t.get(k, (0, 0))[0]]
        differ = [k for k in heavy if k not in same]
        light = sum(o.get(k, (0, 0))[0] != t.get(k, (0, 0))[0] for k in set(o) | set(t)) - len(differ)
        print(f"\n== {mode}: of the 20 ops with most self CPU time, {len(same)} have identical call counts "
              f"in ours and theirs[eager]: {', '.join(k.replace('aten::', '') for k in same)}")
        for k in differ:
            print(f"  differs: {k:48s} calls {o.get(k, (0, 0))[0]} vs {t.get(k, (0, 0))[0]}, "
                  f"self CPU {o.get(k, (0, 0))[1]:.3f} s vs {t.get(k, (0, 0))[1]:.3f} s")
        print(f"  {light} lighter ops differ in call count (loss bookkeeping, views, scalars)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="checkout of github CompVis/tread")
    ap.add_argument("--official-compile", choices=["shipped", "eager", "both"], default="both",
                    help="run their @torch.compile blocks as shipped, undecorated (eager), or both")
    ap.add_argument("--ours-compiled", action="store_true", help="also time ours with each block torch.compile'd")
    ap.add_argument("--skip-numerics", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--numerics-batch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="timing batch")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="after timing, profile ours and theirs[eager] steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    variants = ["shipped", "eager"] if args.official_compile == "both" else [args.official_compile]
    if args.profile and "eager" not in variants:
        raise SystemExit("--profile compares against theirs[eager]; use --official-compile eager or both")
    dit, edm, how = load_official(args.official.resolve())
    rf = importlib.import_module("rf")  # the official rf.py (imports only re and torch)
    print(f"official code: {args.official} ({how}); torch {torch.__version__}")
    if not args.skip_numerics:
        print("\n== part 1: numerics (float32, CPU)")
        numerics(dit, edm, variants, args.numerics_batch, args.seed)
        print("\n== part 1b: Sparse Guidance (official rf.py RF.sample_tread vs our guided_denoise; float32, CPU)")
        sparse_guidance(dit, rf, variants, args.numerics_batch, args.seed)
        torch._dynamo.reset()  # numerics shapes must not leave dynamic-shape graphs for the timing
    if not args.skip_timing:
        print("\n== part 2: training step timing")
        steps = timing(dit, edm, variants, args.batch, args.warmup, args.repeats, args.ours_compiled)
        if args.profile:
            profile(steps, args.batch, ["base", "tread"])


if __name__ == "__main__":
    main()
