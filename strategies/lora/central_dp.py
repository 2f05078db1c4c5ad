"""Central (device-level) differential privacy through Flower's DP wrapper strategies
(`dp.central`, issue 28 item 3).

- `client`: Flower's `DifferentialPrivacyClientSideFixedClipping` around the LoRA strategy;
  each device clips its update to norm C with Flower's `fixedclipping_mod` (the ClientApp
  applies it when the TRAIN config carries the clipping norm, before the SecAgg+ mod masks
  the reply, so it composes with `secure.enabled`);
- `server`: Flower's `DifferentialPrivacyServerSideFixedClipping`; the server clips each
  reply against the global adapter (every device at r_max: strategy='fedavg').

Either way the server adds N(0, (z C / m)^2) to every tensor of the mean of the m devices'
clipped updates (Flower's `_add_noise_to_aggregated_arrays`). For that to bound one device's
influence by C / m the mean is uniform (each device 1 / m, as Flower's accounted FedAvg
requires): the strategy aggregates with equal weights under central DP. m is the round's
sample (set each round: a fleet's sample size varies). With hetlora the zero-padded mean
is (1/m) sum_k pad(trunc_k(G)) + (1/m) sum_k pad(D_k): the first part depends on the ranks
only (public), the second on the devices' clipped updates D_k, |D_k| <= C.

Accounting (Flower 1.39's accountant needs the `dp-accounting` package and a plain FedAvg):
each round that releases a noisy mean is one Gaussian mechanism with noise multiplier z on
the add-or-remove-one-device relation, composed without sampling amplification by Opacus's
RDP accountant; epsilon at `dp.delta` after every round is in metrics.jsonl (`central_dp`).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping)

from edge_lam.config.run_config import RunConfig


class _Accounted:
    """What both wrappers add: the round's m, the RDP accountant, the metrics entry."""

    def _setup_accounting(self, cfg: RunConfig, inner) -> None:
        from opacus.accountants import RDPAccountant

        self.inner, self.delta = inner, cfg.dp.delta
        self.mode = cfg.dp.central
        self.accountant = None  # Flower's own (needs dp-accounting): not used
        self.rdp = RDPAccountant()
        self.releases = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.num_sampled_clients = max(1, len(messages))  # the noise's z C / m
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        entry = {"mode": self.mode, "noise_multiplier": self.noise_multiplier,
                 "clip": self.clipping_norm, "sampled": self.num_sampled_clients,
                 "noise_std": self.noise_multiplier * self.clipping_norm
                 / self.num_sampled_clients, "released": arrays is not None}
        if arrays is not None:
            self.rdp.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
            self.releases += 1
        entry.update(releases=self.releases, delta=self.delta,
                     epsilon=self.epsilon() if self.releases else 0.0)
        info = self.inner.round_info.get(server_round)
        if info is not None:
            info["central_dp"] = entry
        return arrays, metrics

    def epsilon(self) -> float:
        return float(self.rdp.get_epsilon(delta=self.delta))

    def __getattr__(self, name):  # the wrapped strategy's attributes (checkpoint, profiles)
        if name in ("inner", "strategy"):
            raise AttributeError(name)
        return getattr(self.strategy, name)


class ClientSideCentralDP(_Accounted, DifferentialPrivacyClientSideFixedClipping):
    def __init__(self, strategy, cfg: RunConfig):
        DifferentialPrivacyClientSideFixedClipping.__init__(
            self, strategy, cfg.dp.central_noise, cfg.dp.central_clip, 1)
        self._setup_accounting(cfg, strategy)


class ServerSideCentralDP(_Accounted, DifferentialPrivacyServerSideFixedClipping):
    def __init__(self, strategy, cfg: RunConfig):
        DifferentialPrivacyServerSideFixedClipping.__init__(
            self, strategy, cfg.dp.central_noise, cfg.dp.central_clip, 1)
        self._setup_accounting(cfg, strategy)


def with_central_dp(strategy, cfg: RunConfig):
    """`strategy` wrapped in Flower's DP wrapper of `dp.central` (itself when off)."""
    if cfg.dp.central == "off":
        return strategy
    strategy.uniform_weights = True
    wrapper = ClientSideCentralDP if cfg.dp.central == "client" else ServerSideCentralDP
    return wrapper(strategy, cfg)
