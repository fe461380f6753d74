"""attn_course.seq2seq: self- and cross-attention, masks by perturbation, the encoder-decoder."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attn_course.data import reverse_task
from attn_course.multihead import MultiHeadAttention
from attn_course.seq2seq import CrossAttention, SelfAttention, Seq2Seq, causal_mask, padding_mask
from attn_course.train import fit_stream, sequence_cross_entropy


def test_self_attention_is_cross_attention_with_the_sequence_as_its_own_context():
    torch.manual_seed(0)
    self_attn, cross = SelfAttention(8, 2).double(), CrossAttention(8, 8, 2).double()
    cross.load_state_dict(self_attn.state_dict())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(self_attn(x)[0], cross(x, x)[0])
    ref = MultiHeadAttention(8, 2).double()
    ref.load_state_dict(self_attn.attention.state_dict())
    torch.testing.assert_close(self_attn(x, is_causal=True)[0], ref(x, x, x, is_causal=True)[0])


def test_cross_attention_shapes_with_a_different_context_size():
    cross = CrossAttention(8, 3, 2)
    out, w = cross(torch.randn(2, 4, 8), torch.randn(2, 7, 3))
    assert out.shape == (2, 4, 8) and w.shape == (2, 2, 4, 7)


def test_padding_mask_closed_form():
    m = padding_mask(torch.tensor([3, 1, 0]), 4)
    assert m.tolist() == [[True, True, True, False], [True, False, False, False], [False] * 4]
    assert padding_mask(torch.tensor([2, 5])).shape == (2, 5)
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 9), min_size=1, max_size=4))
def test_a_padded_position_never_changes_any_real_output(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = SelfAttention(8, 2).double()
    lengths = torch.tensor(lengths)
    keep = padding_mask(lengths, 9)
    x = torch.randn(len(lengths), 9, 8, generator=g, dtype=torch.float64)
    x2 = torch.where(keep[..., None], x, 100 * torch.randn(x.shape, generator=g, dtype=torch.float64))
    a, _ = layer(x, keep)
    b, _ = layer(x2, keep)
    torch.testing.assert_close(a[keep], b[keep])


def test_without_the_padding_mask_padding_leaks_into_real_outputs():
    torch.manual_seed(0)
    layer = SelfAttention(8).double()
    keep = padding_mask(torch.tensor([3]), 6)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 3:] += 5
    assert not torch.allclose(layer(x)[0][keep], layer(x2)[0][keep])


@given(st.integers(0, 2**31 - 1), st.integers(0, 7))
def test_a_causal_output_never_depends_on_later_inputs(seed, t):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = SelfAttention(8, 2).double()
    x = torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn(x2[:, t + 1:].shape, generator=g, dtype=torch.float64)
    a, _ = layer(x, is_causal=True)
    b, _ = layer(x2, is_causal=True)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])


def test_cross_attention_context_padding_is_ignored():
    torch.manual_seed(0)
    cross = CrossAttention(8, 4).double()
    x, ctx = torch.randn(1, 3, 8, dtype=torch.float64), torch.randn(1, 5, 4, dtype=torch.float64)
    keep = padding_mask(torch.tensor([2]), 5)
    ctx2 = ctx.clone()
    ctx2[0, 2:] = 99.0
    torch.testing.assert_close(cross(x, ctx, keep)[0], cross(x, ctx2, keep)[0])


@pytest.mark.parametrize("is_causal", [False, True])
def test_need_weights_false_matches_torch_multihead_attention_and_returns_no_weights(is_causal):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True).double()
    layer = SelfAttention(8, 2).double()
    layer.attention = MultiHeadAttention.from_torch(ref)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    keep = padding_mask(torch.tensor([6, 4, 2]), 6)
    blocked = torch.ones(6, 6, dtype=torch.bool).triu(1) if is_causal else None  # torch: True = blocked
    expected, _ = ref(x, x, x, key_padding_mask=~keep, attn_mask=blocked, need_weights=False)
    out, weights = layer(x, keep, is_causal=is_causal, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(layer(x, keep, is_causal=is_causal)[0], expected)
    cross = CrossAttention(8, 8, 2).double()
    cross.attention = MultiHeadAttention.from_torch(ref)
    y = torch.randn(3, 4, 8, dtype=torch.float64)
    out, weights = cross(y, x, keep, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, ref(y, x, x, key_padding_mask=~keep, need_weights=False)[0])


def test_the_attentive_decoder_equals_its_equations_written_step_by_step():
    # an independent reference: the GRU update and additive attention, one decoder step at a time
    torch.manual_seed(0)
    model = Seq2Seq(10, 16, 32).double().eval()
    src, dec_in, _ = reverse_task(3, 7, generator=torch.Generator().manual_seed(1))
    logits, weights = model(src, dec_in)
    enc = model.encode(src)[0]                                        # (B, S, H)
    gru, att = model.decoder, model.attention
    s = torch.cat([enc[:, -1, :16], enc[:, 0, 16:]], dim=-1)          # both directions' last states
    rows, alphas = [], []
    for t in range(dec_in.shape[1]):
        x = model.embed(dec_in[:, t])
        i_r, i_z, i_n = (x @ gru.weight_ih_l0.T + gru.bias_ih_l0).chunk(3, -1)
        h_r, h_z, h_n = (s @ gru.weight_hh_l0.T + gru.bias_hh_l0).chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        s = (1 - z) * torch.tanh(i_n + r * h_n) + z * s
        e = torch.tanh((s @ att.W_q.weight.T)[:, None] + enc @ att.W_k.weight.T) @ att.w_v.weight[0]
        alpha = torch.softmax(e, dim=-1)
        c = (alpha[:, :, None] * enc).sum(1)
        rows.append(torch.cat([s, c], -1) @ model.readout.weight.T + model.readout.bias)
        alphas.append(alpha)
    torch.testing.assert_close(logits, torch.stack(rows, 1))
    torch.testing.assert_close(weights, torch.stack(alphas, 1))


def test_reverse_task():
    src, dec_in, tgt = reverse_task(4, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tgt, src.flip(1)) and torch.all(dec_in[:, 0] == 10)
    assert torch.equal(dec_in[:, 1:], tgt[:, :-1])


@pytest.mark.parametrize("attention", [False, True, "uniform"])
def test_greedy_decoding_agrees_with_the_teacher_forced_pass(attention):
    torch.manual_seed(0)
    model = Seq2Seq(10, 16, 32, attention=attention).eval()
    src = torch.randint(0, 10, (3, 7))
    tokens, weights = model.greedy(src)
    dec_in = torch.cat([torch.full((3, 1), 10), tokens[:, :-1]], 1)
    logits, w = model(src, dec_in)
    assert torch.equal(logits.argmax(-1), tokens)
    if attention:
        torch.testing.assert_close(weights, w)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 7))
    else:
        assert weights is None and w is None


def test_the_uniform_baseline_reads_the_plain_mean_of_the_encoder_states_whatever_the_query():
    torch.manual_seed(0)
    model = Seq2Seq(10, 16, 32, attention="uniform").double().eval()
    src, dec_in, _ = reverse_task(3, 6, generator=torch.Generator().manual_seed(1))
    logits, w = model(src, dec_in)
    enc, summary = model.encode(src)
    dec, _ = model.decoder(model.embed(dec_in), summary)
    context = enc.mean(1, keepdim=True).expand_as(dec)                 # the same context at every step
    torch.testing.assert_close(logits, model.readout(torch.cat([dec, context], -1)))
    torch.testing.assert_close(w, torch.full((3, 6, 6), 1 / 6, dtype=torch.float64))
    assert model.attention is None and model.readout.in_features == 64


def test_the_attention_model_learns_to_reverse():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Seq2Seq(10, 16, 32)

    def batch(step):
        src, dec_in, tgt = reverse_task(32, 5, generator=g)
        return (src, dec_in), tgt

    fit_stream(model, batch, loss_fn=sequence_cross_entropy, steps=250, lr=5e-3)
    src, _, tgt = reverse_task(200, 5, generator=g)
    assert (model.greedy(src)[0] == tgt).float().mean() > 0.9


@pytest.mark.parametrize("call, exc, word", [
    (lambda: padding_mask(torch.tensor([1.0, 2.0])), TypeError, "lengths"),
    (lambda: padding_mask(torch.tensor([-1, 2])), ValueError, "lengths"),
    (lambda: padding_mask(torch.tensor([5]), 3), ValueError, "max_length"),
    (lambda: causal_mask(0), ValueError, "length"),
    (lambda: SelfAttention(8)(torch.zeros(1, 3, 8), torch.ones(1, 4, dtype=torch.bool)), ValueError, "key_padding"),
    (lambda: SelfAttention(8)(torch.zeros(1, 3, 8), torch.ones(1, 3)), TypeError, "key_padding"),
    (lambda: Seq2Seq(10, hidden_dim=33), ValueError, "hidden_dim"),
    (lambda: Seq2Seq(10, attention="mean"), ValueError, "attention"),
    (lambda: Seq2Seq(10)(torch.full((1, 3), 10), torch.zeros(1, 3, dtype=torch.long)), ValueError, "source"),
    (lambda: Seq2Seq(10).greedy(torch.zeros(1, 3)), TypeError, "source"),
])
def test_bad_input_names_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
