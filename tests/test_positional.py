"""attn_course.positional against closed forms, the papers' formulas and properties."""

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attn_course import basics
from attn_course.positional import (
    ENCODINGS,
    LearnedPositionalEmbedding,
    PositionalModel,
    PositionalSelfAttention,
    RelativePositionEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    fit_parallel,
    sinusoidal_encoding,
)
from attn_course.train import fit, sequence_cross_entropy


@pytest.mark.parametrize("length, dim, base", [(7, 8, 10000.0), (5, 6, 100.0), (3, 5, 10000.0)])
def test_sinusoidal_matches_the_formula_entry_by_entry(length, dim, base):
    pe = sinusoidal_encoding(length, dim, base)
    assert pe.shape == (length, dim) and pe.dtype == torch.float32
    for p in range(length):
        for j in range(dim):
            i = j // 2
            angle = p / base ** (2 * i / dim)
            ref = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert pe[p, j].item() == pytest.approx(ref, abs=1e-6)


def test_sinusoidal_dot_product_depends_only_on_the_offset():
    pe = sinusoidal_encoding(64, 32).double()
    sims = pe @ pe.T
    for k in (1, 3, 10):
        diag = torch.diagonal(sims, offset=k)
        torch.testing.assert_close(diag, diag[0].expand_as(diag), atol=1e-5, rtol=0)


def _rope_reference(x, positions, base=10000.0):
    """2x2 rotation matrices applied pair by pair."""
    out = torch.empty_like(x, dtype=torch.float64)
    d = x.shape[-1]
    for t in range(x.shape[-2]):
        for i in range(d // 2):
            theta = float(positions[t]) * base ** (-2 * i / d)
            R = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                             dtype=torch.float64)
            out[..., t, 2 * i:2 * i + 2] = x[..., t, 2 * i:2 * i + 2].double() @ R.T
    return out


def test_rope_equals_rotation_matrices():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 7, 100])
    torch.testing.assert_close(apply_rope(x, pos), _rope_reference(x, pos))
    torch.testing.assert_close(apply_rope(x), _rope_reference(x, torch.arange(5)))


@given(st.integers(0, 2**31 - 1), st.integers(-50, 50), st.integers(-50, 50), st.integers(-50, 50))
def test_rope_scores_depend_only_on_the_offset(seed, m, n, shift):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 16, generator=g, dtype=torch.float64), torch.randn(1, 16, generator=g, dtype=torch.float64)
    a = apply_rope(q, torch.tensor([m])) @ apply_rope(k, torch.tensor([n])).T
    b = apply_rope(q, torch.tensor([m + shift])) @ apply_rope(k, torch.tensor([n + shift])).T
    torch.testing.assert_close(a, b)


@given(st.integers(0, 2**31 - 1))
def test_rope_preserves_norms_and_position_zero_is_identity(seed):
    x = torch.randn(3, 6, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = apply_rope(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, 0], x[:, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rope_keeps_dtype_and_is_close_to_float64(dtype):
    x = torch.randn(2, 6, 8)
    y = apply_rope(x.to(dtype))
    assert y.dtype == dtype
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(y.double(), apply_rope(x.double()), atol=tol, rtol=tol)


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2 ** -(k + 1) for k in range(8)]))
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2 ** (-2 * (k + 1)) for k in range(4)]))
    # not a power of two: the 4 slopes of 4 heads, then every other slope of 8 heads
    six = [2 ** (-2 * (k + 1)) for k in range(4)] + [2 ** -1, 2 ** -3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(six))
    assert alibi_slopes(12).shape == (12,) and alibi_slopes(1).item() == 2 ** -8
    s = alibi_slopes(16)
    assert torch.all(s[1:] < s[:-1])


def test_alibi_bias_causal_and_symmetric():
    b = alibi_bias(4, 5)
    slopes = alibi_slopes(4)
    for h in range(4):
        for i in range(5):
            for j in range(5):
                if j <= i:
                    assert b[h, i, j].item() == pytest.approx(-slopes[h].item() * (i - j))
                else:
                    assert b[h, i, j].item() == float("-inf")
    nb = alibi_bias(2, 4, is_causal=False)
    torch.testing.assert_close(nb, nb.transpose(-2, -1))
    assert nb[1, 0, 3].item() == pytest.approx(-alibi_slopes(2)[1].item() * 3)


def test_attention_without_positions_is_permutation_equivariant_and_with_them_it_is_not():
    torch.manual_seed(0)
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    perm = torch.randperm(7)
    for encoding in ENCODINGS:
        layer = PositionalSelfAttention(16, 2, encoding).double()
        if encoding in ("relative",):
            with torch.no_grad():
                layer.rel_k.table.weight.normal_()
        out, _ = layer(x, is_causal=False)
        out_p, _ = layer(x[:, perm], is_causal=False)
        equivariant = torch.allclose(out_p, out[:, perm], atol=1e-9)
        assert equivariant == (encoding in ("none", "sinusoidal", "learned")), encoding
    pe = sinusoidal_encoding(7, 16).double()
    out, _ = basics.scaled_dot_product_attention(x + pe, x + pe, x + pe)
    out_p, _ = basics.scaled_dot_product_attention(x[:, perm] + pe, x[:, perm] + pe, x[:, perm] + pe)
    assert not torch.allclose(out_p, out[:, perm], atol=1e-6)


def test_relative_embedding_clips_distances():
    rel = RelativePositionEmbedding(2, 3)
    a = rel(4, 6)
    assert a.shape == (4, 6, 3)
    w = rel.table.weight
    torch.testing.assert_close(a[0, 5], w[4])  # j - i = 5 clipped to +2 -> index 4
    torch.testing.assert_close(a[3, 0], w[0])  # -3 clipped to -2 -> index 0
    torch.testing.assert_close(a[2, 3], w[3])  # +1 -> index 3


def test_relative_attention_equals_shaw_formula():
    torch.manual_seed(0)
    layer = PositionalSelfAttention(4, 1, "relative", max_distance=2).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    out, w = layer(x, is_causal=False)
    q, k, v = layer.qkv(x)[0].chunk(3, -1)
    ak, av = layer.rel_k(5, 5), layer.rel_v(5, 5)
    for i in range(5):
        e = torch.stack([q[i] @ (k[j] + ak[i, j]) for j in range(5)]) / 2.0
        a = torch.softmax(e, 0)
        z = sum(a[j] * (v[j] + av[i, j]) for j in range(5))
        torch.testing.assert_close(w[0, 0, i], a)
        torch.testing.assert_close(out[0, i], layer.out(z))


def test_alibi_and_rope_layers_equal_explicit_computations():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    alibi = PositionalSelfAttention(8, 2, "alibi").double()
    _, w = alibi(x)
    q, k, _ = (t.view(2, 6, 2, 4).transpose(1, 2) for t in alibi.qkv(x).chunk(3, -1))
    ref = torch.softmax(q @ k.transpose(-2, -1) / 2.0 + alibi_bias(2, 6).double(), -1)
    torch.testing.assert_close(w, ref)
    rope = PositionalSelfAttention(8, 2, "rope").double()
    _, w = rope(x)
    q, k, _ = (t.view(2, 6, 2, 4).transpose(1, 2) for t in rope.qkv(x).chunk(3, -1))
    s = apply_rope(q) @ apply_rope(k).transpose(-2, -1) / 2.0
    ref = torch.softmax(s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -math.inf), -1)
    torch.testing.assert_close(w, ref)


def test_learned_embedding_and_model_shapes():
    emb = LearnedPositionalEmbedding(10, 4)
    x = torch.zeros(2, 3, 4)
    torch.testing.assert_close(emb(x), emb.table.weight[:3].expand(2, 3, 4))
    with pytest.raises(ValueError, match="max_length"):
        emb(torch.zeros(1, 11, 4))
    for encoding in ENCODINGS:
        logits, w = PositionalModel(7, 8, 2, encoding, max_length=12)(torch.randint(0, 7, (3, 12)))
        assert logits.shape == (3, 12, 7) and w.shape == (3, 2, 12, 12)


def test_alibi_slopes_index_heads_from_one():
    # Press et al.: head h = 1 .. H has slope 2^(-8h/H), so the first head's slope is 2^(-8/H), not 1
    for H in (1, 2, 4, 8, 16):
        torch.testing.assert_close(alibi_slopes(H), torch.tensor([2 ** (-8 * h / H) for h in range(1, H + 1)]))


def test_two_layer_model_composes_its_layers():
    torch.manual_seed(0)
    model = PositionalModel(7, 8, 2, "alibi", num_layers=2).double()
    ids = torch.randint(0, 7, (3, 9))
    x = model.tokens(ids)
    out1, _ = model.attention(x)
    out2, w2 = model.more_layers[0](x + out1)
    logits, w = model(ids)
    torch.testing.assert_close(logits, model.readout(x + out1 + out2))
    torch.testing.assert_close(w, w2)
    with pytest.raises(ValueError, match="num_layers"):
        PositionalModel(7, 8, 2, "rope", num_layers=0)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_fit_parallel_equals_separate_fits(encoding):
    """Each copy follows exactly the trajectory of train.fit with its own seed and data."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 6, (40, 9), generator=g), torch.randint(0, 6, (40, 9), generator=g)) for _ in range(3)]
    for _, y in data:
        y[:, :2] = -100
    torch.manual_seed(1)
    models = [PositionalModel(6, 8, 2, encoding, max_length=9).double() for _ in range(3)]
    reference = [copy.deepcopy(m) for m in models]
    losses = fit_parallel(models, [x for x, _ in data], [y for _, y in data], loss_fn=sequence_cross_entropy,
                          steps=15, lr=1e-2, batch_size=8, seeds=[5, 6, 7])
    assert losses.shape == (15, 3)
    for m, (ref, (x, y), seed) in enumerate(zip(reference, data, (5, 6, 7))):
        history = fit(ref, x, y, loss_fn=sequence_cross_entropy, steps=15, lr=1e-2, batch_size=8, seed=seed)
        torch.testing.assert_close(losses[:, m].double(), torch.tensor(history.losses, dtype=torch.float64),
                                   atol=1e-6, rtol=1e-6)
    for m, ref in zip(models, reference):
        assert not m.training
        for a, b in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_fit_parallel_shared_data_and_bad_input():
    x = torch.randint(0, 5, (30, 6))
    y = torch.randint(0, 5, (30, 6))
    torch.manual_seed(0)
    models = [PositionalModel(5, 8, 2, "rope") for _ in range(2)]
    before = [p.clone() for p in models[0].parameters()]
    fit_parallel(models, x, y, loss_fn=sequence_cross_entropy, steps=3, batch_size=4)
    assert any(not torch.equal(a, b) for a, b in zip(models[0].parameters(), before))
    with pytest.raises(ValueError, match="same parameter names"):
        fit_parallel([PositionalModel(5, 8, 2, "rope"), PositionalModel(5, 8, 2, "learned")], x, y, steps=1)
    with pytest.raises(ValueError, match="one seed per model"):
        fit_parallel(models, x, y, steps=1, seeds=[0])
    with pytest.raises(TypeError, match="list of 2 tensors"):
        fit_parallel(models, [x], y, steps=1)
    with pytest.raises(ValueError, match="same number of examples"):
        fit_parallel(models, x, y[:10], steps=1)


@pytest.mark.parametrize("call, exc, word", [
    (lambda: sinusoidal_encoding(0, 4), ValueError, "length"),
    (lambda: sinusoidal_encoding(4, 4, base=-1), ValueError, "base"),
    (lambda: apply_rope(torch.zeros(3, 5)), ValueError, "even"),
    (lambda: apply_rope(torch.zeros(5)), ValueError, "at least 2"),
    (lambda: apply_rope(torch.zeros(3, 4), torch.arange(4)), ValueError, "positions of shape"),
    (lambda: apply_rope(torch.zeros(3, 4), [0, 1, 2]), TypeError, "positions must be a tensor"),
    (lambda: apply_rope(torch.zeros(3, 4, dtype=torch.long)), TypeError, "floating-point"),
    (lambda: alibi_slopes(0), ValueError, "num_heads"),
    (lambda: alibi_bias(2, 0), ValueError, "length"),
    (lambda: PositionalSelfAttention(8, 2, "fourier"), ValueError, "encoding must be one of"),
    (lambda: PositionalSelfAttention(6, 2, "rope"), ValueError, "even head width"),
    (lambda: RelativePositionEmbedding(0, 4), ValueError, "max_distance"),
])
def test_bad_input_names_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


@given(st.sampled_from([4, 8, 16, 64]), st.floats(1.0, 32.0), st.floats(100.0, 1e6))
def test_ntk_scaled_base_keeps_the_fastest_frequency_and_stretches_the_slowest(dim, scale, base):
    from attn_course.positional import rope_scaled_base

    new = rope_scaled_base(base, scale, dim)
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    old_f, new_f = base ** (-i / dim), new ** (-i / dim)
    assert new_f[0] == 1.0
    assert math.isclose(float(old_f[-1] / new_f[-1]), scale, rel_tol=1e-9)
    assert torch.all(new_f <= old_f * (1 + 1e-12))                        # every frequency slows, none speeds up


def test_rope_scale_and_base_are_position_interpolation_and_a_new_base():
    torch.manual_seed(0)
    layer = PositionalSelfAttention(8, 2, "rope")
    x = torch.randn(2, 10, 8)
    plain, _ = layer(x)
    layer.rope_scale, layer.rope_base = 2.5, 777.0
    got, _ = layer(x)
    # the same layer computed by hand: positions / 2.5, base 777
    q, k, v = (t.view(2, 10, 2, 4).transpose(1, 2) for t in layer.qkv(x).chunk(3, dim=-1))
    pos = torch.arange(10) / 2.5
    q, k = apply_rope(q, pos, 777.0), apply_rope(k, pos, 777.0)
    s = (q @ k.transpose(-2, -1) / 2).masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    ref = layer.out((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(2, 10, 8))
    assert torch.allclose(got, ref, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    layer.rope_scale, layer.rope_base = 1.0, 10000.0
    assert torch.equal(layer(x)[0], plain)


@pytest.mark.parametrize("encoding", ["rope", "none", "alibi", "relative"])
def test_a_window_hides_keys_that_far_back_and_changes_nothing_else(encoding):
    torch.manual_seed(0)
    layer = PositionalSelfAttention(8, 2, encoding)
    x = torch.randn(2, 10, 8)
    plain, plain_w = layer(x)
    layer.window = 3
    out, w = layer(x)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    assert torch.all(w[..., (i - j) >= 3] == 0) and torch.all(w[..., (i - j < 3) & (j <= i)] > 0)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 10))
    assert torch.allclose(out[:, :3], plain[:, :3], atol=1e-6)          # the first 3 queries lose nothing
    assert not torch.allclose(out[:, 3:], plain[:, 3:], atol=1e-4)
    # the same as renormalising the plain weights over the window
    ref = plain_w * ((i - j) < 3)
    assert torch.allclose(w, ref / ref.sum(-1, keepdim=True), atol=1e-6)
    layer.window = 0
    with pytest.raises(ValueError, match="window"):
        layer(x)
    layer.window = None
    assert torch.equal(layer(x)[0], plain)


@pytest.mark.parametrize("args, word", [((0.0, 2.0, 8), "base"), ((1e4, -1.0, 8), "scale"), ((1e4, 2.0, 3), "dim")])
def test_rope_scaled_base_bad_input_names_the_argument(args, word):
    from attn_course.positional import rope_scaled_base

    with pytest.raises(ValueError, match=word):
        rope_scaled_base(*args)
