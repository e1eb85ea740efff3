"""The quantile forecasters (LSTM, GRU, TCN, transformer, TFT), their pinball loss and
their ONNX export (needs torch).

Every architecture maps a ``(batch, window, features)`` window to the 10%/50%/90% quantiles
of the log return over each horizon (1: the next candle) through the same linear head; only
the encoder differs.
"""

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional

from makeusrich.inference.model import QUANTILES

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "QuantileGRU",
    "QuantileLSTM",
    "QuantileModel",
    "QuantileTCN",
    "QuantileTFT",
    "QuantileTransformer",
    "build_model",
    "export_onnx",
    "pinball_loss",
]

INPUT_NAME = "features"
OUTPUT_NAME = "quantiles"
OPSET = 17

_TCN_KERNEL = 3
_TRANSFORMER_LAYERS = 2


class QuantileModel(nn.Module):
    """An encoder giving one ``hidden``-wide vector per window, then a linear head giving the
    10%/50%/90% quantiles of the log return over each horizon, horizon after horizon
    (``3 x len(target_scales)`` outputs).

    The head works in units of each horizon's ``target_scales`` (its training targets' std)
    so that its outputs start near 1 rather than near 1e-3; the scales are a buffer, so the
    exported graph outputs plain log returns.
    """

    head: nn.Linear
    scale: torch.Tensor

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.layers = layers

    def _attach_head(self, target_scales: Sequence[float],
                     initial_quantiles: Sequence[float]) -> None:
        # Called after the encoder is built: modules draw their initial weights from the
        # seeded RNG in creation order, so this keeps a seed's LSTM weights what they were.
        scales = [float(s) for s in target_scales for _ in QUANTILES]
        if len(initial_quantiles) != len(scales):
            raise ValueError("need the three initial quantiles of every horizon")
        self.head = nn.Linear(self.hidden, len(scales))
        self.register_buffer("scale", torch.tensor(scales))
        # Start from the unconditional quantiles so early epochs refine, not search.
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.copy_(
                torch.tensor([q / s for q, s in zip(initial_quantiles, scales, strict=True)]))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, window, features)`` -> ``(batch, hidden)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x)) * self.scale  # type: ignore[no-any-return]


class _Recurrent(QuantileModel):
    cell: ClassVar[type[nn.LSTM] | type[nn.GRU]]

    def __init__(
        self,
        n_features: int,
        hidden: int,
        layers: int,
        target_scales: Sequence[float],
        initial_quantiles: Sequence[float],
    ) -> None:
        super().__init__(hidden, layers)
        self.rnn = self.cell(n_features, hidden, num_layers=layers, batch_first=True)
        self._attach_head(target_scales, initial_quantiles)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(x)
        return output[:, -1, :]  # type: ignore[no-any-return]


class QuantileLSTM(_Recurrent):
    """Stacked LSTM; its last step's output feeds the head."""

    cell = nn.LSTM


class QuantileGRU(_Recurrent):
    """Stacked GRU; its last step's output feeds the head."""

    cell = nn.GRU


class _CausalBlock(nn.Module):
    """Two dilated causal convolutions with a residual connection (Bai et al., 2018)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        # Padded on both sides, then the last `trim` steps dropped: step t sees steps <= t.
        # (Left-only padding via F.pad exports with a constant-folding warning.)
        self.trim = (_TCN_KERNEL - 1) * dilation
        self.conv1 = nn.Conv1d(
            channels, channels, _TCN_KERNEL, dilation=dilation, padding=self.trim
        )
        self.conv2 = nn.Conv1d(
            channels, channels, _TCN_KERNEL, dilation=dilation, padding=self.trim
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x)[:, :, : -self.trim])
        y = self.conv2(y)[:, :, : -self.trim]
        return torch.relu(x + y)


def _tcn_blocks(window: int) -> int:
    """Fewest TCN blocks (dilations 1, 2, 4, ...) whose receptive field covers ``window``."""
    blocks = 1
    while 1 + 2 * (_TCN_KERNEL - 1) * (2**blocks - 1) < window:
        blocks += 1
    return blocks


class QuantileTCN(QuantileModel):
    """Temporal convolutional network: a 1x1 input projection, then ``layers`` residual
    blocks of dilated causal convolutions (dilation doubling per block); the last step's
    channels feed the head."""

    def __init__(
        self,
        n_features: int,
        hidden: int,
        layers: int,
        target_scales: Sequence[float],
        initial_quantiles: Sequence[float],
    ) -> None:
        super().__init__(hidden, layers)
        self.project = nn.Conv1d(n_features, hidden, 1)
        self.blocks = nn.Sequential(*(_CausalBlock(hidden, 2**i) for i in range(layers)))
        self._attach_head(target_scales, initial_quantiles)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.project(x.transpose(1, 2)))  # (batch, hidden, window)
        return h[:, :, -1]  # type: ignore[no-any-return]


class QuantileTransformer(QuantileModel):
    """Small transformer encoder: linear input projection plus a learned positional embedding,
    ``layers`` pre-norm transformer encoder layers over the whole window, and the last
    step's (layer-normalised) state feeding the head."""

    def __init__(
        self,
        n_features: int,
        hidden: int,
        layers: int,
        window: int,
        target_scales: Sequence[float],
        initial_quantiles: Sequence[float],
    ) -> None:
        super().__init__(hidden, layers)
        self.project = nn.Linear(n_features, hidden)
        self.position = nn.Parameter(0.02 * torch.randn(1, window, hidden))
        heads = next(h for h in (4, 2, 1) if hidden % h == 0)
        # A plain list of layers rather than nn.TransformerEncoder, whose nested-tensor
        # option warns for pre-norm layers; no dropout, like the recurrent models.
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden,
                heads,
                dim_feedforward=2 * hidden,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self._attach_head(target_scales, initial_quantiles)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project(x) + self.position
        for layer in self.encoder:
            h = layer(h)
        return self.norm(h[:, -1, :])  # type: ignore[no-any-return]


class _GateAddNorm(nn.Module):
    """``LayerNorm(skip + GLU(x))``: TFT's gated skip connection."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.glu = nn.Linear(d_in, 2 * d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        gated = functional.glu(self.glu(x), dim=-1)
        return self.norm(skip + gated)  # type: ignore[no-any-return]


class _GRN(nn.Module):
    """Gated residual network: ``LayerNorm(skip(a) + GLU(W1 ELU(W2 a)))``."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.skip = nn.Linear(d_in, d_out) if d_in != d_out else nn.Identity()
        self.fc2 = nn.Linear(d_in, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.gate = _GateAddNorm(hidden, d_out)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        eta = self.fc1(functional.elu(self.fc2(a)))
        return self.gate(eta, self.skip(a))  # type: ignore[no-any-return]


class _VariableSelection(nn.Module):
    """Embeds each feature by its own linear layer and GRN, and sums the embeddings with
    per-step softmax weights that a GRN computes from all of them."""

    def __init__(self, n_features: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(1, hidden) for _ in range(n_features))
        self.grns = nn.ModuleList(_GRN(hidden, hidden, hidden) for _ in range(n_features))
        self.weigh = _GRN(n_features * hidden, hidden, n_features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, window, features)`` -> the selected ``(batch, window, hidden)`` and the
        weights ``(batch, window, features)``."""
        embedded = [embed(x[..., j : j + 1]) for j, embed in enumerate(self.embed)]
        weights = torch.softmax(self.weigh(torch.cat(embedded, dim=-1)), dim=-1)
        processed = torch.stack([grn(e) for grn, e in zip(self.grns, embedded, strict=True)], -2)
        return (weights.unsqueeze(-1) * processed).sum(-2), weights


class _InterpretableAttention(nn.Module):
    """Self-attention whose heads have their own queries and keys but share one value
    projection, so averaging their weights gives one interpretable attention pattern."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        heads = next(h for h in (4, 2, 1) if hidden % h == 0)
        self.heads, self.scale = heads, (hidden // heads) ** -0.5
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden // heads)
        self.out = nn.Linear(hidden // heads, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q = self.query(h).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (b, heads, t, d)
        k = self.key(h).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) * self.scale  # (batch, heads, window, window)
        weights = torch.softmax(scores, dim=-1).mean(1)
        return self.out(weights @ self.value(h))  # type: ignore[no-any-return]


class QuantileTFT(QuantileModel):
    """Temporal Fusion Transformer-like encoder (Lim et al., 2021, "Temporal Fusion
    Transformers for interpretable multi-horizon time series forecasting", IJF 37(4)).

    Kept: gated residual networks, variable selection over the input features, an LSTM
    local encoder with a gated skip, ``layers`` interpretable multi-head self-attention
    layers each followed by a gated skip and a position-wise GRN, and a final gated skip
    back to the LSTM output; the last step's state feeds the quantile head. Left out:
    static covariates (and so static enrichment and the LSTM's static initial state) and
    known future inputs (we have neither), the decoder (one head gives every horizon) and
    dropout.
    """

    def __init__(
        self,
        n_features: int,
        hidden: int,
        layers: int,
        target_scales: Sequence[float],
        initial_quantiles: Sequence[float],
    ) -> None:
        super().__init__(hidden, layers)
        self.select = _VariableSelection(n_features, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.lstm_gate = _GateAddNorm(hidden, hidden)
        self.attention = nn.ModuleList(_InterpretableAttention(hidden) for _ in range(layers))
        self.gates = nn.ModuleList(_GateAddNorm(hidden, hidden) for _ in range(layers))
        self.grns = nn.ModuleList(_GRN(hidden, hidden, hidden) for _ in range(layers))
        self.output_gate = _GateAddNorm(hidden, hidden)
        self._attach_head(target_scales, initial_quantiles)

    def selection_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The variable selection weights, ``(batch, window, features)``; sum 1 per step."""
        return self.select(x)[1]  # type: ignore[no-any-return]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        selected, _ = self.select(x)
        local = self.lstm_gate(self.lstm(selected)[0], selected)
        h = local
        for attend, gate, grn in zip(self.attention, self.gates, self.grns, strict=True):
            h = grn(gate(attend(h), h))
        return self.output_gate(h[:, -1, :], local[:, -1, :])  # type: ignore[no-any-return]


def build_model(
    kind: str,
    *,
    n_features: int,
    window: int,
    hidden: int,
    layers: int | None,
    target_scales: Sequence[float],
    initial_quantiles: Sequence[float],
) -> QuantileModel:
    """A new model of architecture ``kind``; ``layers`` None picks the architecture's
    default: 1 recurrent layer, enough TCN blocks to see the whole window, 2 transformer
    layers, 1 TFT attention layer."""
    match kind:
        case "lstm":
            return QuantileLSTM(n_features, hidden, layers or 1, target_scales, initial_quantiles)
        case "gru":
            return QuantileGRU(n_features, hidden, layers or 1, target_scales, initial_quantiles)
        case "tcn":
            blocks = layers or _tcn_blocks(window)
            return QuantileTCN(n_features, hidden, blocks, target_scales, initial_quantiles)
        case "transformer":
            return QuantileTransformer(
                n_features,
                hidden,
                layers or _TRANSFORMER_LAYERS,
                window,
                target_scales,
                initial_quantiles,
            )
        case "tft":
            return QuantileTFT(n_features, hidden, layers or 1, target_scales, initial_quantiles)
    raise ValueError(f"unknown architecture {kind!r}")


def pinball_loss(predicted: torch.Tensor, target: torch.Tensor,
                 scales: torch.Tensor) -> torch.Tensor:
    """Mean pinball (quantile) loss of ``(batch, 3 x horizons)`` predictions against
    ``(batch, horizons)`` targets, each horizon's divided by its ``scales`` entry so that
    every horizon weighs alike (and Adam's steps are O(1))."""
    quantiles = torch.tensor(QUANTILES, dtype=predicted.dtype)
    error = (target.unsqueeze(2) - predicted.view(len(predicted), -1, len(QUANTILES)))
    loss = torch.maximum(quantiles * error, (quantiles - 1) * error) / scales[:, None]
    return loss.mean()


def export_onnx(model: nn.Module, path: Path, window: int, n_features: int) -> None:
    """Write ``model`` as ONNX with a dynamic batch axis: (batch, window, features) ->
    (batch, 3 x horizons)."""
    model.eval()
    example = torch.zeros(1, window, n_features)
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose: the dynamo one needs onnxscript,
        # which is not a dependency. Its RNN batch-size warning is about variable-length
        # sequences; windows have a fixed length and the trainer checks batches > 1.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")  # its logging
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean")
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            dynamo=False,
        )
