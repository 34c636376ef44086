"""objective=flow (SiT): the loss by hand, the ODE samplers against a Gaussian's exact velocity, guidance
plumbing, the held-out loss, and the smoke suite end to end."""
import pandas as pd
import pytest
import torch

from tread_bench.data.datasets import make_synthetic
from diffusion.sampler import SamplerConfig
from tread_bench.training.trainer import Trainer, TrainConfig
from tread_bench.measure.eval_loss import EvalLossConfig, HeldOutLoss
from tread_bench.methods import build_network
from diffusion import build_objective
from diffusion.flow import VelocityModel
from suite_helpers import run

FLOW = build_objective("flow")


class EchoNet(torch.nn.Module):
    """F(x; t, y) = x: the velocity is the network input, so the loss shows x_t."""

    def forward(self, x, noise_labels, class_labels, **kw):
        self.seen_t = noise_labels
        return x


def test_loss_by_hand():
    # x = 0.5, eps = 1, t = 0.3: x_t = 0.7 * 0.5 + 0.3 * 1 = 0.65; target eps - x = 0.5; loss (0.65 - 0.5)^2
    net = EchoNet()
    x, eps = torch.full((2, 1, 2, 2), 0.5), torch.ones(2, 1, 2, 2)
    got = FLOW.loss(VelocityModel(net), x, torch.zeros(2, dtype=torch.long), {"t": torch.tensor([0.3, 1.0]),
                                                                                "noise": eps})
    assert got[0].item() == pytest.approx((0.65 - 0.5) ** 2, rel=1e-6)
    assert got[1].item() == pytest.approx((1.0 - 0.5) ** 2, rel=1e-6)  # t = 1: pure noise
    assert torch.equal(net.seen_t, torch.tensor([0.3, 1.0]))  # the network is conditioned on t itself


def test_draws_are_uniform_t_and_normal_noise():
    draws = FLOW.draw(4096, (1, 2, 2), torch.Generator().manual_seed(0))
    t = draws["t"]
    assert t.shape == (4096,) and 0 <= t.min() and t.max() < 1 and t.mean().item() == pytest.approx(0.5, abs=0.02)
    assert draws["noise"].shape == (4096, 1, 2, 2) and draws["noise"].std().item() == pytest.approx(1, abs=0.03)


M, S = 0.3, 0.7


class GaussianVelocity(torch.nn.Module):
    """Exact velocity of data N(M, S^2) under x_t = a x + b eps (a = 1 - t, b = t):
    x_t ~ N(a M, a^2 S^2 + b^2); Cov(x, x_t) = a S^2, Cov(eps, x_t) = b, so
    v(x_t, t) = E[eps - x | x_t] = -M + (b - a S^2) / (a^2 S^2 + b^2) (x_t - a M)."""

    def forward(self, x, t, labels, **kw):
        t = torch.as_tensor(t, dtype=torch.float64)
        a, b = 1 - t, t
        return -M + (b - a * S ** 2) / (a ** 2 * S ** 2 + b ** 2) * (x.double() - a * M)


@pytest.mark.parametrize("solver, steps, tol", [("heun", 20, 0.005), ("euler", 200, 0.03)])
def test_ode_with_exact_velocity_reproduces_the_gaussian(solver, steps, tol):
    n = 20000
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = build_objective("flow", solver=solver).sample(GaussianVelocity(), noise, torch.zeros(n, dtype=torch.long),
                                                      SamplerConfig(steps=steps), null_label=0)
    # The exact flow maps N(0, 1) at t = 1 onto N(M, S^2) at t = 0 by x = M + S z (monotone, linear): each
    # sample lands there up to the discretisation error; mean and std up to Monte-Carlo error (S/sqrt(n) = 0.005).
    assert (x - (M + S * noise)).abs().max().item() < tol
    assert x.mean().item() == pytest.approx(M, abs=0.02)
    assert x.std().item() == pytest.approx(S, rel=0.02)


class LabelledVelocity(torch.nn.Module):
    """A constant velocity that encodes the label and the forced rate; counts calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, labels, force_rate=None):
        self.calls.append((x.shape[0], force_rate))
        rate = 0.0 if force_rate is None else force_rate
        return torch.zeros_like(x) + labels.view(-1, 1, 1, 1).float() * 10 + rate


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_guidance_plumbing_and_evaluation_counts(solver):
    flow = build_objective("flow", solver=solver)
    noise, labels = torch.zeros(2, 1, 1, 1, dtype=torch.float64), torch.tensor([3, 5])
    # constant velocity v: x_0 = x_1 - v (from t = 1 to 0), whatever the solver and steps
    model = LabelledVelocity()
    out = flow.sample(model, noise, labels, SamplerConfig(steps=3, cfg_scale=4.0), null_label=10)
    assert out.flatten().tolist() == [-(100 + 4 * (30 - 100)), -(100 + 4 * (50 - 100))]
    assert len(model.calls) == flow.nfe(3) and all(b == 4 for b, _ in model.calls)  # one doubled batch per NFE
    model = LabelledVelocity()
    out = flow.sample(model, noise[:1], labels[:1], SamplerConfig(steps=3, sparse_guidance=(0.3, 0.7, 1.5)), 10)
    assert out.item() == pytest.approx(-(30.7 + 1.5 * (30.3 - 30.7)))
    assert len(model.calls) == 2 * flow.nfe(3) and {r for _, r in model.calls} == {0.3, 0.7}
    assert flow.nfe(3) == (6 if solver == "heun" else 3)


def test_held_out_loss_with_flow_equals_a_literal_loop():
    data = make_synthetic(8, 32, 1, 4)
    loss = HeldOutLoss(data.images, data.labels, EvalLossConfig(images=6, levels=2, batch=4), FLOW)
    assert loss.levels.tolist() == [0.25, 0.75]
    assert loss.column_names() == ["eval_loss_t0.25", "eval_loss_t0.75"]
    torch.manual_seed(0)
    model = FLOW.wrap(build_network("dit", "tiny", (1, 32, 32), 4))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = loss(model)
    per_level = []
    with torch.no_grad():
        for k, t in enumerate([0.25, 0.75]):
            total = 0.0
            for i in range(6):
                x, n = data.images[i:i + 1], loss.noise[k, i:i + 1]
                v = model(((1 - t) * x + t * n), torch.tensor([t]), data.labels[i:i + 1])
                total += float(((v - (n - x)) ** 2).mean())
            per_level.append(total / 6)
    assert got["eval_loss"] == pytest.approx(sum(per_level) / 2, rel=1e-5)


def test_flow_training_lowers_the_loss(tmp_path):
    data = make_synthetic(64, 32, 1, 4)
    torch.manual_seed(0)
    model = FLOW.wrap(build_network("dit", "tiny", data.shape, 4, routes=[{"start": 1, "end": 3, "rate": 0.5}]))
    cfg = TrainConfig(steps=30, global_batch=16, lr=1e-3, log_every=10)
    trainer = Trainer(model, data, cfg, tmp_path, objective=FLOW)
    trainer.train()
    losses = [s["loss"] for s in trainer.stats]
    assert losses[-1] < losses[0]


def test_smoke_suite_with_flow(tmp_path):
    assert run(["suite=smoke", "scale=tiny", "objective=flow", f"results_dir={tmp_path}/r",
                f"runs_dir={tmp_path}/runs", "suite.train.steps=6", "suite.data.limit=64"]) == 0
    table = pd.read_csv(tmp_path / "r" / "smoke.csv")
    assert table.run_id.tolist() == ["dit-tiny-baseline-flow", "dit-tiny-tread-flow"]
    assert set(table.status) == {"ok"} and table.final_loss.notna().all()
    assert (tmp_path / "runs" / "smoke" / "tiny" / "dit-tiny-tread-flow-seed0" / "checkpoint" / "model.safetensors").exists()


def test_objective_group_moves_outputs_and_unknown_objective_is_refused():
    from hydra import compose, initialize_config_dir

    from tread_bench.core.errors import ConfigError
    from suite_helpers import SUITES

    with initialize_config_dir(config_dir=SUITES, version_base="1.3"):
        flow = compose(config_name="config", overrides=["suite=smoke", "objective=flow"])
        edm = compose(config_name="config", overrides=["suite=smoke"])
    assert flow.suite.objective.name == "flow" and flow.results_dir == "outputs/results/flow" and flow.runs_dir == "runs/flow"
    assert edm.suite.objective.name == "edm" and edm.results_dir == "outputs/results" and edm.runs_dir == "runs"
    with pytest.raises(ConfigError, match="unknown objective 'nope'.*edm, flow"):
        build_objective("nope")
    with pytest.raises(ConfigError, match="unknown solver 'rk4'"):
        build_objective("flow", solver="rk4")
