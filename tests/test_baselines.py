"""The paper's baselines on the packed engine (nested_svit/methods) against independent per-image
implementations of the authors' algorithms (tests/baseline_reference.py)."""
from __future__ import annotations

import pytest
import torch

import baseline_reference as ref
from nested_svit import create_model
from nested_svit.methods.diffrate import RATES

SMALL = dict(embed_dim=128, num_heads=2, num_classes=10)  # head_dim 64 as DeiT; fast on CPU
CASES = {
    "dynamicvit_small": ref.run_dynamicvit,
    "evit_small": ref.run_evit,
    "evit_nofuse_small": lambda s, img: ref.run_evit(s, img, fuse=False),
    "evovit_small": ref.run_evovit,
    "ats_small": ref.run_ats,
    "tome_small": ref.run_tome,
    "atc_small": ref.run_atc,  # clusters compared whole in tests/test_atc.py
    "atc_single_small": lambda s, img: ref.run_atc(s, img, linkage="single"),
    "atc_complete_small": lambda s, img: ref.run_atc(s, img, linkage="complete"),
    "diffrate_small": lambda s, img: ref.run_diffrate(s, img, *RATES["small"]["2.9"]),
    "mctf_small": ref.run_mctf,
    "mctf_fast_small": lambda s, img: ref.run_mctf(s, img, r=0.35, blocks=(3, 6, 9)),
}


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(name, **SMALL).eval()
    with torch.no_grad():  # a class token and positions that matter (timm inits them near zero)
        model.cls_token.normal_(std=0.5)
        model.pos_embed.normal_(std=0.5)
        for gate in model.gates:  # predictors whose global (per-image mean) half matters to the ranking
            for m in gate.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.normal_(std=2.0 / m.in_features ** 0.5)
                    m.bias.normal_(std=0.5)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_batch_equals_the_authors_algorithm_per_image(name):
    model = _model(name)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 224, 224, generator=gen)
    with torch.no_grad():
        feats, usage = model.forward_features(images, return_usage=True)
        logits = model.forward_head(feats)
        state = model.state_dict()
        n = usage.total[0].item()
        for b in range(images.shape[0]):
            expected, counts, kept = CASES[name](state, images[b])
            assert usage.kept_mlp[b].tolist() == counts, (b, usage.kept_mlp[b].tolist(), counts)
            start = b * (n + model.slots)  # rows of image b in the packed map: class token, patches, slots
            mine = [(m[start + 1:start + n].nonzero().squeeze(1)).tolist() for m in usage.masks]
            assert mine == kept  # the same tokens, not only as many
            torch.testing.assert_close(logits[b], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mixed_resolutions_packed_equals_reference_and_single_images(name):
    """Images of three sizes in one packed batch == the engine's per-image reference execution ==
    each image alone == the independent implementation (keep counts follow each image's own N0)."""
    model = _model(name, seed=2)
    gen = torch.Generator().manual_seed(3)
    images = [torch.randn(3, 224, 224, generator=gen), torch.randn(3, 160, 208, generator=gen),
              torch.randn(3, 128, 128, generator=gen)]
    with torch.no_grad():
        packed = model.forward_head(model.forward_features(images))
        model.set_execution("reference")
        reference = model.forward_head(model.forward_features(images))
        model.set_execution("packed")
        single = torch.cat([model.forward_head(model.forward_features([img])) for img in images])
        state = model.state_dict()
        independent = torch.stack([CASES[name](state, img)[0] for img in images])
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, independent, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["diffrate_tiny_1.0", "diffrate_base_8.7"])
def test_diffrate_other_json_targets_equal_the_authors_algorithm(name):
    """DeiT-T 1.0 has merge counts above the tokens left (merges that do nothing, 21 tokens at the end),
    DeiT-B 8.7 prunes and merges hardest: both as the per-image algorithm, on two images in one batch."""
    size, target = name.split("_")[1:]
    model = _model(name)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        feats, usage = model.forward_features(images, return_usage=True)
        logits = model.forward_head(feats)
        for b in range(2):
            expected, counts, _ = ref.run_diffrate(model.state_dict(), images[b], *RATES[size][target])
            assert usage.kept_mlp[b].tolist() == counts
            torch.testing.assert_close(logits[b], expected, atol=1e-4, rtol=1e-4)
    assert counts[-1] == (21 if size == "tiny" else 3)


@pytest.mark.parametrize("options", [{"bidirection": False}, {"tau_sim": 0, "tau_size": 0}, {"r": 9, "tau_info": 0}])
def test_mctf_variants_equal_the_authors_algorithm(options):
    """MCTF's knobs beside its eval scripts' setting: one-way matching, criteria left out, another r. In
    float64: with the info criterion alone, scores are ``(i_a i_b)^(1/20)``, whose float32 near-ties
    order tokens differently in any two implementations."""
    from nested_svit.config import Pruning

    pruning = Pruning("mctf", tuple(range(1, 12)), (1.0,) * 11, options=options)
    model = create_model("mctf_small", **SMALL, pruning=pruning).eval()
    model.load_state_dict(_model("mctf_small").state_dict())
    model.double()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    tau = (options.get("tau_sim", 1), options.get("tau_info", 20), options.get("tau_size", 40))
    with torch.no_grad():
        feats, usage = model.forward_features(images, return_usage=True)
        logits = model.forward_head(feats)
        for b in range(2):
            expected, counts, _ = ref.run_mctf(model.state_dict(), images[b], r=options.get("r", 16), tau=tau,
                                               bidirection=options.get("bidirection", True))
            assert usage.kept_mlp[b].tolist() == counts
            torch.testing.assert_close(logits[b], expected, atol=1e-9, rtol=1e-9)


def test_release_token_counts_of_deit_small():
    """Token counts per block at the release configurations, as measured on the authors' code
    (spec section 0): fixed for DynamicViT / EViT / Evo-ViT."""
    expected = {
        "dynamicvit_small": [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3,
        "evit_small": [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3,
        "evit_nofuse_small": [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3,
        "evovit_small": [197] * 4 + [99] * 8,
    }
    images = torch.randn(2, 3, 224, 224)
    for name, counts in expected.items():
        model = _model(name)
        with torch.no_grad():
            usage = model.forward_features(images, return_usage=True)[1]
        assert usage.kept_mlp.tolist() == [counts, counts], name


def test_evit_fused_tokens_equal_the_reference():
    """The final map's fused tokens (virtual rows) and kept patch tokens equal EViT's sequence."""
    model = _model("evit_small", seed=4)
    image = torch.randn(3, 224, 224)
    with torch.no_grad():
        x = model.embed(image[None])
        block_pass = model.begin(x)
        x = block_pass.run(x, 0, 12)
        active = block_pass.method.active
        tokens: list = []
        ref.run_evit(model.state_dict(), image, tokens=tokens)
    seq, orig = tokens
    rows = active.nonzero().squeeze(1)
    slots = block_pass.slot_mask[rows]
    patch_rows = rows[~slots][1:]  # after the class token, in original patch order
    order = torch.argsort(orig[orig >= 0])
    torch.testing.assert_close(x.values[patch_rows], seq[1:][orig >= 0][order], atol=1e-4, rtol=1e-4)
    assert int(slots.sum()) == int((orig < 0).sum()) >= 1
    torch.testing.assert_close(x.values[rows[slots]].sum(0), seq[1:][orig < 0].sum(0), atol=1e-4, rtol=1e-4)


def test_key_bias_context_equals_explicit_attention():
    """ToMe's proportional attention by one extra q/k channel == softmax(q k^T / sqrt(d) + bias) v,
    on the dense and the packed (varlen loop) paths."""
    from nested_svit.attention import DenseContext, KeyBiasContext, VarlenContext
    from nested_svit.tokens import Layout

    gen = torch.Generator().manual_seed(0)
    heads, d, n = 3, 16, 7
    qkv = torch.randn(1, n, 3 * heads * d, generator=gen, dtype=torch.float64)
    bias = torch.rand(1, n, generator=gen, dtype=torch.float64).log()
    q, k, v = qkv.view(1, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / d ** 0.5 + bias[:, None, None, :]
    expected = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(1, n, heads * d)
    torch.testing.assert_close(KeyBiasContext(DenseContext(), bias)(qkv, heads), expected, atol=1e-10, rtol=1e-10)
    packed = torch.cat([qkv[0], qkv[0, :4]])  # two images: 7 and 4 rows
    layout = Layout.from_lengths([n, 4])
    q4, k4, v4 = (t[:, :, :4] for t in (q, k, v))
    second = (torch.softmax(q4 @ k4.transpose(-1, -2) / d ** 0.5 + bias[:, None, None, :4], -1) @ v4)
    second = second.transpose(1, 2).reshape(4, heads * d)
    for backend in ("loop", "padded", "nested"):  # float mask (loop, padded); widened channels (nested)
        ctx = KeyBiasContext(VarlenContext(layout, backend), torch.cat([bias[0], bias[0, :4]]))
        out = ctx(packed.float(), heads).double()
        torch.testing.assert_close(out[:n], expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[n:], second, atol=1e-5, rtol=1e-5)
    widened = KeyBiasContext(DenseContext(), bias)._widened(qkv, heads)  # the extra-channel path in float64
    torch.testing.assert_close(widened, expected, atol=1e-10, rtol=1e-10)


def test_class_attention_row_equals_the_attention_matrix_row():
    from nested_svit.methods import class_attention
    from nested_svit.tokens import Layout

    gen = torch.Generator().manual_seed(1)
    heads, d = 2, 8
    lengths = [5, 9, 1]
    qkv = torch.randn(sum(lengths), 3 * heads * d, generator=gen)
    probs = class_attention(qkv, heads, Layout.from_lengths(lengths))
    start = 0
    for n in lengths:
        q, k, _ = qkv[start:start + n].view(n, 3, heads, d).permute(1, 2, 0, 3)
        row = torch.softmax(q[:, :1] @ k.transpose(-1, -2) / d ** 0.5, -1)[:, 0]  # [H, n]
        torch.testing.assert_close(probs[start:start + n].T, row, atol=1e-6, rtol=1e-6)
        start += n


class _Arbitrary:  # an object no checkpoint reader may unpickle
    pass


def _authors_layout(name: str, state: dict) -> dict:
    """Our state dict -> the authors' release layout (spec section 10), written independently."""
    import argparse

    out: dict = {}
    if name.startswith("dynamicvit"):
        out = {k.replace("gates.", "score_predictor.", 1): v for k, v in state.items()}
    elif name.startswith("evovit"):
        for k, v in state.items():
            parts = k.split(".")
            if k.startswith("blocks.") and parts[2] == "attn" and parts[3] == "qkv":
                i, what, c = parts[1], parts[4], v.shape[0] // 3
                out[f"qks.{i}.qk.{what}"], out[f"vs.{i}.v.{what}"] = v[:2 * c].clone(), v[2 * c:].clone()
            elif k.startswith("blocks.") and parts[2] == "norm1":
                out[f"norms.{parts[1]}.{parts[3]}"] = v
            elif k.startswith("blocks.") and parts[2] == "attn" and parts[3] == "proj":
                out[f"projs.{parts[1]}.{parts[4]}"] = v
            else:
                out[k] = v
        out["head_cls.weight"], out["head_cls.bias"] = state["head.weight"] * 2, state["head.bias"]
        out["norm_cls.weight"], out["norm_cls.bias"] = state["norm.weight"], state["norm.bias"]
    else:
        out = dict(state)
        if name.startswith("ats"):
            for i in range(3, 12):
                out[f"blocks.{i}.attn.out_zero_mask"] = torch.zeros(1, state["cls_token"].shape[-1])
    wrapper = {"model": out}
    if name.startswith(("evit", "evovit")):
        wrapper.update(args=argparse.Namespace(model=name, lr=2e-5, drop_loc=(3, 6, 9), output_dir="out"),
                       epoch=29, optimizer={"state": {}, "param_groups": []})
    return wrapper


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpoint_round_trip_in_the_authors_layout(tmp_path, name):
    from nested_svit import load_checkpoint

    source = _model(name)
    path = tmp_path / "release.pth"
    torch.save(_authors_layout(name, source.state_dict()), path)
    target = create_model(name, **SMALL).eval()
    report = load_checkpoint(target, path)
    assert report.format == {"dynamicvit": "dynamicvit", "evovit": "evovit"}.get(name.split("_")[0], "timm")
    if name.startswith(("evovit", "ats")):
        assert any("left out" in n for n in report.notes)
    assert all(b.norm1.eps == 1e-6 for b in target.blocks)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images), atol=0, rtol=0)


def test_args_namespace_is_read_but_nothing_else(tmp_path):
    import argparse

    from nested_svit import load_checkpoint
    from nested_svit.checkpoint import CheckpointError

    state = create_model("evit_small", **SMALL).state_dict()
    bad = tmp_path / "bad.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=1.0), "other": _Arbitrary()}, bad)
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        load_checkpoint(create_model("evit_small", **SMALL), bad)


def test_wrong_method_file_lists_the_keys(tmp_path):
    """A DynamicViT file into an SViT model: one error naming the predictor and gate keys."""
    from nested_svit import load_checkpoint
    from nested_svit.checkpoint import CheckpointError

    path = tmp_path / "dyvit.pth"
    torch.save(_authors_layout("dynamicvit_small", _model("dynamicvit_small").state_dict()), path)
    with pytest.raises(CheckpointError, match=r"unexpected .*gates\.0\.in_conv"):
        load_checkpoint(create_model("svit_small", **SMALL), path)


@pytest.mark.parametrize("name", ["svit_small", "dynamicvit_small", "ats_small", "evit_small"])
def test_remove_zeroes_the_rows_not_active_at_readout(name):
    """``remove_pruned``: the output map is the preserved map with every row that was not active at
    the end set to zero (class token and kept rows unchanged)."""
    torch.manual_seed(0)
    preserve = create_model(name, **SMALL).eval()
    remove = create_model(name, **SMALL, remove_pruned=True).eval()
    remove.load_state_dict(preserve.state_dict())
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        x = preserve.embed(images)
        block_pass = preserve.begin(x)
        out = block_pass.run(x, 0, 12)
        active = block_pass.method.readout_mask() | block_pass.protect  # the class token is always read
        kept_map, _ = preserve.forward_tokens(preserve.embed(images))
        removed_map, _ = remove.forward_tokens(remove.embed(images))
    real = ~block_pass.slot_mask
    active = active[real]
    assert 0 < int(active.sum()) < active.numel()
    torch.testing.assert_close(kept_map.values, out.values[real])
    torch.testing.assert_close(removed_map.values[active], kept_map.values[active])
    assert removed_map.values[~active].abs().max() == 0
    with torch.no_grad():
        torch.testing.assert_close(remove(images), preserve(images))  # the class token reads out either way


@pytest.mark.parametrize("mode", ["attention", "input"])
def test_evit_dropped_tokens_keep_the_chosen_value(mode):
    """A token EViT drops in block 3 keeps its value from before the block (``input``) or after the
    block's attention half (``attention``): checked against the block's own attention half."""
    from nested_svit.attention import DenseContext

    torch.manual_seed(0)
    model = create_model("evit_small", **SMALL, evit_preserve=mode).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        x = model.embed(images)
        block_pass = model.begin(x)
        x = block_pass.run(x, 0, 3)
        before = x.values.clone()
        active_before = block_pass.method.active.clone()
        after_attn = model.blocks[3].attention_residual(before[active_before].view(2, -1, SMALL["embed_dim"]),
                                                        DenseContext())
        x = block_pass.run(x, 3, 4)
    dropped = active_before & ~block_pass.method.active
    assert int(dropped.sum()) == 2 * (196 - 138)
    expected = before[dropped] if mode == "input" else after_attn.reshape(-1, SMALL["embed_dim"])[dropped[active_before]]
    torch.testing.assert_close(x.values[dropped], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # ~4 s; the harness's stand-in, not the method
def test_ats_benchmark_sharpening_reaches_the_flop_target():
    """The harness's ATS stand-in for trained attention: FLOPs on the calibration images equal the
    target share of dense (by the FLOP model's own count), with per-image counts still varying."""
    from nested_svit.benchmark.flops import flops_per_image
    from nested_svit.benchmark.stand_ins import sharpen_queries as sharpen_for_benchmark

    model = _model("ats_small")
    images = torch.randn(6, 3, 224, 224)
    with torch.no_grad():
        factor = sharpen_for_benchmark(model, images, target_ratio=0.7)
        usage = model.forward_features(images, return_usage=True)[1]
    dense_cfg = create_model("deit_small_patch16_224", **SMALL).config
    full = usage.total[:, None].expand(-1, 12)
    ratio = flops_per_image(model.config, usage.kept, usage.total, usage.kept_mlp).mean() / \
        flops_per_image(dense_cfg, full, usage.total).mean()
    assert factor > 1 and abs(float(ratio) - 0.7) < 0.02
    assert len(set(usage.kept_mlp[:, -1].tolist())) > 1


@pytest.mark.parametrize("backend", ["padded", "nested"])
def test_every_method_agrees_across_attention_backends(backend):
    """Mixed-resolution batches: each CPU backend (and the key bias ToMe adds) gives the loop backend's logits."""
    images = [torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(5)),
              torch.randn(3, 160, 192, generator=torch.Generator().manual_seed(6))]
    for name in sorted(CASES):
        model = _model(name)
        with torch.inference_mode():
            model.set_execution("packed", backend="loop")
            expected = model.forward_head(model.forward_features(images))
            model.set_execution("packed", backend=backend)
            got = model.forward_head(model.forward_features(images))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["loop", "padded", "nested"])
def test_query_subset_attention_equals_rows_of_full_attention(backend):
    """ATS's query subset: the kept rows' outputs equal those rows of the full attention."""
    from nested_svit.attention import query_subset_attention, varlen_attention
    from nested_svit.tokens import Layout

    gen = torch.Generator().manual_seed(2)
    layout = Layout.from_lengths([6, 1, 9])
    qkv = torch.randn(layout.total, 3 * 2 * 8, generator=gen)
    keep = torch.rand(layout.total, generator=gen) > 0.4
    keep[6] = False  # an image with no kept query
    full = varlen_attention(qkv, 2, layout, "loop")
    torch.testing.assert_close(query_subset_attention(qkv, 2, layout, keep, backend), full[keep], atol=1e-6, rtol=1e-6)


def test_tome_matching_and_merge_alone_equal_the_authors_per_image():
    """ToMe's two plain functions on a padded batch of two sequences of different lengths == ToMe's
    ``bipartite_soft_matching`` / ``merge_wavg`` written per sequence (as ``baseline_reference.run_tome``)."""
    import math

    from nested_svit.methods.selection import merge_wavg
    from nested_svit.methods.tome import bipartite_soft_matching

    gen = torch.Generator().manual_seed(0)
    lengths, d, r = [9, 14], 8, 3
    metrics = [torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1) for n in lengths]
    padded = torch.zeros(len(lengths), max(lengths), d)
    valid = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, m in enumerate(metrics):
        padded[i, :len(m)], valid[i, :len(m)] = m, True
    edge, partner = bipartite_soft_matching(padded, valid)
    for i, m in enumerate(metrics):
        scores = m[0::2] @ m[1::2].T
        scores[0, :] = -math.inf
        node_max, node_idx = scores.max(-1)
        n_a = (len(m) + 1) // 2
        assert edge[i, :n_a].tolist() == node_max.argsort(descending=True).tolist()
        assert partner[i, :n_a].tolist() == node_idx.tolist()
        assert set(edge[i, n_a:].tolist()) == set(range(n_a, edge.shape[1]))  # padding last
        # the merge of the r best edges, on one sequence's rows
        x, size = torch.randn(len(m), 5, generator=gen), torch.rand(len(m), generator=gen) + 0.5
        src, dst = node_max.argsort(descending=True)[:r], node_idx[node_max.argsort(descending=True)[:r]]
        xs, ss = x * size[:, None], size[:, None]
        expected_x = xs[1::2].index_add(0, dst, xs[0::2][src]) / ss[1::2].index_add(0, dst, ss[0::2][src])
        expected_size = ss[1::2].index_add(0, dst, ss[0::2][src])[:, 0]
        got_x = x.clone()
        got_size = merge_wavg(got_x, size, 2 * src, 2 * dst + 1)
        assert torch.allclose(got_x[1::2], expected_x, atol=1e-6) and torch.equal(got_x[0::2], x[0::2])
        assert torch.allclose(got_size[1::2], expected_size)


def test_every_registered_method_has_a_reference_test():
    """A new method in ``methods/`` without an independent per-image implementation of its authors'
    algorithm in CASES fails here (SViT's references: a hand-written forward of the official release,
    tests/test_checkpoint.py, and the reference execution, tests/test_equivalence.py); so does a
    registered baseline model (an option variant) missing from CASES."""
    from model_fixtures import method_models

    from nested_svit.methods import METHODS
    from nested_svit.registry import get_config

    covered = {get_config(n).method for n in CASES} | {"svit"}
    assert set(METHODS) - covered == set()
    baselines = [n for n in method_models("small") if get_config(n).gate_blocks and get_config(n).method != "svit"]
    assert set(baselines) - set(CASES) == set()


def test_mctf_release_file_configures_the_model(tmp_path):
    """MCTF's main.py layout: ``model``, ``args`` (``mctf_type``, ``r_evals``, ``activate_layer``) and the
    EMA weights it saves as a 1-tuple; the file alone gives MCTF-Fast's r and blocks, and a setting the
    engine does not run (size pooling) is refused in one line."""
    import argparse

    from nested_svit.checkpoint import CheckpointError
    from nested_svit.inference import load_model

    torch.manual_seed(7)
    trained = create_model("mctf_fast_small").eval()
    args = argparse.Namespace(model="deit_small", use_mctf=True, mctf_type=[0.35, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0],
                              r_evals=[0.35], activate_layer=[3, 6, 9], task_type=[1, 0, 0, 0], lr=1e-3)
    path = tmp_path / "mctf_fast.pth"
    torch.save({"model": trained.state_dict(), "state_dict_ema": (trained.state_dict(),), "epoch": 29,
                "args": args}, path)
    with pytest.warns(UserWarning, match=r"MCTF fusing r=0.35 in blocks 3, 6, 9"):
        model = load_model(path)
    assert model.name == "mctf_fast_small" and model.options.r == 0.35
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(image), trained(image), atol=0, rtol=0)
    args.mctf_type = [16, 0, 0, 1, 1, 1, 20, 40, 1, 0, 0]  # pooling by size only
    torch.save({"model": trained.state_dict(), "args": args}, path)
    with pytest.raises(CheckpointError, match="attention pooling"):
        load_model(path)


@pytest.mark.parametrize("r", [16, 9, 0.35, 0.5, 1, 2.0])
def test_mctf_fused_counts_on_the_device_follow_the_authors_rule(r):
    """The device-side count (no host copy, for captured forwards) against the authors' Python rule:
    ``t - 10`` when ``t - r < 10``, a fraction of the ``t - 1`` patch tokens when below 1, at most half."""
    from nested_svit.methods.mctf import fused_counts

    def authors(t: int) -> int:
        rr = r if t - r >= 10 else t - 10
        return max(0, min(int((t - 1) * rr) if rr < 1 else int(rr), (t - 1) // 2))

    t = torch.arange(0, 400)
    assert fused_counts(t, r).tolist() == [authors(int(v)) for v in t]
