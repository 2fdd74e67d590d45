"""A small Qwen3-style decoder trained with Muon + AdamW as a byte-level LM, with the SDM callback.

The model is written as today's open LLMs are (Qwen3, after HF ``transformers``): RMSNorm by hand
(``h * rsqrt(mean(h^2) + eps)`` in float32, times a gain), per-head QK-norm (an RMSNorm over
``head_dim`` on each head's queries and keys, before RoPE), a SwiGLU MLP, causal attention through
``F.scaled_dot_product_attention``, pre-norm residual blocks and an untied head. It learns the
bytes of the Python standard library's own source files (on every machine: nothing is
downloaded), chosen deterministically (the ``*.py`` files at the top of
``sysconfig.get_paths()["stdlib"]`` in sorted order, the last 10% held out).

Optimizers as in today's recipes: ``torch.optim.Muon`` on the hidden 2-D matrices (attention and
MLP projections), ``AdamW`` on the rest (embedding, the norms' gains, the head), each with its own
warm-up + cosine schedule stepped per batch. Lightning's automatic optimization takes one
optimizer, so the module steps both itself (``automatic_optimization = False``); the callback
follows both optimizers' steps and counts each optimizer's own steps.

The QK-norm makes each head's rows of ``q_proj`` and ``k_proj`` scale-invariant on their own: the
callback finds them (one unit per projection, ``head_dim`` rows per block), measures one angle per
head (``granularity="channel"``), predicts the equilibrium where theory has a formula for the
unit's optimizer, and detects equilibrium.

    python examples/llm_qknorm.py                 # ~0.9M parameters, 400 steps: a few CPU minutes
    python examples/llm_qknorm.py --fast          # seconds (what the tests run)
    python examples/llm_qknorm.py --steps 1000 --log-dir runs   # then: lightning-sdm report runs
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_sdm import SphericalDynamicsCallback

VOCAB = 256  # bytes


# ------------------------------------------------------------------ data


def stdlib_corpus(max_bytes: int) -> tuple[bytes, list[str]]:
    """The first ``max_bytes`` bytes of the standard library's top-level ``*.py`` files.

    Sorted by name, so the same Python gives the same text; the files used are returned too.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, used, size = [], [], 0
    for path in sorted(root.glob("*.py")):
        if size >= max_bytes:
            break
        text = path.read_bytes()
        chunks.append(text)
        used.append(path.name)
        size += len(text)
    if not chunks:
        raise SystemExit(f"no *.py files under the standard library directory {root}")
    return b"".join(chunks)[:max_bytes], used


class ByteWindows(Dataset):
    """``count`` windows of ``length + 1`` bytes at offsets drawn once from ``seed``."""

    def __init__(self, data: Tensor, length: int, count: int, seed: int) -> None:
        self.data, self.length = data, length
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(data) - length - 1, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Tensor:
        start = int(self.offsets[index])
        return self.data[start : start + self.length + 1].long()


# ------------------------------------------------------------------ model


class RMSNorm(nn.Module):
    """transformers' Qwen3RMSNorm (= LlamaRMSNorm): computed in float32, times a gain."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rope(x: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding of ``x`` ``[batch, heads, seq, head_dim]`` (half-split, as HF)."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.dtype)


@dataclass(frozen=True)
class Config:
    """The decoder's shape."""

    hidden: int = 128
    heads: int = 4
    layers: int = 4
    ffn: int = 352  # SwiGLU: ~8/3 of hidden, as Llama
    seq_len: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class Attention(nn.Module):
    """Qwen3 attention: projections, per-head RMSNorm on q and k, RoPE, causal SDPA."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        width = config.heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden, width, bias=False)
        self.k_proj = nn.Linear(config.hidden, width, bias=False)
        self.v_proj = nn.Linear(config.hidden, width, bias=False)
        self.o_proj = nn.Linear(width, config.hidden, bias=False)
        self.q_norm, self.k_norm = RMSNorm(config.head_dim), RMSNorm(config.head_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        shape = (b, s, self.heads, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(shape)).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.ffn, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.ffn, bias=False)
        self.down_proj = nn.Linear(config.ffn, config.hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden)
        self.mlp = MLP(config)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Embedding, ``layers`` blocks, final norm, untied head."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, config.hidden)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, VOCAB, bias=False)
        for module in self.modules():  # GPT-2/Llama initialisation: N(0, 0.02)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


# ------------------------------------------------------------------ training


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's, AdamW's): the 2-D matrices of the blocks; the embedding, gains and head."""
    hidden: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        (hidden if param.ndim == 2 and name.startswith("layers.") else rest).append(param)
    return hidden, rest


class ByteLM(pl.LightningModule):
    """The decoder as a LightningModule with two optimizers, stepped by hand."""

    def __init__(
        self,
        config: Config,
        total_steps: int,
        hidden_optimizer: str = "muon",
        hidden_lr: float = 0.02,
        hidden_weight_decay: float = 0.5,
        muon_adjust_lr: str = "original",
        adamw_lr: float = 3e-3,
        adamw_weight_decay: float = 0.1,
        warmup: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["config"])
        self.config = config
        self.model = Decoder(config)
        # Two optimizers stepping at every batch: Lightning's automatic optimization takes one.
        self.automatic_optimization = False

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def loss(self, batch: Tensor) -> Tensor:
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        loss = self.loss(batch)
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for scheduler in self.lr_schedulers():
            scheduler.step()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        hidden, rest = split_parameters(self.model)
        # AdamW's weight decay on the embedding and head only: not on the norms' gains.
        decayed = [p for p in rest if p.ndim == 2]
        gains = [p for p in rest if p.ndim != 2]
        if hp.hidden_optimizer == "muon":
            muon = torch.optim.Muon(
                hidden,
                lr=hp.hidden_lr,
                weight_decay=hp.hidden_weight_decay,
                adjust_lr_fn=hp.muon_adjust_lr,
            )
        else:  # the baseline: AdamW on the hidden matrices too, with their own lr and decay
            muon = torch.optim.AdamW(
                hidden, lr=hp.hidden_lr, weight_decay=hp.hidden_weight_decay, betas=(0.9, 0.95)
            )
        adamw = torch.optim.AdamW(
            [
                {"params": decayed, "weight_decay": hp.adamw_weight_decay},
                {"params": gains, "weight_decay": 0.0},
            ],
            lr=hp.adamw_lr,
            betas=(0.9, 0.95),
        )

        def schedule(step: int) -> float:
            return warmup_cosine(step, hp.warmup, hp.total_steps)

        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in (muon, adamw)]
        return [muon, adamw], [{"scheduler": s, "interval": "step"} for s in schedulers]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a tiny model for a few steps")
    parser.add_argument("--steps", type=int, default=400, help="batches (each optimizer's steps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000)
    parser.add_argument(
        "--hidden-optimizer",
        choices=["muon", "adamw"],
        default="muon",
        help="for the blocks' 2-D matrices (the rest always gets AdamW)",
    )
    parser.add_argument("--hidden-lr", type=float, default=0.02)
    # lr * wd sets the relaxation time of the weight norms, 1 / (2 lr wd) steps: 20 at the peak
    # LR here, so that a run of a few hundred steps settles before the cosine takes the LR down
    # faster than the weights can follow. Long runs use 10-100x smaller products.
    parser.add_argument("--hidden-weight-decay", type=float, default=1.25)
    parser.add_argument(
        "--muon-adjust-lr", choices=["original", "match_rms_adamw"], default="original"
    )
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--adamw-weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--every-n-steps", type=int, default=10, help="in each optimizer's steps")
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.fast:
        args.steps, args.batch_size, args.seq_len = 12, 4, 32
        args.hidden, args.heads, args.layers, args.corpus_bytes = 32, 2, 1, 50_000
        args.warmup, args.every_n_steps = 2, 2
    return args


def train(args: argparse.Namespace) -> tuple[SphericalDynamicsCallback, dict[str, Any]]:
    """One run with the callback; returns it, with the run's figures (losses, time, steps)."""
    pl.seed_everything(args.seed, verbose=False)
    corpus, files = stdlib_corpus(args.corpus_bytes)
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
    split = int(0.9 * len(data))
    print(
        f"Corpus: {len(data):,} bytes of {len(files)} standard-library files "
        f"({files[0]} .. {files[-1]}); {split:,} for training, {len(data) - split:,} held out"
    )
    train_set = ByteWindows(data[:split], args.seq_len, args.steps * args.batch_size, args.seed)
    held_out = ByteWindows(data[split:], args.seq_len, 4 * args.batch_size, args.seed + 1)
    config = Config(
        hidden=args.hidden,
        heads=args.heads,
        layers=args.layers,
        ffn=64 * math.ceil(8 * args.hidden / 3 / 64),
        seq_len=args.seq_len,
    )
    model = ByteLM(
        config,
        total_steps=args.steps,
        hidden_optimizer=args.hidden_optimizer,
        hidden_lr=args.hidden_lr,
        hidden_weight_decay=args.hidden_weight_decay,
        muon_adjust_lr=args.muon_adjust_lr,
        adamw_lr=args.adamw_lr,
        adamw_weight_decay=args.adamw_weight_decay,
        warmup=args.warmup,
    )
    parameters = sum(p.numel() for p in model.parameters())
    print(f"Decoder: {parameters:,} parameters, {config}")
    callback = SphericalDynamicsCallback(
        granularity="channel", every_n_steps=args.every_n_steps, window=args.window
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=CSVLogger(args.log_dir, name="llm_qknorm"),
        callbacks=[callback],
        # Lightning's global step counts both optimizers' steps: 2 per batch.
        log_every_n_steps=2 * args.every_n_steps,
        val_check_interval=args.steps,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(
        model,
        DataLoader(train_set, batch_size=args.batch_size),
        DataLoader(held_out, batch_size=args.batch_size),
    )
    figures = {
        "seconds": time.perf_counter() - start,
        "val_loss": float(trainer.callback_metrics.get("val/loss", math.nan)),
        "train_loss": float(trainer.callback_metrics.get("train/loss", math.nan)),
        "batches": args.steps,
        "global_step": trainer.global_step,
        "parameters": parameters,
        "corpus_files": len(files),
        "corpus_bytes": len(data),
    }
    return callback, figures


def main(argv: list[str] | None = None) -> tuple[SphericalDynamicsCallback, dict[str, Any]]:
    """Train; print what the callback found, predicted and detected."""
    callback, figures = train(parse_args(argv))
    print_summary(callback, figures)
    return callback, figures


def print_summary(callback: SphericalDynamicsCallback, figures: dict[str, Any]) -> None:
    """The units, their predictions, the last window of each, the detector's regime, the cost."""
    print(
        f"\nTrained in {figures['seconds']:.0f} s: {figures['batches']} batches, Lightning's "
        f"global step {figures['global_step']} (both optimizers' steps); loss "
        f"{figures['train_loss']:.3f} (train), {figures['val_loss']:.3f} nats/byte (held out)"
    )
    monitor = callback.monitor
    if monitor is not None:
        counted = monitor.state_dict()["steps_done"]
        print(f"Optimizer steps counted by the monitor (optimizers holding units): {counted}")
    if callback.report is not None:
        print(callback.report.summary().splitlines()[0])
    if monitor is None or not callback.history:
        print("No window closed: nothing measured.")
        return
    predictions = monitor.predictions()
    print("\nUnits (per-head blocks of rows), their optimizer and what theory predicts:")
    for unit in monitor.unit_specs:
        prediction = predictions[unit.name]
        said = (
            f"{prediction.angular_update:.5f} rad/step ({prediction.rule})"
            if prediction.angular_update is not None
            else f"no prediction ({prediction.reason})"
        )
        print(
            f"  {unit.name:<40} {unit.channel_group:>3} rows/head  {prediction.optimizer}: {said}"
        )
    last = {record.unit: record for record in callback.history}
    print(
        f"\nLast window, per head: {'median':>9} {'min':>9} {'max':>9} {'theory':>9} "
        f"{'|w|':>7}  regime"
    )
    for name, record in last.items():
        heads = record.channels or {}
        state = callback.detector.state[name]
        since = f" since step {state.reached_global_step}" if state.in_equilibrium else ""
        print(
            f"{name:<40} {heads.get('median', record.angular_update):>9.5f} "
            f"{heads.get('min', math.nan):>9.5f} {heads.get('max', math.nan):>9.5f} "
            f"{record.theory or math.nan:>9.5f} {record.weight_norm:>7.3f}  "
            f"{record.regime.replace('_', ' ')}{since}"
        )
    steady = monitor.cost.steady
    if steady is not None:
        fraction, per_measured, per_step = steady
        print(
            f"\nMonitor cost, measured in this run: {100 * fraction:.2f}% of the step time "
            f"({1e3 * per_measured:.2f} ms per measured step, {1e3 * per_step:.1f} ms per step)"
        )


if __name__ == "__main__":
    main()
