"""S3 FedKD: mutual distillation losses (torch) and SVD compression of updates (numpy).

Each device keeps a private local module (the mentor, never sent) and a shared module (the
mentee) that all devices update; only the shared module crosses the network (S3).

- `temperature_softmax`, `kd_loss`: p(y|x) = softmax(z / T); KL(p_teacher || p_student) * T^2.
- `mutual_kd_losses`: the two losses each device minimises, optionally with FedKD's adaptive
  scaling (distillation divided by the sum of the two task losses) and hidden-state MSE.
- `energy_threshold`, `svd_compress`, `compress_update`, `decompress_update`: FedKD's SVD
  compression of shared-module updates, keeping the smallest number of singular values whose
  energy sum sigma_i^2 reaches T(t) of the total, T(t) rising linearly from 0.95 to 0.98.

- `global_state`, `device_view`, `aggregate_fedkd`: the server keeps the shared backbone
  adapter once and one head per task; the backbone is averaged over all devices, each head
  only over the devices of its task (label spaces differ).
- `encode_update`, `decode_update`: what crosses the network each way, compressed or not.

Pure functions, no Flower: the ClientApp calls the losses, both sides call the compression.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

State = dict[str, np.ndarray]

IGNORE_INDEX = -100  # label value excluded from every loss (Hugging Face's convention)
SEP = "::"  # payload keys are f"{state_key}{SEP}{part}"
_U, _S, _VT, _FULL = "U", "s", "Vt", "full"


# ---------------------------------------------------------------------------- distillation

def _check_temperature(T: float) -> None:
    if not T > 0:
        raise ValueError(f"distillation temperature T must be > 0, got {T!r}")


def temperature_softmax(logits: torch.Tensor, T: float) -> torch.Tensor:
    """S3: p(y|x) = exp(z_y / T) / sum_j exp(z_j / T), over the last dimension."""
    _check_temperature(T)
    return torch.softmax(logits / T, dim=-1)


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float) -> torch.Tensor:
    """S3: T^2 * mean_n KL(p_teacher(.|x_n) || p_student(.|x_n)), both at temperature T.

    KL(p || q) = sum_y p_y (log p_y - log q_y). Logits are (..., C): leading dimensions are
    flattened into N positions and the KL is averaged over them. The teacher is detached, so
    gradients reach the student only. The T^2 factor keeps gradient sizes comparable across T.
    """
    _check_temperature(T)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must have the same shape")
    num_classes = student_logits.shape[-1]
    log_p = F.log_softmax(teacher_logits.detach().reshape(-1, num_classes) / T, dim=-1)  # N x C
    log_q = F.log_softmax(student_logits.reshape(-1, num_classes) / T, dim=-1)  # N x C
    if log_q.shape[0] == 0:
        raise ValueError("kd_loss got no positions to distil (empty batch)")
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl * T**2


def hidden_mse(targets: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_l MSE(outputs_l, targets_l) over paired layers; targets are detached."""
    if len(targets) != len(outputs) or not targets:
        raise ValueError(f"hidden states must be non-empty lists of equal length, got "
                         f"{len(targets)} mentor and {len(outputs)} mentee layers")
    total = outputs[0].new_zeros(())
    for layer, (target, output) in enumerate(zip(targets, outputs)):
        if target.shape != output.shape:
            raise ValueError(f"hidden layer {layer}: mentor {tuple(target.shape)} and mentee "
                             f"{tuple(output.shape)} shapes differ (project them first)")
        total = total + F.mse_loss(output, target.detach())
    return total


def mutual_kd_losses(local_logits: torch.Tensor, shared_logits: torch.Tensor,
                     labels: torch.Tensor, T: float, lam: float, adaptive: bool = False,
                     hidden_local: Sequence[torch.Tensor] | None = None,
                     hidden_shared: Sequence[torch.Tensor] | None = None,
                     eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """S3 mutual distillation between the local (mentor) and shared (mentee) modules.

    With CE the task cross-entropy, KD(a -> b) = T^2 * KL(p_a || p_b) (`kd_loss`, a detached),
    H = sum_l MSE(h_local_l, h_shared_l) (0 without hidden states), and
    s = 1 / max(CE_local + CE_shared, eps) if adaptive else 1 (s is a detached weight):

        shared = CE_shared + s * (KD(local -> shared) + H)         # S3 "L_KD", + task loss
        local  = lam * CE_local + s * (KD(shared -> local) + H)    # S3 "L_local"

    The adaptive s is FedKD's (Wu et al. 2022): distillation divided by L_task_local +
    L_task_shared, so that the modules copy each other strongly only once both predict well.
    In each loss the other module's outputs are detached, so `shared` moves only the shared
    module and `local` only the local one; backpropagate their sum once.

    Logits are (..., C), labels (...); positions labelled IGNORE_INDEX (-100) are left out of
    CE and KD. Returns the two losses (with graph) and their parts (detached, for logging).
    """
    if lam < 0:
        raise ValueError(f"lambda (weight of the local task loss) must be >= 0, got {lam!r}")
    if local_logits.shape != shared_logits.shape or local_logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(local_logits.shape)} (local), "
                         f"{tuple(shared_logits.shape)} (shared) do not match labels "
                         f"{tuple(labels.shape)}: expected (..., C) and (...)")
    if (hidden_local is None) != (hidden_shared is None):
        raise ValueError("pass hidden states for both modules or for neither")
    keep = labels != IGNORE_INDEX  # (...)
    if not bool(keep.any()):
        raise ValueError("every label is IGNORE_INDEX (-100): nothing to learn from")
    local, shared, target = local_logits[keep], shared_logits[keep], labels[keep]  # M x C, M
    ce_local = F.cross_entropy(local, target)
    ce_shared = F.cross_entropy(shared, target)
    kd_to_shared = kd_loss(local, shared, T)
    kd_to_local = kd_loss(shared, local, T)
    if hidden_local is None:
        h_to_shared = h_to_local = shared.new_zeros(())
    else:
        h_to_shared = hidden_mse(hidden_local, hidden_shared)
        h_to_local = hidden_mse(hidden_shared, hidden_local)
    scale = shared.new_ones(())
    if adaptive:
        scale = 1.0 / (ce_local + ce_shared).detach().clamp_min(eps)
    return {
        "shared": ce_shared + scale * (kd_to_shared + h_to_shared),
        "local": lam * ce_local + scale * (kd_to_local + h_to_local),
        "task_shared": ce_shared.detach(),
        "task_local": ce_local.detach(),
        "kd_to_shared": kd_to_shared.detach(),
        "kd_to_local": kd_to_local.detach(),
        "hidden_mse": h_to_shared.detach(),
        "scale": scale,
    }


# ---------------------------------------------------------------------------- compression

def energy_threshold(server_round: int, num_rounds: int, start: float = 0.95,
                     end: float = 0.98) -> float:
    """S3: T(t) = start + (end - start) * (t - 1) / (R - 1), t = 1..R (start when R = 1)."""
    if not 0.0 < start <= 1.0 or not 0.0 < end <= 1.0:
        raise ValueError(f"energy thresholds must lie in (0, 1], got start={start}, end={end}")
    if num_rounds < 1 or not 1 <= server_round <= num_rounds:
        raise ValueError(f"server_round must be in 1..num_rounds, got {server_round} of "
                         f"{num_rounds}")
    if num_rounds == 1:
        return float(start)
    return float(start + (end - start) * (server_round - 1) / (num_rounds - 1))


def _check_energy(energy: float) -> None:
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy threshold must lie in (0, 1], got {energy!r}")


def svd_compress(matrix: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S3: (U_k, s_k, Vt_k) with the smallest k such that sum_{i<k} s_i^2 >= energy * sum s^2.

    Then ||X - U_k diag(s_k) Vt_k||_F^2 = sum_{i>=k} s_i^2 <= (1 - energy) ||X||_F^2.
    SVD in float64; factors come back in the matrix's dtype. A zero matrix gives k = 0.
    """
    _check_energy(energy)
    if matrix.ndim != 2:
        raise ValueError(f"svd_compress needs a 2-D matrix, got shape {matrix.shape}")
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    cumulative = np.cumsum(s**2)  # len min(m, n)
    total = cumulative[-1] if len(cumulative) else 0.0
    k = 0 if total == 0.0 else min(int(np.searchsorted(cumulative, energy * total)) + 1, len(s))
    dtype = matrix.dtype
    return (np.ascontiguousarray(u[:, :k], dtype=dtype),  # m x k
            np.ascontiguousarray(s[:k], dtype=dtype),  # k
            np.ascontiguousarray(vt[:k, :], dtype=dtype))  # k x n


def svd_decompress(u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> np.ndarray:
    """U diag(s) Vt (m x n), computed in float64 and returned in U's dtype."""
    if u.shape[1] != s.shape[0] or vt.shape[0] != s.shape[0]:
        raise ValueError(f"SVD factors do not fit: U {u.shape}, s {s.shape}, Vt {vt.shape}")
    product = (u.astype(np.float64) * s.astype(np.float64)) @ vt.astype(np.float64)
    return product.astype(u.dtype)


def compress_update(state: Mapping[str, np.ndarray], energy: float,
                    array_overhead: int = 0) -> State:
    """S3: payload for a shared-module update: `<key>::U`, `<key>::s`, `<key>::Vt` per 2-D
    floating array whose truncated SVD is smaller in bytes, `<key>::full` for the rest
    (1-D, N-D, integer arrays, and matrices that would not shrink). `array_overhead` is what
    the transport adds per array (three arrays instead of one count against the SVD)."""
    _check_energy(energy)
    payload: State = {}
    for key, value in state.items():
        if SEP in key:
            raise ValueError(f"state key {key!r} contains {SEP!r}, reserved for payload keys")
        value = np.asarray(value)
        if value.ndim == 2 and np.issubdtype(value.dtype, np.floating):
            u, s, vt = svd_compress(value, energy)
            if u.nbytes + s.nbytes + vt.nbytes + 2 * array_overhead < value.nbytes:
                payload.update({f"{key}{SEP}{_U}": u, f"{key}{SEP}{_S}": s,
                                f"{key}{SEP}{_VT}": vt})
                continue
        payload[f"{key}{SEP}{_FULL}"] = value.copy()
    return payload


def decompress_update(payload: Mapping[str, np.ndarray]) -> State:
    """Invert `compress_update`: {key: array}, full arrays copied, SVD triplets multiplied."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for name, value in payload.items():
        key, sep, part = name.rpartition(SEP)
        if not sep or part not in (_U, _S, _VT, _FULL):
            raise ValueError(f"payload key {name!r} is not '<key>::U|s|Vt|full'")
        parts.setdefault(key, {})[part] = value
    out: State = {}
    for key, got in parts.items():
        if set(got) == {_FULL}:
            out[key] = np.array(got[_FULL], copy=True)
        elif set(got) == {_U, _S, _VT}:
            out[key] = svd_decompress(got[_U], got[_S], got[_VT])
        else:
            raise ValueError(f"payload for {key!r} has parts {sorted(got)}: expected either "
                             f"'full' alone or all of 'U', 's', 'Vt'")
    return out


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of the arrays' data: what crosses the network for this payload."""
    return int(sum(np.asarray(v).nbytes for v in payload.values()))


# ---------------------------------------------------------------------------- federation
# The server's global state (S3) holds the shared backbone adapter once and one head per task:
# LoRA factors under their PEFT names, head tensors under `head/<task>/<PEFT name>`. A device
# of task t receives (and returns) the backbone plus t's head, under plain PEFT names.

HEAD_PREFIX = "head/"


def _is_head_key(key: str) -> bool:
    """A trainable tensor that is not a LoRA factor: part of the classification head."""
    return not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight"))


def global_state(backbone: Mapping[str, np.ndarray], heads: Mapping[str, Mapping[str, np.ndarray]]
                 ) -> State:
    """Global state from one device-shaped state's LoRA factors and each task's head."""
    out = {k: np.array(v, copy=True) for k, v in backbone.items() if not _is_head_key(k)}
    for task, head in heads.items():
        if "/" in task:
            raise ValueError(f"task name {task!r} must not contain '/'")
        out.update({f"{HEAD_PREFIX}{task}/{k}": np.array(v, copy=True)
                    for k, v in head.items() if _is_head_key(k)})
    return out


def task_names(state: Mapping[str, np.ndarray]) -> list[str]:
    """Tasks that have a head in a global state, sorted."""
    return sorted({k[len(HEAD_PREFIX):].split("/", 1)[0] for k in state
                   if k.startswith(HEAD_PREFIX)})


def device_view(state: Mapping[str, np.ndarray], task: str) -> State:
    """What a device of `task` holds: the shared backbone adapter + that task's head (none on
    a causal LM scoring label words: every task then shares the backbone alone)."""
    prefix = f"{HEAD_PREFIX}{task}/"
    head = {k[len(prefix):]: v.copy() for k, v in state.items() if k.startswith(prefix)}
    if not head and task_names(state):
        raise ValueError(f"the global state has no head for task {task!r} "
                         f"(tasks: {task_names(state)})")
    backbone = {k: v.copy() for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    return {**backbone, **head}


def aggregate_fedkd(states: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int],
                    tasks: Sequence[str], previous: Mapping[str, np.ndarray]) -> State:
    """S3 server step over device-shaped states (backbone + own task's head):

        backbone = sum_k w_k backbone_k                 over ALL devices,   w_k = n_k / sum n
        head_t   = sum_{k: task_k = t} w_k^t head_k     over devices of task t only

    Heads of different tasks (different label spaces) are never averaged together; a task
    with no device this round keeps its previous head.
    """
    if not (len(states) == len(num_examples) == len(tasks)) or not states:
        raise ValueError(f"need one task and count per state, got {len(states)} states, "
                         f"{len(num_examples)} counts, {len(tasks)} tasks")
    counts = np.asarray(num_examples, dtype=np.float64)
    if np.any(counts <= 0):
        raise ValueError(f"example counts must be positive, got {list(num_examples)}")

    def mean(group: Sequence[int], key: str) -> np.ndarray:
        weights = counts[list(group)] / counts[list(group)].sum()
        acc = sum(w * states[i][key].astype(np.float64) for w, i in zip(weights, group))
        return np.asarray(acc).astype(states[group[0]][key].dtype)

    everyone = list(range(len(states)))
    out = {k: np.array(v, copy=True) for k, v in previous.items()}
    for key in states[0]:
        if not _is_head_key(key):
            out[key] = mean(everyone, key)
    for task in dict.fromkeys(tasks):
        group = [i for i, t in enumerate(tasks) if t == task]
        for key in states[group[0]]:
            if _is_head_key(key):
                name = f"{HEAD_PREFIX}{task}/{key}"
                if name not in previous:
                    raise ValueError(f"device state has head tensor {key!r} that task "
                                     f"{task!r} lacks in the global state")
                out[name] = mean(group, key)
    return out


# ---------------------------------------------------------------------------- transport
# S3 compression is of UPDATES: the sender ships compress(target - reference) where the
# receiver already holds `reference`; without a reference or with compression off, the
# target itself goes as is (plain keys). Both sides reconstruct with `decode_update`.

NPY_HEADER_BYTES = 128  # np.save's header: what each array costs on the wire beyond its data

def is_compressed(payload: Mapping[str, np.ndarray]) -> bool:
    return any(SEP in key for key in payload)


def encode_update(target: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None,
                  energy: float | None, array_overhead: int = NPY_HEADER_BYTES) -> State:
    """Payload for `target`: compress_update(target - reference, energy) (S3), or the target
    itself when energy is None (compression off) or the receiver holds nothing yet. A matrix
    is sent as SVD factors only if that is smaller on the wire (Flower serialises each array
    with np.save: `array_overhead` bytes of header each)."""
    if energy is None or reference is None:
        return {k: np.array(v, copy=True) for k, v in target.items()}
    if set(target) != set(reference):
        raise ValueError(f"cannot encode an update between states with different keys "
                         f"(e.g. {sorted(set(target) ^ set(reference))[:2]})")
    delta = {k: np.asarray(target[k]) - np.asarray(reference[k]) for k in target}
    return compress_update(delta, energy, array_overhead)


def decode_update(payload: Mapping[str, np.ndarray],
                  reference: Mapping[str, np.ndarray] | None) -> State:
    """The state a payload stands for: reference + decompressed update, or the payload."""
    if not is_compressed(payload):
        return {k: np.array(v, copy=True) for k, v in payload.items()}
    if reference is None:
        raise ValueError("got a compressed update but hold no state to apply it to")
    delta = decompress_update(payload)
    if set(delta) != set(reference):
        raise ValueError(f"update keys do not match the held state "
                         f"(e.g. {sorted(set(delta) ^ set(reference))[:2]})")
    out = {}
    for key, ref in reference.items():
        if delta[key].shape != ref.shape:
            raise ValueError(f"update for {key} has shape {delta[key].shape}, held state "
                             f"{ref.shape}")
        out[key] = (ref + delta[key]).astype(ref.dtype)
    return out
