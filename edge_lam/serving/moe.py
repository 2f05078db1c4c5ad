"""A mixture of experts built from a dense gated FFN, without training (S8's MoE layers).

A gated FFN (Llama, SmolLM2, Gemma, Qwen) computes, with F intermediate neurons,

    FFN(x) = down(act(gate x) * up x) = sum_i down[:, i] h_i(x),  h_i(x) = act(gate_i x) up_i x

so splitting the F neurons into E disjoint groups I_1..I_E gives experts

    y_e(x) = down[:, I_e] (act(gate[I_e] x) * up[I_e] x),      sum_e y_e(x) = FFN(x)  exactly.

Grouping (MoEfication's co-activation clustering): each neuron is described by its |h_i|
over calibration tokens (unit-normalised); balanced k-means puts F / E neurons in each expert,
so the experts are equal in cost. Routing (training-free, CMoE style): each expert keeps its
`m` neurons closest to its centroid as representatives; a token's score for expert e is
sum_{i in R_e} |h_i(x)|, divided by that sum's calibration mean (experts comparable), and the
token goes to its k best experts:

    y(x) = sum_{e in topk(s(x))} y_e(x)        (gate weight 1 for every chosen expert)

S8 writes y = sum over the top k of normalised gate weight x expert output: that is for a MoE
trained with its router. Here the experts are pieces of one sum, so weight 1 keeps k = E equal
to the dense FFN up to float rounding; k < E drops the pieces the router deems smallest.

Pure parts first (numpy clustering, torch expert maths on tensors), then `MoEPlan` (what the
server and the devices must agree on) and `MoEMLP`, the module that replaces
`model.model.layers[i].mlp` and computes only the chosen experts for each token, locally or
through a `runner` (the server's remote experts, `server_app.serve.moe`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge_lam.config.options import ConfigError

# ---------------------------------------------------------------------------------------
# pure: clustering (numpy)
# ---------------------------------------------------------------------------------------


def balanced_assign(dist: np.ndarray) -> np.ndarray:
    """(F,) cluster of each of F points given dist (F, E), each cluster getting exactly F / E
    points: points in order of regret (second-best minus best distance, largest first) take
    their nearest cluster that is not yet full."""
    f, e = dist.shape
    if f % e:
        raise ValueError(f"{f} points cannot split into {e} equal clusters")
    capacity = np.full(e, f // e)
    part = np.sort(dist, axis=1)
    regret = part[:, 1] - part[:, 0] if e > 1 else np.zeros(f)
    out = np.empty(f, dtype=np.int64)
    for i in np.argsort(-regret, kind="stable"):
        row = np.where(capacity > 0, dist[i], np.inf)
        c = int(np.argmin(row))
        out[i] = c
        capacity[c] -= 1
    return out


def balanced_kmeans(features: np.ndarray, clusters: int, iters: int = 15,
                    seed: int = 0) -> np.ndarray:
    """(F,) cluster ids of F feature rows (F, D) by k-means with equal cluster sizes
    (squared Euclidean distance; balanced_assign in place of the nearest-centroid step)."""
    rng = np.random.default_rng(seed)
    feats = np.asarray(features, dtype=np.float32)
    norms = (feats.astype(np.float64) ** 2).sum(1)  # (F,)
    centroids = feats[rng.choice(len(feats), clusters, replace=False)]  # (E, D)
    assignment = None
    for _ in range(iters):
        dist = (norms[:, None] - 2 * (feats @ centroids.T)
                + (centroids.astype(np.float64) ** 2).sum(1)[None, :])  # (F, E)
        new = balanced_assign(dist)
        if assignment is not None and np.array_equal(new, assignment):
            break
        assignment = new
        onehot = np.eye(clusters, dtype=np.float32)[assignment]  # (F, E)
        centroids = (onehot.T @ feats) / onehot.sum(0)[:, None]  # (E, D): cluster means
    return assignment


def representatives(features: np.ndarray, assignment: np.ndarray, count: int) -> np.ndarray:
    """(E, m) the m neurons of each cluster closest to its centroid (m = min(count, F / E))."""
    clusters = int(assignment.max()) + 1
    out = []
    for c in range(clusters):
        members = np.flatnonzero(assignment == c)
        centroid = features[members].mean(0)
        dist = ((features[members] - centroid) ** 2).sum(1)
        out.append(members[np.argsort(dist, kind="stable")[:count]])
    return np.stack(out)


def neuron_features(activations: np.ndarray) -> np.ndarray:
    """(F, N) each neuron's |h_i| over N calibration tokens, unit-normalised: its
    activation pattern (from activations (N, F))."""
    feats = np.abs(np.asarray(activations, dtype=np.float64)).T
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------
# pure: expert maths (torch tensors)
# ---------------------------------------------------------------------------------------


def neuron_activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                       act: Callable) -> torch.Tensor:
    """h (N, F') = act(x gate^T) * (x up^T) for x (N, H), gate and up (F', H)."""
    return act(x @ gate.T) * (x @ up.T)


def router_scores(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Callable,
                  scale: torch.Tensor) -> torch.Tensor:
    """s (N, E): sum of |h| over each expert's m representative neurons, times scale (E,).
    gate, up: (E * m, H), expert e's rows at e*m .. e*m + m - 1."""
    h = neuron_activations(x, gate, up, act).abs()  # (N, E * m)
    return h.reshape(len(x), len(scale), -1).sum(-1) * scale


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, E) bool: each token's k best experts (ties: the lower expert id)."""
    chosen = torch.topk(scores, k, dim=-1, sorted=False).indices  # (N, k)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)


def expert_output(x: torch.Tensor, weights: tuple[torch.Tensor, ...],
                  act: Callable) -> torch.Tensor:
    """y_e (N, H) = down_e (act(gate_e x) * up_e x); weights (gate_e, up_e: (F/E, H),
    down_e: (H, F/E))."""
    gate, up, down = weights
    return neuron_activations(x, gate, up, act) @ down.T


def experts_output(x: torch.Tensor, mask: torch.Tensor,
                   experts: list[tuple[torch.Tensor, ...]], act: Callable) -> torch.Tensor:
    """(N, H) sum over the experts each token chose (mask (N, len(experts))), each expert
    computed on its own tokens only."""
    y = torch.zeros_like(x)
    for e, weights in enumerate(experts):
        rows = mask[:, e].nonzero().squeeze(1)
        if len(rows):
            y.index_add_(0, rows, expert_output(x[rows], weights, act))
    return y


# ---------------------------------------------------------------------------------------
# the plan and the module
# ---------------------------------------------------------------------------------------


@dataclass
class MoEPlan:
    """What the server and the devices agree on: for each of L layers, each neuron's expert
    `assignment` (L, F), the router's representative neurons `router` (L, E, m) and their
    score `scale` (L, E)."""

    assignment: np.ndarray
    router: np.ndarray
    scale: np.ndarray

    @property
    def experts(self) -> int:
        return self.router.shape[1]

    def neurons(self, layer: int, expert: int) -> np.ndarray:
        return np.flatnonzero(self.assignment[layer] == expert)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"assignment": self.assignment.astype(np.int32),
                "router": self.router.astype(np.int32), "scale": self.scale.astype(np.float32)}

    @classmethod
    def from_arrays(cls, arrays: dict) -> MoEPlan:
        return cls(np.asarray(arrays["assignment"]), np.asarray(arrays["router"]),
                   np.asarray(arrays["scale"]))


def gated_mlps(model) -> list[nn.Module]:
    """The gated FFNs of a decoder (`model.model.layers[i].mlp` with gate/up/down_proj)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer.mlp, n) for layer in layers
                                 for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        raise ConfigError(f"{type(model).__name__} has no gated FFNs (model.layers[i].mlp with "
                          "gate_proj, up_proj, down_proj): serve.kind='moe' needs a Llama-, "
                          "Gemma- or Qwen-style decoder")
    return [layer.mlp for layer in layers]


def expert_weights(mlp: nn.Module, neurons: np.ndarray) -> tuple[torch.Tensor, ...]:
    """(gate (F/E, H), up (F/E, H), down (H, F/E)): one expert's slice of a dense FFN."""
    idx = torch.as_tensor(neurons, dtype=torch.long)
    return (mlp.gate_proj.weight.detach()[idx], mlp.up_proj.weight.detach()[idx],
            mlp.down_proj.weight.detach()[:, idx])


@torch.no_grad()
def calibration_inputs(model, batches, max_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """Each FFN's inputs (N, H) at the real tokens (attention_mask) of the batches (dicts with
    input_ids, attention_mask), at most max_tokens of them (a seeded sample)."""
    mlps = gated_mlps(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model  # no LM head
    seen: list[list[torch.Tensor]] = [[] for _ in mlps]
    keep: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(
        args[0].reshape(-1, args[0].shape[-1])[keep[-1]].float())) for i, m in enumerate(mlps)]
    try:
        for batch in batches:
            keep.append(batch["attention_mask"].reshape(-1).bool())
            decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    inputs = [torch.cat(s) for s in seen]
    if len(inputs[0]) > max_tokens:
        pick = torch.as_tensor(np.sort(np.random.default_rng(seed).choice(
            len(inputs[0]), max_tokens, replace=False)))
        inputs = [x[pick] for x in inputs]
    return inputs


@torch.no_grad()
def build_plan(model, inputs: list[torch.Tensor], experts: int, router_neurons: int,
               seed: int = 0) -> MoEPlan:
    """Cluster each layer's neurons on its calibration inputs (N, H) into `experts` equal
    experts and pick each expert's representative neurons and score scale."""
    assignment, router, scale = [], [], []
    for mlp, x in zip(gated_mlps(model), inputs):
        f = mlp.gate_proj.weight.shape[0]
        if f % experts:
            raise ConfigError(f"serve.moe-experts={experts} does not divide the FFN's {f} "
                              f"neurons: pick a divisor of {f}")
        w = (mlp.gate_proj.weight.float(), mlp.up_proj.weight.float())
        h = neuron_activations(x, *w, mlp.act_fn)  # (N, F)
        feats = neuron_features(h.numpy())
        a = balanced_kmeans(feats, experts, seed=seed)
        reps = representatives(feats, a, router_neurons)  # (E, m)
        mean = h.abs()[:, torch.as_tensor(reps.reshape(-1))].reshape(len(x), experts, -1)
        assignment.append(a)
        router.append(reps)
        scale.append(1.0 / np.maximum(mean.sum(-1).mean(0).numpy(), 1e-12))
    return MoEPlan(np.stack(assignment), np.stack(router), np.stack(scale))


class MoEMLP(nn.Module):
    """A gated FFN as E experts and a router: y(x) = sum over x's top-k experts of y_e(x).
    `experts` None: the expert weights live elsewhere and `runner(layer, x (N, H), mask
    (N, E)) -> (N, H)` computes them. `active` (N,) bool, if set, limits the work to those
    tokens (padding gets 0)."""

    def __init__(self, mlp: nn.Module, plan: MoEPlan, layer: int, top_k: int,
                 keep_experts: bool = True, runner: Callable | None = None):
        super().__init__()
        if not 1 <= top_k <= plan.experts:
            raise ConfigError(f"serve.moe-top-k={top_k} must be between 1 and "
                              f"serve.moe-experts={plan.experts}")
        self.layer, self.top_k, self.act, self.runner = layer, top_k, mlp.act_fn, runner
        reps = torch.as_tensor(plan.router[layer].reshape(-1), dtype=torch.long)
        self.router_gate = nn.Parameter(mlp.gate_proj.weight.detach()[reps], False)
        self.router_up = nn.Parameter(mlp.up_proj.weight.detach()[reps], False)
        self.register_buffer("scale", torch.as_tensor(plan.scale[layer],
                                                      dtype=self.router_gate.dtype))
        self.experts = [expert_weights(mlp, plan.neurons(layer, e))
                        for e in range(plan.experts)] if keep_experts else None
        self.active: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, H)
        scores = router_scores(flat, self.router_gate, self.router_up, self.act, self.scale)
        mask = top_k_mask(scores, self.top_k)  # (N, E)
        if self.active is not None:
            mask &= self.active.reshape(-1, 1)
        self.last_mask = mask
        if self.experts is not None:
            y = experts_output(flat, mask, self.experts, self.act)
        elif self.runner is not None:
            y = self.runner(self.layer, flat, mask)
        else:
            raise RuntimeError(f"MoE layer {self.layer} holds no experts and has no runner")
        return y.reshape(x.shape)


def moefy(model, plan: MoEPlan, top_k: int, keep_experts: bool = True,
          runner: Callable | None = None) -> list[MoEMLP]:
    """Replace each layer's FFN of `model` by its MoE version (in place); the MoE layers."""
    layers = model.model.layers
    if len(layers) != len(plan.assignment):
        raise ConfigError(f"the MoE plan has {len(plan.assignment)} layers, the model "
                          f"{len(layers)}: build the plan from the same model")
    out = []
    for i, layer in enumerate(layers):
        layer.mlp = MoEMLP(layer.mlp, plan, i, top_k, keep_experts, runner)
        out.append(layer.mlp)
    return out


def set_active_tokens(layers: list[MoEMLP], attention_mask: torch.Tensor | None) -> None:
    """Compute the experts only at real tokens (attention_mask (B, T)); None: every token."""
    for layer in layers:
        layer.active = None if attention_mask is None else attention_mask.reshape(-1).bool()


def ffn_flops_ratio(experts: int, top_k: int, router_neurons: int, neurons: int) -> float:
    """FFN multiply-adds per token relative to the dense FFN: k / E of the neurons (3 H each:
    gate, up, down rows) plus the router's E m representative neurons (2 H each)."""
    return top_k / experts + 2 * experts * router_neurons / (3 * neurons)
