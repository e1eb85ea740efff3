"""GARCH(1,1) as a model version (architecture ``garch``): the strongest baseline, fitted
with ``arch`` on the last training returns and exported to ONNX like the networks, so that it
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
    variance_sum: torch.Tensor
    omega_sum: torch.Tensor
    z: torch.Tensor

    def __init__(self, omega: float, alpha: float, beta: float, window: int,
                 horizons: Sequence[int], mean: float, std: float,
                 return_column: int = 0) -> None:
        super().__init__()
        persistence = alpha + beta
        # arch bounds alpha + beta by 1 (integrated GARCH, common at one minute).
        if not (omega > 0 and alpha >= 0 and beta >= 0 and persistence <= 1 + 1e-9):
            raise TrainingError(f"GARCH fit is explosive: omega {omega}, alpha {alpha}, "
                                f"beta {beta}")
        self.return_column, self.mean, self.std = return_column, mean, std
        self.omega, self.alpha, self.beta = (nn.Parameter(torch.tensor(v), requires_grad=False)
                                             for v in (omega, alpha, beta))
        # sigma²[T+1] = beta^T sigma²[1] + omega sum_(j<T) beta^j
        #               + alpha sum_t beta^(T-1-t) r_t²: one dot product over the window.
        decay = beta ** np.arange(window - 1, -1, -1, dtype=np.float64)
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.seed_weight = float(beta**window)
        self.constant = float(omega * decay.sum())
        # E sigma²[T+k] = phi^(k-1) sigma²[T+1] + omega sum_(j<k-1) phi^j; summed over
        # k = 1..h: variance_sum x sigma²[T+1] + omega_sum (no division: phi may be 1).
        powers = persistence ** np.arange(max(horizons), dtype=np.float64)
        self.register_buffer("variance_sum", torch.tensor(
            [powers[:h].sum() for h in horizons], dtype=torch.float32))
        self.register_buffer("omega_sum", torch.tensor(
            [omega * sum(powers[: k - 1].sum() for k in range(1, h + 1)) for h in horizons],
            dtype=torch.float32))
        self.register_buffer("z", torch.tensor([-Z80, 0.0, Z80]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        returns = (x[:, :, self.return_column] * self.std + self.mean) * _BP
        squares = returns * returns
        variance = (self.seed_weight * squares.mean(dim=1) + self.constant
                    + self.alpha * (squares @ self.decay))  # of the next return
        total = variance[:, None] * self.variance_sum + self.omega_sum
        sigma = torch.sqrt(torch.clamp(total, min=0.0)) / _BP  # (batch, horizons)
        return (sigma[:, :, None] * self.z).flatten(start_dim=1)


def fit_garch(returns: FloatArray, window: int, horizons: Sequence[int],
              normalisation: Normalisation, return_column: int = 0,
              fit_returns: int = 10_080) -> GarchModel:
    """A :class:`GarchModel` of the zero-mean normal GARCH(1,1) that ``arch`` fits to the
    last ``fit_returns`` of ``returns`` (one-candle log returns, oldest first): the most
    recent regime, as :class:`makeusrich.trainer.evaluate.GarchBaseline` fits (over all
    of 2025's minutes the fit does not converge)."""
    from arch import arch_model  # scipy and pandas: imported only to fit

    recent = np.asarray(returns, dtype=np.float64)[-fit_returns:]
    fitted = arch_model(recent * _BP, mean="Zero",
                        vol="GARCH", p=1, q=1, rescale=False).fit(disp="off",
                                                                  show_warning=False)
    if fitted.convergence_flag != 0:
        raise TrainingError("the GARCH(1,1) fit did not converge; pass more candles")
    params = fitted.params
    return GarchModel(float(params["omega"]), float(params["alpha[1]"]),
                      float(params["beta[1]"]), window, horizons,
                      normalisation.mean[return_column], normalisation.std[return_column],
                      return_column)
