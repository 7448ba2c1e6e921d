import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.attacks import fgsm, input_gradient, per_example_starts, pgd, pgd_eot, training_mix


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 5)).eval()


def _data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def _loss(m, x, y):
    with torch.no_grad():
        return F.cross_entropy(m(x), y, reduction="none")


def _in_ball(xa, x, eps):
    return bool(((xa - x).abs() <= eps + 1e-6).all() and xa.min() >= 0 and xa.max() <= 1)


def test_fgsm_is_one_signed_step_inside_ball():
    m, (x, y) = _model(), _data()
    xa = fgsm(m, x, y, 0.03)
    assert _in_ball(xa, x, 0.03)
    interior = (x > 0.03) & (x < 0.97)
    assert torch.allclose((xa - x).abs()[interior], torch.full_like(x[interior], 0.03), atol=1e-6)
    assert (_loss(m, xa, y) >= _loss(m, x, y) - 1e-6).float().mean() > 0.9


def test_pgd_stays_in_ball_and_beats_fgsm():
    m, (x, y) = _model(), _data(64)
    xa = pgd(m, x, y, eps=0.05, steps=40, step_size=0.01, generator=torch.Generator().manual_seed(0))
    assert _in_ball(xa, x, 0.05)
    assert _loss(m, xa, y).mean() > _loss(m, fgsm(m, x, y, 0.05), y).mean() > _loss(m, x, y).mean()


def test_pgd_random_start_is_seeded():
    m, (x, y) = _model(), _data()
    a = pgd(m, x, y, eps=0.05, steps=2, step_size=0.01, generator=torch.Generator().manual_seed(3))
    b = pgd(m, x, y, eps=0.05, steps=2, step_size=0.01, generator=torch.Generator().manual_seed(3))
    c = pgd(m, x, y, eps=0.05, steps=2, step_size=0.01, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_example_starts_independent_of_batch():
    idx = torch.tensor([5, 9, 2])
    full = per_example_starts(idx, (3, 8, 8), 0.1, seed=7)
    alone = per_example_starts(idx[1:2], (3, 8, 8), 0.1, seed=7)
    assert torch.equal(full[1], alone[0]) and full.abs().max() <= 0.1


class _Noisy(nn.Module):
    """A stochastic model: EOT must average its gradient over draws."""

    def __init__(self):
        super().__init__()
        self.inner = _model()

    def forward(self, x):
        return self.inner(x + 0.3 * torch.randn_like(x))


def test_eot_gradient_is_average_over_draws():
    torch.manual_seed(0)
    m, (x, y) = _Noisy(), _data(4)
    torch.manual_seed(1)
    g20 = input_gradient(m, x, y, eot=20)
    torch.manual_seed(1)
    singles = torch.stack([input_gradient(m, x, y, eot=1) for _ in range(20)]).mean(0)
    assert torch.allclose(g20, singles, atol=1e-6)
    xa = pgd_eot(m, x, y, eps=0.05, steps=3, step_size=0.007, eot=4, generator=torch.Generator().manual_seed(0))
    assert _in_ball(xa, x, 0.05)


def test_training_mix_kinds_and_balls():
    m, (x, y) = _model(), _data(8)
    out = training_mix(m, x, y, torch.arange(8), eps=0.1, pgd_steps=5, pgd_step_size=0.01, random_start=True, seed=0)
    assert list(out) == ["clean", "fgsm_half", "fgsm", "pgd_half", "pgd"]
    assert torch.equal(out["clean"], x)
    for kind, eps in (("fgsm_half", 0.05), ("fgsm", 0.1), ("pgd_half", 0.05), ("pgd", 0.1)):
        assert _in_ball(out[kind], x, eps), kind
