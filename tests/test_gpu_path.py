"""The full-scale path's properties, proven on CPU: no host sync inside a training step, the EMA as torch's own EMA
computes it, contiguous tokens, compiled blocks equal to eager ones, TF32 set only where it applies."""
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from backbones import list_backbones
from backbones.protocol import BlockStack
from routing import RoutedNetwork
from tread_bench.data import load_dataset
from tread_bench.methods import build_network
from tread_bench.training.precision import compile_blocks_on, set_tf32
from tread_bench.training.trainer import Trainer, TrainConfig, TrainingDiverged
from suite_helpers import build_denoiser

ROUTES = [{"start": 1, "end": 3, "rate": 0.5}]


def make_trainer(run_dir, method="tread", steps=10, **cfg):
    data = load_dataset("synthetic", 32, limit=32)
    torch.manual_seed(0)
    if method == "tread":
        den = build_denoiser("dit", "tiny", data.shape, data.num_classes, routes=ROUTES)
    else:
        from diffusion import build_objective

        args = {"sprint": {"drop_ratio": 0.5, "dense_head": 1, "dense_tail": 1}}.get(method, {})
        den = build_objective("edm").wrap(build_network("dit", "tiny", data.shape, data.num_classes, method, **args))
    cfg = {"steps": steps, "global_batch": 4, "log_every": 5, "lr": 1e-3, "ema_decay": 0.9, **cfg}
    return Trainer(den, data, TrainConfig(**cfg), run_dir)


class SyncCounter:
    """Counts what makes the host wait for the device: reading a tensor's value (item, tolist, cpu, numpy, bool,
    float, int) and blocking device moves (``to(device)`` without non_blocking). AdamW's step counters are host
    tensors on every device (non-fused, non-capturable), so reading them is not counted."""

    READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch, trainer):
        self.calls, self.trainer = [], trainer
        for name in self.READS:
            self._wrap(monkeypatch, name)
        original_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            moves = any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs
            if moves and not kwargs.get("non_blocking", False) and not (len(args) > 1 and args[1] is True):
                self.calls.append(("to", trainer.step))
            return original_to(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)

    def _wrap(self, monkeypatch, name):
        original = getattr(torch.Tensor, name)
        counter = self

        def read(tensor, *args, **kwargs):
            host_counters = {id(s["step"]) for s in counter.trainer.opt.state.values() if "step" in s}
            if id(tensor) not in host_counters:
                counter.calls.append((name, counter.trainer.step))
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)


@pytest.mark.parametrize("method", ["tread", "sprint", "maskdit"])
def test_a_training_step_makes_no_host_sync_and_the_loop_reads_the_loss_once_per_log_line(tmp_path, monkeypatch,
                                                                                           method):
    tr = make_trainer(tmp_path / "run", method)
    tr.unread.append(tr.train_step())  # the first step creates the optimizer state
    counter = SyncCounter(monkeypatch, tr)
    for _ in range(3):
        tr.unread.append(tr.train_step())
    assert counter.calls == [], f"host syncs inside training steps: {counter.calls}"
    tr.read_losses()
    assert [name for name, _ in counter.calls] == ["tolist"], counter.calls
    assert len(tr.window) == 4 and all(isinstance(v, float) for v in tr.window)


def test_over_a_run_the_loss_is_read_only_at_log_points(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path / "run", steps=10, log_every=5)
    tr.cfg.steps = 1
    tr.train()  # step 1: optimizer state exists; then count over steps 2..10
    tr.cfg.steps = 10
    counter = SyncCounter(monkeypatch, tr)
    tr.train()
    reads_at = sorted({step for name, step in counter.calls})
    assert reads_at[:2] == [5, 10], counter.calls  # after step 10: the final checkpoint's own reads
    assert [s["step"] for s in tr.stats] == [1, 5, 10]


def test_the_fused_ema_equals_torchs_averaged_model_exactly(tmp_path):
    tr = make_trainer(tmp_path / "run", ema_decay=0.9)
    model = tr.acc.unwrap_model(tr.model)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(6):
        tr.train_step()
        reference.update_parameters(model)
    ours = dict(tr.ema.module.state_dict())
    theirs = dict(reference.module.state_dict())
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert int(tr.ema.n_averaged) == int(reference.n_averaged) == 6


def test_a_non_finite_loss_fails_at_its_step_and_is_never_checkpointed(tmp_path):
    tr = make_trainer(tmp_path / "run", steps=10, log_every=5, checkpoint_every=4, fault_nan_at_step=3)
    with pytest.raises(TrainingDiverged, match="at step 3"):
        tr.train()
    assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.parametrize("backbone", list_backbones())
def test_tokens_leave_embed_contiguous_in_every_builtin_backbone(backbone):
    net = build_network(backbone, "tiny", (1, 32, 32), 4, "tread")
    tokens, _ = net.backbone.embed(torch.randn(2, 1, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert tokens.is_contiguous()


class TransposedEmbed(BlockStack):
    """A user backbone whose embed returns a transposed view, as timm's PatchEmbed does."""

    def __init__(self):
        super().__init__()
        self.grid_size, self.num_classes, self.in_channels, self.input_size = (4, 4), 4, 1, 4
        self.proj = torch.nn.Conv2d(1, 8, 1)
        self.blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
        self.seen = []

    def embed(self, x, noise_labels, class_labels):
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        assert not tokens.is_contiguous()
        return tokens, torch.zeros(x.shape[0], 8)

    def head(self, tokens, cond):
        self.seen.append(tokens.is_contiguous())
        return tokens.transpose(1, 2).reshape(-1, 8, 4, 4)[:, :1]


def test_the_protocol_hands_blocks_contiguous_tokens_from_a_user_backbone():
    bb = TransposedEmbed()
    seen = []
    for block in bb.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    bb.blocks[0].forward = lambda t, *rest: t
    bb.blocks[1].forward = lambda t, *rest: t
    RoutedNetwork(bb).eval()(torch.randn(2, 1, 4, 4), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    bb(torch.randn(2, 1, 4, 4), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert seen == [True, True, True, True]


def test_tf32_is_set_on_cuda_only_and_recorded_as_applied():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    try:
        assert set_tf32(True, "cpu") is False and (matmul.fp32_precision, conv.fp32_precision) == before
        assert set_tf32(True, "cuda") is True
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        assert set_tf32(False, "cuda") is False
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_compile_blocks_auto_means_cuda_only():
    assert compile_blocks_on("auto", "cuda") and not compile_blocks_on("auto", "cpu")
    assert compile_blocks_on(True, "cpu") and not compile_blocks_on(False, "cuda")


def train_losses(tmp_path, name, compiled, routes, precision="fp32", steps=3, on_eval=None):
    data = load_dataset("synthetic", 32, limit=32)
    torch.manual_seed(0)
    den = build_denoiser("dit", "tiny", data.shape, data.num_classes, routes=routes)
    tr = Trainer(den, data, TrainConfig(steps=steps, global_batch=4, log_every=1, lr=1e-3, precision=precision,
                                        compile_blocks=compiled), tmp_path / name)
    tr.train(on_eval=on_eval, eval_every=2 if on_eval else 0)
    return [s["loss"] for s in tr.stats], tr


@pytest.mark.parametrize("routes", [ROUTES, []], ids=["routed", "unrouted"])
def test_compiled_blocks_train_as_eager_ones_in_fp32(tmp_path, routes):
    torch._dynamo.reset()
    eager, _ = train_losses(tmp_path, "eager", False, routes)
    compiled, tr = train_losses(tmp_path, "compiled", True, routes)
    assert tr.compiled_blocks
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("routes", [ROUTES, []], ids=["routed", "unrouted"])
def test_compiled_blocks_under_bf16_autocast_are_finite_and_close_to_eager(tmp_path, routes, fresh_accelerator_state):
    torch._dynamo.reset()
    eager16, _ = train_losses(tmp_path, "eager16", False, routes, "bf16")
    compiled16, _ = train_losses(tmp_path, "compiled16", True, routes, "bf16")
    assert all(torch.isfinite(torch.tensor(compiled16)))
    assert compiled16 == pytest.approx(eager16, rel=2e-2)


def test_a_routed_run_with_evaluations_compiles_a_bounded_number_of_graphs(tmp_path):
    """One block class, a routed run of 6 steps with an evaluation (the compiled model in eval mode, no grad)
    every 2: the full and routed token counts share a graph (dynamic), so the count is a property of the modes
    (training; the fp32 block after the route end; inference), not of the steps or shapes."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def evaluate(tr):
        with torch.no_grad():
            tr.model.eval()
            x = torch.randn(4, *tr.data.shape)
            tr.model(x, torch.ones(4), torch.zeros(4, dtype=torch.long))
            tr.model.train()

    train_losses(tmp_path, "run", True, ROUTES, steps=6, on_eval=evaluate)
    graphs = counters["stats"]["unique_graphs"]
    print(f"compiled graphs over 6 routed steps with 3 evaluations: {graphs}")
    assert 1 <= graphs <= 4
