"""Invariance detection on small copies of today's decoder blocks, written after HF transformers.

Llama, Qwen3, OLMo2 and Gemma write their RMSNorm by hand (``h * rsqrt(mean(h^2) + eps)``, in
float32, times a weight); Qwen3 normalises each head's q and k (QK-norm over ``head_dim``), OLMo2
the whole q and k projections and the outputs of attention and MLP (post-norms); GPT-2's
``Conv1D`` is ``addmm``. Every unit found, and every weight rejected, is checked by scaling it in
float64: a unit leaves the output unchanged to 1e-7 (the eps of the norms, 1e-6 here, is what is
left), a rejected weight changes it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sdm.invariance import ScaleInvarianceTracer, find_scale_invariant_units
from tests.invariance.checks import assert_complete, names, reasons

HIDDEN, HEADS, HEAD_DIM, FFN, VOCAB = 32, 4, 8, 48, 50


class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm (Qwen3 and OLMo2 use the same code)."""

    #: float32 as in transformers; the float64 checks raise it (and lower the eps).
    compute_dtype = torch.float32

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(self.compute_dtype)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """transformers' GemmaRMSNorm: the weight is an offset from 1, applied in float32."""

    compute_dtype = torch.float32

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(size))

    def _norm(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        output = self._norm(x.to(self.compute_dtype))
        return (output * (1.0 + self.weight.to(self.compute_dtype))).type_as(x)


class Attention(nn.Module):
    """Llama-style attention with the three QK-norm placements of today's models."""

    def __init__(self, qk_norm: str, norm: type[nn.Module] = LlamaRMSNorm) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.qk_norm = qk_norm
        if qk_norm == "head":  # Qwen3
            self.q_norm, self.k_norm = norm(HEAD_DIM), norm(HEAD_DIM)
        elif qk_norm == "projection":  # OLMo2
            self.q_norm, self.k_norm = norm(HEADS * HEAD_DIM), norm(HEADS * HEAD_DIM)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, s, HEADS, HEAD_DIM) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))


class MLP(nn.Module):
    """SwiGLU."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Decoder(nn.Module):
    """Embedding, two blocks, final norm, untied head: ``style`` picks the family."""

    def __init__(self, style: str) -> None:
        super().__init__()
        norm = GemmaRMSNorm if style == "gemma" else LlamaRMSNorm
        qk = {"llama": "none", "gemma": "none", "qwen3": "head", "olmo2": "projection"}[style]
        self.style = style
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList()
        for _ in range(2):
            layer = nn.Module()
            layer.self_attn, layer.mlp = Attention(qk, norm), MLP()
            layer.input_norm, layer.post_attn_norm = norm(HIDDEN), norm(HIDDEN)
            self.layers.append(layer)
        self.norm = norm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            if self.style == "olmo2":  # post-norms: the outputs are normalised before the sum
                h = h + layer.input_norm(layer.self_attn(h))
                h = h + layer.post_attn_norm(layer.mlp(h))
            else:  # pre-norms
                h = h + layer.self_attn(layer.input_norm(h))
                h = h + layer.mlp(layer.post_attn_norm(h))
        return self.lm_head(self.norm(h))


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a linear layer with a transposed weight, through ``addmm``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Conv1DBlock(nn.Module):
    """Conv1D in front of LayerNorm (invariant) and in front of GELU (not)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_proj = Conv1D(HIDDEN, HIDDEN)
        self.ln = nn.LayerNorm(HIDDEN)
        self.c_fc = Conv1D(FFN, HIDDEN)
        self.head = nn.Linear(FFN, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.gelu(self.c_fc(self.ln(self.c_proj(x)))))


def _float64_output(model: nn.Module, inputs: tuple, scale: dict[str, Tensor | float]) -> Tensor:
    """The output in float64 throughout, with the norms' eps at 1e-12: what is left of a
    unit's scaling is rounding, not the eps the invariance convention ignores."""
    scaled = copy.deepcopy(model).double().train()
    for module in scaled.modules():
        if isinstance(module, (LlamaRMSNorm, GemmaRMSNorm)):
            module.compute_dtype = torch.float64
        for attribute in ("eps", "variance_epsilon"):
            if isinstance(getattr(module, attribute, None), float):
                setattr(module, attribute, 1e-12)
    params = dict(scaled.named_parameters())
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        for name, factor in scale.items():
            params[name].mul_(factor)
        return scaled(*inputs).double()


def _relative_change(model: nn.Module, inputs: tuple, scale: dict[str, Tensor | float]) -> float:
    reference = _float64_output(model, inputs, {})
    moved = _float64_output(model, inputs, scale)
    return float((moved - reference).abs().max() / reference.abs().max())


def _check_by_scaling(model: nn.Module, inputs: tuple, report) -> None:
    with torch.no_grad():  # norm weights start at 1 (or 0 for Gemma): give them a shape
        for name, param in model.named_parameters():
            if "norm" in name or name.startswith("ln."):
                param.uniform_(0.5, 1.5)
    params = dict(model.named_parameters())
    for unit in report.units:
        assert _relative_change(model, inputs, dict.fromkeys(unit.params, 3.7)) < 1e-7, unit
        # One block of channels alone (a channel, or a head's channel_group): invariant only
        # where the unit says so; a block finer than its group is not.
        group = unit.channel_group
        block = _relative_change(model, inputs, _block(params, unit, range(group, 2 * group)))
        assert (block < 1e-7) == unit.channel_invariant, (unit, block)
        if group > 1:
            assert _relative_change(model, inputs, _block(params, unit, [group])) > 1e-4, unit
    for item in report.rejected:
        if "unused" in item.reason or "bias of" in item.reason:
            continue
        assert _relative_change(model, inputs, {item.name: 3.7}) > 1e-4, item


def _block(params: dict[str, Tensor], unit, channels) -> dict[str, Tensor]:
    """Factors that scale the given output channels of a unit (weight and bias) by 3.7."""
    factors = {}
    for i, name in enumerate(unit.params):
        dim = unit.channel_dim if i == 0 else 0
        shape = [1] * params[name].dim()
        shape[dim] = params[name].shape[dim]
        factor = torch.ones(shape)
        factor.view(-1)[list(channels)] = 3.7
        factors[name] = factor
    return factors


def _tokens() -> Tensor:
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def _found(style: str) -> tuple[Decoder, dict[str, tuple[str, ...]], dict[str, str]]:
    torch.manual_seed(0)
    model = Decoder(style)
    report = find_scale_invariant_units(model, _tokens())
    assert not report.failed, report.notes
    assert_complete(report, model)
    _check_by_scaling(model, (_tokens(),), report)
    return model, names(report), reasons(report)


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_pre_norm_decoders_have_no_invariant_weight(style: str) -> None:
    # The hand-written RMSNorm normalises the residual stream, but every projection's output is
    # added to it (or goes through the softmax) before any norm: nothing is invariant.
    _, found, why = _found(style)
    assert found == {}
    assert "residual" in why["layers.0.mlp.down_proj.weight"]
    assert "softmax" in why["layers.0.self_attn.q_proj.weight"]


def test_qwen3_qk_norm_per_head_makes_q_and_k_projections_invariant() -> None:
    model, found, why = _found("qwen3")
    assert set(found) == {
        f"layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("q", "k")
    }
    # Each head's rows on their own: invariant blocks of head_dim channels.
    report = find_scale_invariant_units(model, _tokens())
    assert {(u.channel_invariant, u.channel_group) for u in report.units} == {(True, HEAD_DIM)}
    # v goes through attention (linear in v) and o_proj into the residual stream, un-normed.
    assert "residual" in why["layers.0.self_attn.v_proj.weight"]
    assert "residual" in why["layers.0.self_attn.o_proj.weight"]


def test_olmo2_qk_norm_and_post_norms() -> None:
    _, found, why = _found("olmo2")
    invariant = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert set(found) == {
        f"layers.{i}.{part}.{p}.weight"
        for i in range(2)
        for part, projections in (("self_attn", invariant), ("mlp", invariant))
        for p in projections
        if (part == "self_attn") == (p in {"q_proj", "k_proj", "v_proj", "o_proj"})
    }
    # SiLU is not positively homogeneous: the gate is not invariant.
    assert "not positively homogeneous" in why["layers.0.mlp.gate_proj.weight"]


def test_gpt2_conv1d_before_layernorm_is_a_unit_with_its_bias() -> None:
    torch.manual_seed(0)
    model = Conv1DBlock()
    x = torch.randn(4, 5, HIDDEN)
    report = find_scale_invariant_units(model, x)
    assert_complete(report, model)
    assert names(report) == {"c_proj.weight": ("c_proj.weight", "c_proj.bias")}
    unit = report.units[0]
    assert unit.channel_dim == 1  # Conv1D's weight is [in, out]
    _check_by_scaling(model, (x,), report)
    assert "c_fc.weight" in reasons(report)


def test_an_eps_outside_a_norm_is_still_a_shift() -> None:
    """The eps is ignored inside a norm's root only: elsewhere a constant breaks invariance."""

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.b = nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.norm = LlamaRMSNorm(HIDDEN)

        def forward(self, x: Tensor) -> Tensor:
            # a: (a(x) + 1e-6) then RMSNorm: not invariant (RMS has no mean to remove it);
            # b: b(x)^2 + eps, squared again: not a root.
            shifted = self.norm(self.a(x) + 1e-6)
            squared = (self.b(x).pow(2) + 1e-6).pow(2)
            return shifted + squared / squared.sum(-1, keepdim=True)

    torch.manual_seed(0)
    model = Shifted()
    report = find_scale_invariant_units(model, torch.randn(3, HIDDEN))
    assert names(report) == {}
    assert "shifted by a constant" in reasons(report)["a.weight"]
    assert "shifted by a constant" in reasons(report)["b.weight"]


@pytest.mark.parametrize(
    "shape",
    [
        lambda h: h * torch.rsqrt(h * h + 1e-6),  # elementwise: no mean, not a norm
        lambda h: h / (h.abs() + 1e-6),  # a sign with an eps: not a norm either
        lambda h: torch.sqrt(F.relu(h) + 1e-6),  # an eps under a root, but not of a reduction
    ],
    ids=["elementwise_rsqrt", "abs_ratio", "sqrt_relu"],
)
def test_an_eps_is_a_norm_eps_only_under_a_reduction(shape) -> None:
    """Found by review: these are not invariant (a 3.7x scale moves the output by ~3%)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 16, bias=False)
            self.bn = nn.BatchNorm1d(16)
            self.out = nn.Linear(16, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.bn(shape(self.lin(x))))

    torch.manual_seed(0)
    model = Net()
    report = find_scale_invariant_units(model, torch.randn(5, 8))
    assert "lin.weight" not in names(report)
    assert "shifted by a constant" in reasons(report)["lin.weight"]


@pytest.mark.parametrize("style", ["llama", "gemma", "qwen3", "olmo2"])
def test_a_training_step_trace_finds_the_same_units(style: str) -> None:
    """The callback traces a training step: gradients on, the graph kept for the backward.

    Autograd then keeps the views of each q/k projection alive (RMSNorm saves its input), and
    HF's ``h.to(torch.float32)`` of a float32 ``h`` returns ``h`` itself: that is no in-place
    change of the projection's output (it was read as one, and every QK-norm unit was lost in
    the callback while ``find_scale_invariant_units``, under ``no_grad``, found them).
    """
    torch.manual_seed(0)
    model = Decoder(style)
    tokens = _tokens()
    expected = find_scale_invariant_units(model, tokens)
    with ScaleInvarianceTracer(model) as tracer:
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    report = tracer.report()
    loss.backward()  # the graph the trace saw was a real one
    assert names(report) == names(expected)
    groups = {u.name: (u.channel_invariant, u.channel_group) for u in report.units}
    assert groups == {u.name: (u.channel_invariant, u.channel_group) for u in expected.units}
    if style == "qwen3":
        assert len(groups) == 4 and set(groups.values()) == {(True, HEAD_DIM)}
