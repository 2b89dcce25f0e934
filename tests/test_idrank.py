"""Tests for IdRank: network layout, rank features, errors, ListNet loss, and that it learns to rank."""

import math
import re
from pathlib import Path

import pytest
import torch

from ofer.models.idrank import IdRankNet, front_vertex_errors, listnet_loss, rank_features

LAYOUT_FILE = Path(__file__).resolve().parent / "data" / "ofer_state_dict_layout.txt"


@pytest.fixture(scope="module")
def full_net() -> IdRankNet:
    torch.manual_seed(0)
    return IdRankNet()


def _layout_section(text: str, name: str) -> dict[str, tuple[int, ...]]:
    """Parse 'key (d0, d1)' lines of the '## name ...' section of the layout file."""
    section = text.split(f"## {name}", 1)[1].split("\n## ", 1)[0]
    shapes = {}
    for line in section.splitlines()[1:]:
        match = re.fullmatch(r"(\S+) \(([\d, ]*)\)", line.strip())
        if match:
            shapes[match.group(1)] = tuple(int(d) for d in match.group(2).split(",") if d.strip())
    return shapes


def test_default_parameter_count(full_net):
    assert sum(p.numel() for p in full_net.parameters()) == 59_505_986


def test_state_dict_matches_original_layout(full_net):
    expected = _layout_section(LAYOUT_FILE.read_text(), "idrank")
    assert len(expected) == 33
    ours = {k: tuple(v.shape) for k, v in full_net.state_dict().items()}
    assert ours == expected


def test_forward_shapes_including_batch_one(full_net):
    features = torch.randn(1, 3, 2 * 5355)
    context = torch.randn(1, 1024)
    with torch.no_grad():
        scores = full_net(features, context)
    assert scores.shape == (1, 3)
    assert torch.isfinite(scores).all()


def test_forward_rejects_wrong_feature_size():
    net = IdRankNet(shape_dim=6, context_dim=8, hidden_dims=(16, 8))
    with pytest.raises(ValueError, match="features"):
        net(torch.randn(2, 4, 10), torch.randn(2, 8))


def test_context_is_shared_across_samples():
    """Scoring samples together or one at a time gives the same scores (no mixing across N)."""
    torch.manual_seed(0)
    net = IdRankNet(shape_dim=6, context_dim=8, hidden_dims=(16, 8))
    features, context = torch.randn(2, 5, 12), torch.randn(2, 8)
    together = net(features, context)
    alone = torch.cat([net(features[:, n : n + 1], context) for n in range(5)], dim=1)
    torch.testing.assert_close(together, alone)


def test_rank_features_by_hand():
    # B=1, N=2 samples, V=3 vertices; front vertices are [2, 0] in that order.
    meshes = torch.tensor(
        [[[[1.0, 2.0, 3.0], [9.0, 9.0, 9.0], [5.0, 6.0, 7.0]], [[3.0, 4.0, 5.0], [0.0, 0.0, 0.0], [7.0, 6.0, 5.0]]]]
    )
    front_idx = torch.tensor([2, 0])
    mean = [6.0, 6.0, 6.0, 2.0, 3.0, 4.0]  # vertex 2 then vertex 0, averaged over the 2 samples
    expected = torch.tensor([[mean + [-1.0, 0.0, 1.0, -1.0, -1.0, -1.0], mean + [1.0, 0.0, -1.0, 1.0, 1.0, 1.0]]])
    torch.testing.assert_close(rank_features(meshes, front_idx), expected)


def test_front_vertex_errors_by_hand():
    gt = torch.zeros(1, 3, 3)
    pred = torch.zeros(1, 2, 3, 3)
    pred[0, 0, 0] = torch.tensor([1.0, -2.0, 3.0])  # front vertex: |diff| mean = 2
    pred[0, 0, 2] = torch.tensor([1.0, 2.0, 3.0])  # front vertex: 2
    pred[0, 1, 1] = 100.0  # not a front vertex: must not count
    errors = front_vertex_errors(pred, gt, torch.tensor([0, 2]))
    torch.testing.assert_close(errors, torch.tensor([[2.0, 0.0]]))


def test_listnet_loss_analytic_three_samples():
    # target = softmax(-errors) = [4, 2, 1] / 7
    errors = torch.tensor([[0.0, math.log(2.0), math.log(4.0)]])
    uniform = listnet_loss(torch.zeros(1, 3), errors)
    assert uniform.item() == pytest.approx(math.log(3.0), rel=1e-6)
    # softmax(scores) = [1/4, 1/4, 1/2] -> -(4/7 ln 1/4 + 2/7 ln 1/4 + 1/7 ln 1/2) = 13/7 ln 2
    skewed = listnet_loss(torch.tensor([[0.0, 0.0, math.log(2.0)]]), errors)
    assert skewed.item() == pytest.approx(13 / 7 * math.log(2.0), rel=1e-6)
    # the batch loss is the mean of the per-image losses
    both = listnet_loss(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0)]]), errors.expand(2, 3))
    assert both.item() == pytest.approx((math.log(3.0) + 13 / 7 * math.log(2.0)) / 2, rel=1e-6)


def test_listnet_loss_minimal_at_negative_errors():
    generator = torch.Generator().manual_seed(0)
    errors = torch.rand(4, 10, generator=generator) * 3
    best = -errors + 5.0  # any shift of -errors is optimal: the loss is then the target entropy
    target = torch.softmax(-errors, dim=1)
    entropy = -(target * target.log()).sum(dim=1).mean()
    torch.testing.assert_close(listnet_loss(best, errors), entropy)
    permuted = best[:, torch.randperm(10, generator=generator)]
    assert listnet_loss(permuted, errors) > listnet_loss(best, errors) + 1e-3
    scores = best.clone().requires_grad_(True)
    listnet_loss(scores, errors).backward()
    torch.testing.assert_close(scores.grad, torch.zeros_like(scores), atol=1e-7, rtol=0)


def _toy_batch(batch: int, generator: torch.Generator, mixing: torch.Tensor):
    """Samples whose error is their distance to a context-dependent target, as in IdRank."""
    shape_dim, context_dim = mixing.shape
    samples = 8
    context = torch.randn(batch, context_dim, generator=generator)
    mean = torch.randn(batch, 1, shape_dim, generator=generator).expand(batch, samples, shape_dim)
    deviation = torch.randn(batch, samples, shape_dim, generator=generator)
    target = (context @ mixing.T)[:, None]  # (B, 1, shape_dim)
    errors = 3 * (deviation - target).abs().mean(dim=-1)  # (B, N)
    return torch.cat([mean, deviation], dim=-1), context, errors


def test_small_idrank_learns_to_rank():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(6, 8, generator=generator) / 8**0.5
    net = IdRankNet(shape_dim=6, context_dim=8, hidden_dims=(64, 32))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(200):
        features, context, errors = _toy_batch(64, generator, mixing)
        loss = listnet_loss(net(features, context), errors)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    features, context, errors = _toy_batch(1000, generator, mixing)
    with torch.no_grad():
        top1 = (net(features, context).argmax(dim=1) == errors.argmin(dim=1)).float().mean()
        shuffled = net(features, context[torch.randperm(1000, generator=generator)])
        top1_shuffled = (shuffled.argmax(dim=1) == errors.argmin(dim=1)).float().mean()
    assert top1 > 0.5  # chance is 1/8
    assert top1 > top1_shuffled + 0.2  # the ranking relies on the image context
