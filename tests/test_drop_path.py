"""Stochastic depth for training (layers.drop_path, TokenStack/ViTAdapter.set_drop_path)."""
from __future__ import annotations

import torch

from nested_svit.attention import DenseContext
from nested_svit.layers import Block, drop_path


def test_drop_path_zeroes_whole_samples_and_rescales():
    torch.manual_seed(0)
    branch = torch.ones(2000, 3, 4)
    out = drop_path(branch, 0.25, training=True)
    per_sample = out.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))  # whole samples, scaled
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert torch.equal(drop_path(branch, 0.25, training=False), branch)


def test_block_output_is_one_of_the_four_branch_combinations():
    """Each image's output is x + a*attn_branch + m*mlp_branch with a, m in {0, 1/(1-p)}: computed here
    from the block's own modules, independently of how the draws are made."""
    torch.manual_seed(0)
    block = Block(16, 2).train()
    block.drop_path = 0.5
    x = torch.randn(64, 5, 16)
    with torch.no_grad():
        out = block(x, DenseContext())
        attn = block.attn(block.norm1(x), DenseContext())
        seen = set()
        for b in range(x.shape[0]):
            matches = []
            for a in (0.0, 2.0):
                h = x[b] + a * attn[b]
                mlp = block.mlp(block.norm2(h))
                for m in (0.0, 2.0):
                    if torch.allclose(out[b], h + m * mlp, atol=1e-5):
                        matches.append((a, m))
            assert len(matches) == 1, (b, matches)
            seen.add(matches[0])
    assert seen == {(0.0, 0.0), (0.0, 2.0), (2.0, 0.0), (2.0, 2.0)}
    block.eval()
    with torch.no_grad():
        dense = x + attn
        torch.testing.assert_close(block(x, DenseContext()), dense + block.mlp(block.norm2(dense)))


def test_rates_follow_the_official_rules():
    from nested_svit.detection import create_detector
    from nested_svit.detection.adapter import Extractor

    backbone = create_detector("svit_adapter_tiny_maskrcnn", num_classes=2).backbone.set_drop_path(0.2)
    rates = [b.drop_path for b in backbone.blocks]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.2) < 1e-12 and abs(rates[6] - 0.2 * 6 / 11) < 1e-12
    extractors = [m for m in backbone.modules() if isinstance(m, Extractor)]
    assert len(extractors) == 6 and all(m.drop_path == 0.2 for m in extractors)


def test_drop_path_on_packed_rows_drops_whole_images():
    from nested_svit.tokens import Layout

    torch.manual_seed(0)
    layout = Layout.from_lengths([3, 5, 2] * 100)
    out = drop_path(torch.ones(layout.total, 4), 0.5, training=True, layout=layout)
    for seq in torch.split(out, list(layout.lengths)):
        assert torch.all(seq == 0) or torch.all(seq == 2.0)
    dropped = sum(bool((seq == 0).all()) for seq in torch.split(out, list(layout.lengths)))
    assert 120 < dropped < 180
