"""Wireless links and the round latency of a device (S2), pure numpy.

Per round, device k needs (S2)

    T_k = T_k^down + T_k^comp + T_k^up,    T_comm = S / (b log2(1 + SNR)),

with S the payload in bits, b the bandwidth in Hz it is given and SNR its signal-to-noise
ratio this round (linear). Under Rayleigh fading the received power, and so the SNR, is
exponentially distributed around its mean: SNR_k(t) = mean_k x Exp(1), drawn afresh every
round. A synchronous round lasts max_k T_k over the selected devices.
"""

from __future__ import annotations

import numpy as np


def db_to_linear(db: np.ndarray | float) -> np.ndarray:
    return 10.0 ** (np.asarray(db, dtype=np.float64) / 10.0)


def rayleigh_snr(mean_snr_db: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(K,) this round's linear SNRs under Rayleigh fading: mean x Exp(1)."""
    mean = db_to_linear(mean_snr_db)
    return mean * rng.exponential(1.0, size=mean.shape)


def spectral_efficiency(snr: np.ndarray) -> np.ndarray:
    """log2(1 + SNR), bits per second per Hz (Shannon)."""
    return np.log2(1.0 + np.asarray(snr, dtype=np.float64))


def comm_seconds(bits: np.ndarray | float, bandwidth_hz: np.ndarray | float,
                 snr: np.ndarray | float) -> np.ndarray:
    """T_comm = S / (b log2(1 + SNR)); inf where the bandwidth or the SNR is zero."""
    rate = np.asarray(bandwidth_hz, dtype=np.float64) * spectral_efficiency(snr)
    bits = np.asarray(bits, dtype=np.float64)
    return np.divide(bits, rate, out=np.full(np.broadcast(bits, rate).shape, np.inf),
                     where=rate > 0)


def bandwidth_for(bits: np.ndarray, seconds: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """The least bandwidth (Hz) that moves `bits` within `seconds`: S / (t log2(1 + SNR));
    inf where no time is left or the channel carries nothing."""
    rate_per_hz = np.asarray(seconds, dtype=np.float64) * spectral_efficiency(snr)
    bits = np.asarray(bits, dtype=np.float64)
    return np.divide(bits, rate_per_hz, out=np.full(np.broadcast(bits, rate_per_hz).shape,
                                                     np.inf), where=rate_per_hz > 0)


def round_seconds(down_s: np.ndarray, comp_s: np.ndarray, up_s: np.ndarray,
                  selected: np.ndarray) -> float:
    """A synchronous round: the slowest selected device's T_down + T_comp + T_up (0 when
    nobody is selected)."""
    total = np.asarray(down_s) + np.asarray(comp_s) + np.asarray(up_s)
    chosen = total[np.asarray(selected, dtype=bool)]
    return float(chosen.max()) if chosen.size else 0.0
