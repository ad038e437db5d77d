"""ATC (methods/atc.py): both clusterings (batched on the device; scipy per image on the CPU) against
scikit-learn's per image (the authors' path), and the engine's packed batch against an independent per-image implementation of the authors'
``Block_ATC`` (tests/baseline_reference.run_atc), clusters included."""
from __future__ import annotations

import warnings

import pytest
import torch

import baseline_reference as ref
from nested_svit import create_model
from nested_svit.methods.atc import LINKAGES, agglomerative_clustering, cosine_distances, host_clustering

sklearn_cluster = pytest.importorskip("sklearn.cluster")
SMALL = dict(embed_dim=128, num_heads=2, num_classes=10)  # head_dim 64 as DeiT


def partition(labels) -> list[tuple[int, ...]]:
    """Cluster labels -> the clusters as sorted tuples of token indices (label names do not matter)."""
    groups: dict[int, list[int]] = {}
    for token, label in enumerate(labels):
        groups.setdefault(int(label), []).append(token)
    return sorted(tuple(g) for g in groups.values())


def sklearn_partition(distance: torch.Tensor, clusters: int, linkage: str) -> list[tuple[int, ...]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "partial build of the tree is implemented only for structured clustering"
        model = sklearn_cluster.AgglomerativeClustering(n_clusters=clusters, metric="precomputed", linkage=linkage)
        return partition(model.fit(distance.numpy()).labels_)


@pytest.mark.parametrize("linkage", LINKAGES)
def test_both_clusterings_equal_scikit_learn_on_120_token_sets(linkage):
    """120 random token sets per linkage, batched 8 at a time with ragged counts (3 to 60 tokens) and
    cluster counts from 1 to all: the same clusters as scikit-learn on each set alone, by both ways of
    keeping the nearest neighbours of the batched clustering, and by the CPU's scipy per image (the same
    labels)."""
    gen = torch.Generator().manual_seed({"single": 0, "average": 1, "complete": 2}[linkage])
    checked = 0
    for _ in range(15):
        counts = torch.randint(3, 61, (8,), generator=gen).tolist()
        clusters = [int(torch.randint(1, c + 1, (1,), generator=gen)) for c in counts]
        dim = int(torch.randint(4, 65, (1,), generator=gen))
        distance = cosine_distances(torch.randn(8, max(counts), dim, generator=gen))
        labels = agglomerative_clustering(distance, counts, clusters, linkage)
        # the accelerator's way (every row's nearest searched again each step, no host read): the same labels
        assert torch.equal(agglomerative_clustering(distance, counts, clusters, linkage, search_all=True), labels)
        assert torch.equal(host_clustering(distance, counts, clusters, linkage), labels)
        for b, (n, k) in enumerate(zip(counts, clusters)):
            assert (labels[b, n:] == -1).all()
            mine = partition(labels[b, :n].tolist())
            assert len(mine) == k
            assert mine == sklearn_partition(distance[b, :n, :n], k, linkage), (linkage, b, n, k)
            assert all(labels[b, g[0]] == g[0] for g in mine)  # a cluster is named by its lowest member
            checked += 1
    assert checked == 120


def test_clustering_reads_the_upper_triangle_as_scikit_learn_does():
    """A distance matrix whose lower triangle disagrees (float32 products need not be symmetric): only
    the upper triangle counts, as in scikit-learn's ``triu_indices`` read."""
    gen = torch.Generator().manual_seed(5)
    distance = torch.rand(1, 12, 12, generator=gen)
    lower = torch.tril(torch.rand(1, 12, 12, generator=gen), -1)
    skewed = torch.triu(distance, 1) + lower
    for linkage in LINKAGES:
        for clustering in (agglomerative_clustering, host_clustering):
            labels = clustering(skewed, [12], [4], linkage)
            assert partition(labels[0].tolist()) == sklearn_partition(skewed[0], 4, linkage)


def test_ties_follow_the_documented_rules():
    """Exactly equal distances (as duplicate tokens give): the batched clustering merges the pair with the
    lowest row, then column, first (tokens 0-1 and 2-3 both at distance 0.1, one merge); the CPU's scipy
    per image breaks a tie as scikit-learn does, whatever the pair (it is the same scipy call)."""
    distance = torch.full((1, 4, 4), 0.9)
    distance[0, 0, 1] = distance[0, 2, 3] = 0.1
    for linkage in LINKAGES:
        labels = agglomerative_clustering(distance, [4], [3], linkage)
        assert labels[0].tolist() == [0, 0, 2, 3]
        on_host = host_clustering(distance, [4], [3], linkage)
        assert partition(on_host[0].tolist()) == sklearn_partition(distance[0], 3, linkage)


def _model(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = create_model(name, **SMALL, **overrides).eval()
    with torch.no_grad():  # a class token and positions that matter (timm inits them near zero)
        model.cls_token.normal_(std=0.5)
        model.pos_embed.normal_(std=0.5)
    return model


def _engine_clusters(model, image: torch.Tensor) -> list[list[tuple[int, ...]]]:
    """Per reduction, the engine's clusters of original patch indices (``ATCRun.assignments``)."""
    with torch.no_grad():
        x = model.embed(image[None])
        block_pass = model.begin(x)
        block_pass.run(x, 0, model.config.depth)
    found = []
    for owner in block_pass.method.assignments:
        found.append(partition(owner[1:].tolist()))  # row 0: the class token
    return found


@pytest.mark.parametrize("name", ["atc_small", "atc_single_small", "atc_complete_small"])
def test_every_reduction_makes_the_authors_clusters(name):
    """The engine's clusters (``ATCRun.assignments``) at blocks 3, 6, 9 == those of ATC's Block_ATC run
    per image with scikit-learn (tests/test_baselines.py compares the logits and token counts of a packed
    batch and of mixed resolutions for the same three models)."""
    model = _model(name)
    image = torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(1))
    clusters: list = []
    with torch.no_grad():
        ref.run_atc(model.state_dict(), image, linkage=model.options.linkage, clusters=clusters)
    assert _engine_clusters(model, image) == clusters
    assert [len(c) for c in clusters] == [137, 96, 67]


def test_without_proportional_attention_sizes_restart_in_every_block():
    """``proportional_attn=False`` (the authors' flag off): no size bias, plain means at every merge."""
    from nested_svit.config import Pruning

    pruning = Pruning("atc", (3, 6, 9), (0.7, 0.7 ** 2, 0.7 ** 3), options={"proportional_attn": False})
    model = _model("atc_small", seed=3, pruning=pruning)
    image = torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model.forward_head(model.forward_features(image[None]))[0]
        expected = ref.run_atc(model.state_dict(), image, proportional=False)[0]
        with_sizes = ref.run_atc(model.state_dict(), image, proportional=True)[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, with_sizes, atol=1e-4, rtol=1e-4)  # the flag matters here


def test_unknown_linkage_is_refused_when_the_model_is_built():
    from nested_svit.config import Pruning

    with pytest.raises(ValueError, match="linkage"):
        create_model("atc_small", pruning=Pruning("atc", (3,), (0.5,), options={"linkage": "ward"}))


def test_release_file_configures_the_model_and_loads_its_best_weights(tmp_path):
    """ATC's train_deit.py layout: ``model``, ``model_ema``, ``ema_best`` and the args namespace. The file
    alone gives the linkage, keep rate and blocks; with ``ema_best`` the EMA weights are the ones loaded
    (as its validate_deit.py does)."""
    import argparse

    from nested_svit.inference import load_model

    torch.manual_seed(5)  # DeiT-S's width (a release names no other), random weights
    trained, ema = create_model("atc_complete_small").eval(), create_model("atc_complete_small").eval()
    args = argparse.Namespace(model="atc_small_patch16_224", reduction_loc=[3, 6, 9], reduction_ratio=[0.7],
                              linkage="complete", proportional_attn=True, lr=1e-3)
    path = tmp_path / "atc_complete_small.pth"
    torch.save({"model": trained.state_dict(), "model_ema": ema.state_dict(), "ema_best": True, "args": args,
                "epoch": 29}, path)
    with pytest.warns(UserWarning, match="ATC with complete linkage at keep rate 0.7 in blocks 3, 6, 9, with "
                      "proportional attention"):
        model = load_model(path)
    assert model.name == "atc_complete_small" and model.options.linkage == "complete"
    assert model.config.keep_targets == pytest.approx((0.7, 0.49, 0.343))
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(image), ema(image), atol=0, rtol=0)
    args.reduction_ratio = [0.5]
    torch.save({"model": trained.state_dict(), "model_ema": ema.state_dict(), "ema_best": False, "args": args}, path)
    with pytest.warns(UserWarning, match="keep rate 0.5"):
        model = load_model(path)
    assert model.config.keep_targets == pytest.approx((0.5, 0.25, 0.125))
    with torch.no_grad():
        assert not torch.allclose(model(image), trained(image))  # another keep rate: other clusters
        trained_at_half = create_model("atc_complete_small", keep_targets=(0.5, 0.25, 0.125)).eval()
        trained_at_half.load_state_dict(trained.state_dict())
        torch.testing.assert_close(model(image), trained_at_half(image), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["atc_small", "tome_small"])
def test_training_gradients_equal_the_authors_algorithm(name):
    """Training through the merges as the authors do: the clustering (matching) decides without
    gradient, the size-weighted means carry it. The training execution's gradients equal those of the
    per-image reference run with autograd through the same merges. (They did not, by 6% for ATC and 9%
    for ToMe in block 2, while a row that took several merges got its gradient once per merge.)"""
    model = _model(name, seed=7)
    model.train()
    model.set_execution(model.training_execution())
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    model(images).logsumexp(-1).sum().backward()
    names = ("blocks.2.attn.qkv.weight", "blocks.5.mlp.fc1.weight", "blocks.11.attn.proj.weight", "head.weight")
    state = {k: v.detach().clone().requires_grad_(k in names) for k, v in model.state_dict().items()}
    run = ref.run_atc if name.startswith("atc") else ref.run_tome
    sum(run(state, img)[0].logsumexp(-1) for img in images).backward()
    params = dict(model.named_parameters())
    for name in names:
        mine, theirs = params[name].grad, state[name].grad
        assert theirs.norm() > 0 and (mine - theirs).norm() / theirs.norm() < 1e-4, name  # float32 sums differ
