"""Invariance detection on small copies of real model families this package did not design.

Each block is written after its reference implementation (timm's ConvNeXt ``LayerNorm2d``,
MobileNetV3's squeeze-excite with ``hardsigmoid``, a pre-LN ViT block, a post-LN BERT block, a
language model with tied embeddings, weight norm in both of PyTorch's APIs). Every detection, and
every rejection, is checked numerically by scaling the weights (``check_numerically``); the
callback-level tests check what a user of such a model sees.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.invariance import (
    EMBEDDING_REASON,
    NORM_AFFINE_REASON,
    find_scale_invariant_units,
)
from tests.invariance.checks import assert_complete, check_numerically, names, reasons


@pytest.fixture(autouse=True)
def _seed_and_threads() -> Iterator[None]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: its own forward goes NCHW to NHWC, normalises over C, and back."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.pw1 = nn.Conv2d(dim, 4 * dim, 1)
        self.pw2 = nn.Conv2d(4 * dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), 1e-1))  # layer scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * self.pw2(F.gelu(self.pw1(self.norm(self.dwconv(x)))))


class ConvNeXtTiny(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.stem_norm = LayerNorm2d(dim)
        self.block = ConvNeXtBlock(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.stem_norm(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))


class MobileBlock(nn.Module):
    """MobileNetV3-style: conv-BN-hardswish, squeeze-excite, projection conv-BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.se = SqueezeExcite(16)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.hardswish(self.bn(self.conv(x)))
        x = self.bn2(self.project(self.se(x)))
        return self.head(x.mean(dim=(2, 3)))


class PreLNBlock(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViTTiny(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 4, d) * 0.02)
        self.block = PreLNBlock(d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.block(x)).mean(dim=1))


class PostLNBlock(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class BertTiny(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(8, d)
        self.ln = nn.LayerNorm(d)
        self.block = PostLNBlock(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.ln(self.emb(ids) + self.pos(torch.arange(ids.shape[1])))
        return self.head(self.block(x))


class TiedLM(nn.Module):
    """The output projection shares the embedding table (GPT-2, T5 style)."""

    def __init__(self, vocab: int = 50, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d, bias=False)
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(self.ln(self.fc(self.emb(ids))))


class WeightNormNet(nn.Module):
    def __init__(self, new_api: bool) -> None:
        super().__init__()
        if new_api:
            self.fc1 = nn.utils.parametrizations.weight_norm(nn.Linear(8, 16))
        else:
            with warnings.catch_warnings():  # the old API is deprecated, still widely used
                warnings.simplefilter("ignore", FutureWarning)
                self.fc1 = nn.utils.weight_norm(nn.Linear(8, 16))
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def _detect(model: nn.Module, *inputs: Tensor):
    with torch.no_grad():  # zero-initialised biases (attention) would hide their effect
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.1)
    report = find_scale_invariant_units(model, *inputs)
    assert report.method == "trace"
    assert_complete(report, model)
    check_numerically(model, inputs, report)
    return report


def test_convnext_layernorm2d_makes_whole_tensor_units() -> None:
    model = ConvNeXtTiny()
    report = _detect(model, torch.randn(4, 3, 16, 16))
    units = {u.name: u for u in report.units}
    assert names(report) == {
        "stem.weight": ("stem.weight", "stem.bias"),
        "block.dwconv.weight": ("block.dwconv.weight", "block.dwconv.bias"),
    }
    # LayerNorm2d normalises over channels at each pixel: only the whole conv is invariant.
    assert not any(u.channel_invariant for u in units.values())
    why = reasons(report)
    assert "gelu" in why["block.pw1.weight"]
    assert "added to a tensor" in why["block.pw2.weight"] or "gamma" in why["block.pw2.weight"]
    assert why["stem_norm.weight"] == NORM_AFFINE_REASON


def test_squeeze_excite_gate_is_not_invariant_but_the_convs_around_it_are() -> None:
    report = _detect(MobileBlock(), torch.randn(4, 3, 8, 8))
    assert names(report) == {"conv.weight": ("conv.weight",), "project.weight": ("project.weight",)}
    assert all(u.channel_invariant for u in report.units)  # BatchNorm: per channel
    why = reasons(report)
    assert "hardsigmoid" in why["se.fc2.weight"]
    assert "bias" in why["se.fc1.weight"]


@pytest.mark.parametrize("model_cls", [ViTTiny, BertTiny], ids=["pre_ln_vit", "post_ln_bert"])
def test_transformer_blocks_have_no_scale_invariant_weight(model_cls: type[nn.Module]) -> None:
    model = model_cls()
    inputs = (torch.randn(4, 3, 8, 8) if model_cls is ViTTiny else torch.randint(0, 50, (4, 8)),)
    report = _detect(model, *inputs)
    # Attention (softmax of products), GELU and the residual stream all break invariance: a
    # "LayerNorm somewhere after it" is not enough, and nothing may be reported.
    assert report.units == ()
    why = reasons(report)
    assert "multi_head_attention_forward" in why["block.attn.in_proj_weight"]
    assert "gelu" in why["block.fc1.weight"]
    assert "added to a tensor" in why["block.fc2.weight"]
    if model_cls is BertTiny:
        assert why["emb.weight"] == EMBEDDING_REASON


def test_tied_embedding_and_output_projection() -> None:
    model = TiedLM()
    report = _detect(model, torch.randint(0, 50, (4, 8)))
    assert names(report) == {"fc.weight": ("fc.weight",)}
    assert not report.units[0].channel_invariant  # LayerNorm over features
    # The shared table is one parameter (named once), rejected as an embedding; scaling it
    # changes the logits through the output projection (checked numerically above).
    assert reasons(report)["emb.weight"] == EMBEDDING_REASON
    assert "out.weight" not in reasons(report)


@pytest.mark.parametrize("new_api", [True, False], ids=["parametrizations", "legacy_hook"])
def test_weight_norm_direction_is_invariant_and_its_magnitude_is_not(new_api: bool) -> None:
    model = WeightNormNet(new_api)
    report = _detect(model, torch.randn(6, 8))
    direction = "fc1.parametrizations.weight.original1" if new_api else "fc1.weight_v"
    magnitude = "fc1.parametrizations.weight.original0" if new_api else "fc1.weight_g"
    assert names(report) == {direction: (direction,)}
    assert report.units[0].channel_invariant  # weight norm normalises each output row
    why = reasons(report)
    assert magnitude in why and "fc1.bias" in why


# --------------------------------------------------------------------------------------------
# What a user of these models sees in training


def _images(n: int = 64) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=16)


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)


def _fit(tmp_path, callback: SphericalDynamicsCallback, net: nn.Module) -> list[str]:
    trainer = pl.Trainer(
        max_epochs=4,
        callbacks=[callback],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(net), _images())
    assert trainer.global_step == 16  # the monitor never stops training
    return [str(w.message) for w in caught if "SphericalDynamicsCallback" in str(w.message)]


def test_vit_user_gets_one_clear_warning_and_no_made_up_units(tmp_path) -> None:
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    messages = _fit(tmp_path, callback, ViTTiny())
    found_none = [m for m in messages if "found no scale-invariant" in m]
    assert len(found_none) == 1
    # The warning says why (counted by reason) and how to monitor weights anyway.
    assert "attention" in found_none[0] or "multi_head_attention" in found_none[0]
    assert "params=" in found_none[0]
    assert callback.history == []


def test_vit_weights_named_explicitly_are_measured_and_marked_violated(tmp_path) -> None:
    net = ViTTiny()
    callback = SphericalDynamicsCallback(
        params=["net.block.fc1.weight", "net.block.attn.in_proj_weight"], every_n_steps=4, window=2
    )
    messages = _fit(tmp_path, callback, net)
    assert any("not orthogonal" in m for m in messages)
    status = {record.unit: record.invariance for record in callback.history}
    assert status == {
        "net.block.fc1.weight": "violated",
        "net.block.attn.in_proj_weight": "violated",
    }
    assert all(record.angular_update > 0 for record in callback.history)


def test_convnext_units_are_measured_under_adamw(tmp_path) -> None:
    class Small(ConvNeXtTiny):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 2, stride=2)

    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    messages = _fit(tmp_path, callback, Small())
    assert not any("found no scale-invariant" in m for m in messages)
    units = {record.unit for record in callback.history}
    assert units == {"net.stem.weight", "net.block.dwconv.weight"}
    assert {record.invariance for record in callback.history} == {"verified"}
    assert all(record.theory is not None and record.theory > 0 for record in callback.history)
