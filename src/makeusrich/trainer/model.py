"""The LSTM quantile forecaster, its pinball loss and its ONNX export (needs torch)."""

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from makeusrich.inference.model import QUANTILES

INPUT_NAME = "features"
OUTPUT_NAME = "quantiles"
OPSET = 17


class QuantileLSTM(nn.Module):
    """LSTM over a feature window, then a linear head giving the 10%/50%/90% quantiles of
    the next log return.

    The head works in units of ``target_scale`` (the training targets' std) so that its
    outputs start near 1 rather than near 1e-3; the scale is a buffer, so the exported
    graph outputs plain log returns.
    """

    def __init__(
        self,
        n_features: int,
        hidden: int,
        layers: int,
        target_scale: float,
        initial_quantiles: Sequence[float],
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.layers = layers
        self.lstm = nn.LSTM(n_features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, len(QUANTILES))
        self.register_buffer("scale", torch.tensor(float(target_scale)))
        # Start from the unconditional quantiles so early epochs refine, not search.
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.copy_(torch.tensor([q / target_scale for q in initial_quantiles]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(x)
        return self.head(output[:, -1, :]) * self.scale  # type: ignore[no-any-return]


def pinball_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pinball (quantile) loss of ``(batch, 3)`` predictions against ``(batch,)`` targets."""
    quantiles = torch.tensor(QUANTILES, dtype=predicted.dtype)
    error = target.unsqueeze(1) - predicted
    return torch.maximum(quantiles * error, (quantiles - 1) * error).mean()


def export_onnx(model: QuantileLSTM, path: Path, window: int, n_features: int) -> None:
    """Write ``model`` as ONNX with a dynamic batch axis: (batch, window, features) ->
    (batch, 3)."""
    model.eval()
    example = torch.zeros(1, window, n_features)
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose: the dynamo one needs onnxscript,
        # which is not a dependency. Its LSTM batch-size warning is about variable-length
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
