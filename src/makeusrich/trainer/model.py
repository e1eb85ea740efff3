"""The quantile forecasters (LSTM, GRU, TCN, transformer), their pinball loss and their
ONNX export (needs torch).

Every architecture maps a ``(batch, window, features)`` window to the 10%/50%/90% quantiles
of the next log return through the same linear head; only the encoder differs.
"""

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from makeusrich.inference.model import QUANTILES

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "QuantileGRU",
    "QuantileLSTM",
    "QuantileModel",
    "QuantileTCN",
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
    10%/50%/90% quantiles of the next log return.

    The head works in units of ``target_scale`` (the training targets' std) so that its
    outputs start near 1 rather than near 1e-3; the scale is a buffer, so the exported
    graph outputs plain log returns.
    """

    head: nn.Linear
    scale: torch.Tensor

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.layers = layers

    def _attach_head(self, target_scale: float, initial_quantiles: Sequence[float]) -> None:
        # Called after the encoder is built: modules draw their initial weights from the
        # seeded RNG in creation order, so this keeps a seed's LSTM weights what they were.
        self.head = nn.Linear(self.hidden, len(QUANTILES))
        self.register_buffer("scale", torch.tensor(float(target_scale)))
        # Start from the unconditional quantiles so early epochs refine, not search.
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.copy_(torch.tensor([q / target_scale for q in initial_quantiles]))

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
        target_scale: float,
        initial_quantiles: Sequence[float],
    ) -> None:
        super().__init__(hidden, layers)
        self.rnn = self.cell(n_features, hidden, num_layers=layers, batch_first=True)
        self._attach_head(target_scale, initial_quantiles)

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
        target_scale: float,
        initial_quantiles: Sequence[float],
    ) -> None:
        super().__init__(hidden, layers)
        self.project = nn.Conv1d(n_features, hidden, 1)
        self.blocks = nn.Sequential(*(_CausalBlock(hidden, 2**i) for i in range(layers)))
        self._attach_head(target_scale, initial_quantiles)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.project(x.transpose(1, 2)))  # (batch, hidden, window)
        return h[:, :, -1]  # type: ignore[no-any-return]


class QuantileTransformer(QuantileModel):
    """Small TFT-style encoder: linear input projection plus a learned positional embedding,
    ``layers`` pre-norm transformer encoder layers over the whole window, and the last
    step's (layer-normalised) state feeding the head."""

    def __init__(
        self,
        n_features: int,
        hidden: int,
        layers: int,
        window: int,
        target_scale: float,
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
        self._attach_head(target_scale, initial_quantiles)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project(x) + self.position
        for layer in self.encoder:
            h = layer(h)
        return self.norm(h[:, -1, :])  # type: ignore[no-any-return]


def build_model(
    kind: str,
    *,
    n_features: int,
    window: int,
    hidden: int,
    layers: int | None,
    target_scale: float,
    initial_quantiles: Sequence[float],
) -> QuantileModel:
    """A new model of architecture ``kind``; ``layers`` None picks the architecture's
    default: 1 recurrent layer, enough TCN blocks to see the whole window, 2 transformer
    layers."""
    match kind:
        case "lstm":
            return QuantileLSTM(n_features, hidden, layers or 1, target_scale, initial_quantiles)
        case "gru":
            return QuantileGRU(n_features, hidden, layers or 1, target_scale, initial_quantiles)
        case "tcn":
            blocks = layers or _tcn_blocks(window)
            return QuantileTCN(n_features, hidden, blocks, target_scale, initial_quantiles)
        case "transformer":
            return QuantileTransformer(
                n_features,
                hidden,
                layers or _TRANSFORMER_LAYERS,
                window,
                target_scale,
                initial_quantiles,
            )
    raise ValueError(f"unknown architecture {kind!r}")


def pinball_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pinball (quantile) loss of ``(batch, 3)`` predictions against ``(batch,)`` targets."""
    quantiles = torch.tensor(QUANTILES, dtype=predicted.dtype)
    error = target.unsqueeze(1) - predicted
    return torch.maximum(quantiles * error, (quantiles - 1) * error).mean()


def export_onnx(model: QuantileModel, path: Path, window: int, n_features: int) -> None:
    """Write ``model`` as ONNX with a dynamic batch axis: (batch, window, features) ->
    (batch, 3)."""
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
