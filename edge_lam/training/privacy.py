"""Differential privacy on a device through Opacus (S4 "Privacy").

Every noisy release a device makes, a local training step or a gradient it sends for
unlearning, is one DP-SGD step of Opacus: Poisson-sampled batch, per-example gradients
clipped to C = dp.max-grad-norm, Gaussian noise N(0, (z C)^2 I) on their sum (S4:
g~ = g + N(0, sigma^2 I) with sigma = z C), z = dp.noise-multiplier or the one Opacus's RDP
accountant gives for dp.target-epsilon / dp.delta over the run's planned releases (S4: "over
many steps use an accountant"). One accountant per device lives across rounds (its history is
a small JSON ledger) and a device refuses any step that would take it past its budget.

Only the trainable parameters (LoRA factors of the active rank + the classification head)
are seen by Opacus: PEFT freezes everything else, and Opacus hooks only modules with
trainable parameters (nn.Linear: lora_A, lora_B and the head), so no layer needs wrapping.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from torch.utils.data import DataLoader, Dataset

from edge_lam.config.run_config import RunConfig
from edge_lam.data.encode import encode_batch
from edge_lam.data.text import Examples
from edge_lam.models.lora_model import torch_device


class _Rows(Dataset):
    """Row indices as 1-tuples of tensors: what Opacus's Poisson loader can sample."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (torch.tensor(i),)


@functools.lru_cache(maxsize=64)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Opacus's RDP of one subsampled Gaussian step at RDPAccountant's orders (RDP adds up
    over steps); cached because it is the slow part of every epsilon computation."""
    return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                               steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


class DevicePrivacy:
    """One device's Opacus accountant, noise multiplier and budget (dp.target-epsilon)."""

    def __init__(self, cfg: RunConfig, num_examples: int, ledger: dict | None = None):
        if num_examples < 1:
            raise ValueError("a device needs at least one example to train privately")
        self.cfg = cfg
        self.num_examples = num_examples
        # Opacus's Poisson loader samples each example with q = 1 / len(loader)
        self.sample_rate = 1.0 / math.ceil(num_examples / cfg.train.batch_size)
        self.accountant = RDPAccountant()
        if ledger:
            self.accountant.load_state_dict({"history": [tuple(h) for h in ledger["history"]],
                                             "mechanism": "rdp"})
            self.noise_multiplier = float(ledger["noise_multiplier"])
        elif cfg.dp.noise_multiplier > 0:
            self.noise_multiplier = cfg.dp.noise_multiplier
        else:
            self.noise_multiplier = noise_multiplier_for_budget(
                cfg.dp.target_epsilon, cfg.dp.delta, self.sample_rate,
                cfg.planned_private_steps)

    # ------------------------------------------------------------------ budget
    @property
    def steps(self) -> int:
        return int(sum(h[2] for h in self.accountant.history))

    def epsilon(self) -> float:
        """Epsilon spent so far at dp.delta, from Opacus's RDP accountant."""
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(self.cfg.dp.delta))

    def steps_left(self, most: int) -> int:
        """How many more releases (at most `most`) keep epsilon within dp.target-epsilon.

        A look-ahead with Opacus's own RDP analysis (what RDPAccountant.get_epsilon computes,
        for the history plus k more steps); the accountant itself only counts the steps the
        DP optimizer actually takes.
        """
        spent = sum((_rdp_per_step(q, z) * n for z, q, n in self.accountant.history),
                    np.zeros(len(RDPAccountant.DEFAULT_ALPHAS)))
        step = _rdp_per_step(self.sample_rate, self.noise_multiplier)

        def within(k: int) -> bool:
            with warnings.catch_warnings():  # "optimal order is the largest alpha": a what-if
                warnings.simplefilter("ignore", UserWarning)
                eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS,
                                                        rdp=spent + k * step,
                                                        delta=self.cfg.dp.delta)
            return eps <= self.cfg.dp.target_epsilon

        lo, hi = 0, most  # within(lo) holds (or nothing is left); find the largest such k
        if within(hi):
            return hi
        if not within(1):
            return 0
        lo = 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if within(mid) else (lo, mid)
        return lo

    def can_step(self) -> bool:
        """Would one more release stay within dp.target-epsilon?"""
        return self.steps_left(1) == 1

    def ledger(self) -> dict:
        """JSON-able state to keep between rounds (and runs)."""
        return {"history": [list(h) for h in self.accountant.history],
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate}

    def report(self) -> dict[str, float]:
        return {"epsilon": self.epsilon(), "delta": self.cfg.dp.delta,
                "noise_multiplier": self.noise_multiplier, "private_steps": self.steps,
                "target_epsilon": self.cfg.dp.target_epsilon}

    # ------------------------------------------------------------------ Opacus
    @contextmanager
    def session(self, model, optimizer: torch.optim.Optimizer, examples: Examples,
                tokenizer, seed: int) -> Iterator[tuple]:
        """Opacus's make_private over `model` (not wrapped: its hooks are removed after, so
        the process's cached model stays plain), yielding (DP optimizer, next_batch)."""
        cfg = self.cfg
        engine = PrivacyEngine(accountant="rdp")
        engine.accountant = self.accountant  # count into this device's own accountant

        def collate(rows):
            idx = [int(r[0]) for r in rows]
            return encode_batch(tokenizer, examples.subset(idx), cfg)

        loader = DataLoader(_Rows(len(examples)), batch_size=cfg.train.batch_size,
                            collate_fn=collate)
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            hooks, dp_optimizer, dp_loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=self.noise_multiplier, max_grad_norm=cfg.dp.max_grad_norm,
                poisson_sampling=True, wrap_model=False,
                rand_on_empty=True)  # an empty Poisson draw still makes a (noise) release
            stream = iter(dp_loader)
            device = torch_device()

            def next_batch() -> dict[str, torch.Tensor]:
                nonlocal stream
                try:
                    batch = next(stream)
                except StopIteration:  # one Poisson "epoch" done: go on sampling
                    stream = iter(dp_loader)
                    batch = next(stream)
                return {k: v.to(device) for k, v in batch.items()}

            try:
                yield dp_optimizer, next_batch
            finally:
                dp_optimizer.zero_grad(set_to_none=True)
                hooks.cleanup()


def noise_multiplier_for_budget(target_epsilon: float, target_delta: float,
                                sample_rate: float, steps: int) -> float:
    """Noise multiplier sigma / C reaching (epsilon, delta) after `steps` subsampled releases.

    Delegates to Opacus's RDP accountant (S4: over many steps use an accountant).
    """
    from opacus.accountants.utils import get_noise_multiplier

    if steps < 1 or not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"need steps >= 1 and sample_rate in (0, 1], got {steps}, {sample_rate}")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                      sample_rate=sample_rate, steps=steps, accountant="rdp"))
