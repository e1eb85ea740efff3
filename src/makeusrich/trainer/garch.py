"""GARCH(1,1) as a model version (architecture ``garch``): the strongest baseline, fitted
with ``arch`` on the training returns and exported to ONNX like the networks, so that it
is calibrated, evaluated, promoted and served by the same code when no network beats it
(the serving rule, :func:`makeusrich.trainer.evaluate.judge`).

The exported graph filters the window's log returns through the fitted variance
recursion (seeded with their mean square, whose weight beta^window is small for a long
window) and answers, per horizon h, no move ± Z80 sqrt(sum of the next h variance
forecasts): the same forecast as :class:`makeusrich.trainer.evaluate.GarchBaseline`, with
parameters fitted once rather than refitted daily and a window instead of the whole past.
"""

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from makeusrich.core.errors import TrainingError
from makeusrich.inference.features import FloatArray, Normalisation
from makeusrich.inference.model import Z80

__all__ = ["GarchModel", "fit_garch"]

_BP = 1e4  # fitted on returns in basis points: arch's optimiser prefers O(1) values


class GarchModel(nn.Module):
    """``(batch, window, features)`` normalised windows whose ``return_column`` is the
    log return -> ``(batch, 3 x horizons)`` 10%/50%/90% log returns. ``omega`` is in
    basis points squared."""

    hidden = 0
    layers = 0
    decay: torch.Tensor
    level_sum: torch.Tensor
    excess_sum: torch.Tensor
    z: torch.Tensor

    def __init__(self, omega: float, alpha: float, beta: float, window: int,
                 horizons: Sequence[int], mean: float, std: float,
                 return_column: int = 0) -> None:
        super().__init__()
        persistence = alpha + beta
        if not (omega > 0 and alpha >= 0 and beta >= 0 and persistence < 1):
            raise TrainingError(f"GARCH fit is not stationary: omega {omega}, alpha {alpha}, "
                                f"beta {beta}")
        self.return_column, self.mean, self.std = return_column, mean, std
        self.omega, self.alpha, self.beta = (nn.Parameter(torch.tensor(v), requires_grad=False)
                                             for v in (omega, alpha, beta))
        # sigma²[T+1] = beta^T sigma²[1] + omega (1 - beta^T) / (1 - beta)
        #               + alpha sum_t beta^(T-1-t) r_t²: one dot product over the window.
        decay = beta ** np.arange(window - 1, -1, -1, dtype=np.float64)
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.seed_weight = float(beta**window)
        self.constant = float(omega * (1 - beta**window) / (1 - beta))
        # The h-step variances sum to h V + (sigma²[T+1] - V)(1 - phi^h)/(1 - phi).
        self.level = float(omega / (1 - persistence))
        self.register_buffer("level_sum", torch.tensor([h * self.level for h in horizons]))
        self.register_buffer("excess_sum", torch.tensor(
            [(1 - persistence**h) / (1 - persistence) for h in horizons]))
        self.register_buffer("z", torch.tensor([-Z80, 0.0, Z80]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        returns = (x[:, :, self.return_column] * self.std + self.mean) * _BP
        squares = returns * returns
        variance = (self.seed_weight * squares.mean(dim=1) + self.constant
                    + self.alpha * (squares @ self.decay))  # of the next return
        total = self.level_sum + (variance[:, None] - self.level) * self.excess_sum
        sigma = torch.sqrt(torch.clamp(total, min=0.0)) / _BP  # (batch, horizons)
        return (sigma[:, :, None] * self.z).flatten(start_dim=1)


def fit_garch(returns: FloatArray, window: int, horizons: Sequence[int],
              normalisation: Normalisation, return_column: int = 0) -> GarchModel:
    """A :class:`GarchModel` of the zero-mean normal GARCH(1,1) that ``arch`` fits to
    ``returns`` (one-candle log returns, oldest first)."""
    from arch import arch_model  # scipy and pandas: imported only to fit

    fitted = arch_model(np.asarray(returns, dtype=np.float64) * _BP, mean="Zero",
                        vol="GARCH", p=1, q=1, rescale=False).fit(disp="off",
                                                                  show_warning=False)
    if fitted.convergence_flag != 0:
        raise TrainingError("the GARCH(1,1) fit did not converge; pass more candles")
    params = fitted.params
    return GarchModel(float(params["omega"]), float(params["alpha[1]"]),
                      float(params["beta[1]"]), window, horizons,
                      normalisation.mean[return_column], normalisation.std[return_column],
                      return_column)
