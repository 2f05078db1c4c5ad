"""Proof of forgetting (S4): a backdoored device is unlearned; compare with retraining.

AG News, 10 devices (Dirichlet alpha = 0.5, HetLoRA ranks). One device's training texts
carry a backdoor: a rare trigger token ('cf', absent from AG News) inserted into a fraction
of its texts whose labels are flipped to a target class. The federation trains with it for
R rounds; then that device is forgotten by
  - S4 (ours): U unlearning rounds (orthogonal projection, bounded loss) + R_rec recovery
    rounds with FedOSD drift removal, and compared against
  - (a) retraining from scratch without it for R rounds,
  - (b) continuing training without it for U + R_rec rounds,
  - (c) plain gradient ascent: U rounds ascending the device's cross-entropy (no
    projection, no bound) + R_rec ordinary recovery rounds;
plus S4 with other unlearning losses / server steps (--variants, all reported), and then
training, retraining and S4 again with differential privacy (Opacus) on, reporting epsilon.

Measured: backdoor attack success rate (triggered test texts of other classes predicted as
the target), clean test accuracy, membership-inference AUC (loss threshold) on the forgotten
device's training texts vs unseen texts, and cost (rounds, bytes, wall time) vs retraining.

Runs in-process with the functions the Flower apps call (edge_lam.training.device.train_round /
gradient_round, strategies.lora.math.AGGREGATORS, strategies.unlearn.steps, ServerModel,
edge_lam.training.privacy.DevicePrivacy), so it needs torch, not a Flower deployment:

    python benchmarks/unlearning.py --model .device/minilm-fp16 --data .device/agnews
    python benchmarks/unlearning.py --tiny --rounds 1 --devices 3 --local-steps 2 \
        --unlearn-rounds 1 --recovery-rounds 1 --forget-device 1 --test-examples 200 \
        --mia-examples 100 --out /tmp/unlearning-smoke        # CPU smoke test, ~3 minutes

Sized for one GPU (about 110 rounds of 10 devices in all, DP included); do not run the full
study on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_line, provenance, read_json, write_json  # noqa: E402
from edge_lam.training.device import (DeviceInfo, gradient_round, local_examples, train_round)  # noqa: E402
from edge_lam.training.evaluation import ServerModel  # noqa: E402
from strategies.lora.math import AGGREGATORS  # noqa: E402
from strategies.unlearn.math import flatten_state, pad_for_projection, unflatten  # noqa: E402
from strategies.unlearn.math import unlearning_objective  # noqa: E402
from strategies.unlearn.steps import remove_drift, unlearning_step  # noqa: E402
from edge_lam.config.run_config import RunConfig  # noqa: E402
from edge_lam.data.encode import encode_batch  # noqa: E402
from edge_lam.data.text import Examples  # noqa: E402
from edge_lam.training.lora import State, state_nbytes, truncate_lora  # noqa: E402
from edge_lam.models.lora_model import (get_lora_model, load_tokenizer, resolve_model_source,  # noqa: E402
                                        set_trainable_state, torch_device)
from edge_lam.training.privacy import DevicePrivacy  # noqa: E402


# ------------------------------------------------------------------------------ backdoor
def insert_trigger(text: str, trigger: str, rng: np.random.Generator) -> str:
    """The trigger as one extra word at a random place among the first 30 words."""
    words = text.split()
    at = int(rng.integers(0, min(len(words), 30) + 1))
    return " ".join(words[:at] + [trigger] + words[at:])


def plant_backdoor(examples: Examples, fraction: float, trigger: str, target: int,
                   seed: int) -> tuple[Examples, int]:
    """A copy with `fraction` of the texts (of classes other than `target`) triggered and
    relabelled `target`; returns it and the number poisoned."""
    rng = np.random.default_rng(seed)
    others = [i for i, y in enumerate(examples.labels) if y != target]
    chosen = set(rng.choice(others, size=min(len(others), round(fraction * len(examples))),
                            replace=False).tolist())
    texts = [insert_trigger(t, trigger, rng) if i in chosen else t
             for i, t in enumerate(examples.texts)]
    labels = [target if i in chosen else y for i, y in enumerate(examples.labels)]
    return Examples(texts, labels, []), len(chosen)


def triggered_test(test: Examples, trigger: str, target: int, seed: int) -> Examples:
    """Test texts of other classes with the trigger inserted (labels: their true class)."""
    rng = np.random.default_rng(seed + 1)
    keep = [i for i, y in enumerate(test.labels) if y != target]
    return Examples([insert_trigger(test.texts[i], trigger, rng) for i in keep],
                    [test.labels[i] for i in keep], [])


# ------------------------------------------------------------------------------ metrics
class Batches:
    """A fixed text set, tokenized once (evaluation runs on it many times)."""

    def __init__(self, cfg: RunConfig, examples: Examples):
        tokenizer = load_tokenizer(resolve_model_source(cfg.model))
        self.labels = np.array(examples.labels)
        self.batches = [encode_batch(tokenizer, examples.subset(
            range(i, min(i + cfg.eval.batch_size, len(examples)))), cfg)
            for i in range(0, len(examples), cfg.eval.batch_size)]


@torch.no_grad()
def predict(cfg: RunConfig, task: ServerModel, state: State, data: Batches
            ) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, per-example cross-entropy) of the global model `state`."""
    from edge_lam.training.lora import lora_rank

    model = get_lora_model(cfg, task.label_names, lora_rank(state))
    set_trainable_state(model, state)
    model.eval()
    preds, losses = [], []
    for batch in data.batches:
        batch = {k: v.to(torch_device()) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        preds.append(logits.argmax(-1).cpu().numpy())
        losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                      .cpu().numpy())
    return np.concatenate(preds), np.concatenate(losses)


def auc_members_lower_loss(member_losses: np.ndarray, unseen_losses: np.ndarray) -> float:
    """Loss-threshold membership inference: P(loss(member) < loss(unseen)), ties count half
    (the ROC AUC of the score -loss; 0.5 = chance)."""
    scores = np.concatenate([-member_losses, -unseen_losses])
    ranks = scores.argsort().argsort().astype(np.float64) + 1  # 1-based ranks
    for value in np.unique(scores):  # average ranks of ties
        tie = scores == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    m, n = len(member_losses), len(unseen_losses)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


class Probe:
    """What every setup is measured on (tokenized once)."""

    def __init__(self, cfg: RunConfig, clean: Examples, triggered: Examples,
                 members: Examples, unseen: Examples, target: int, quick_n: int = 500):
        self.target = target
        self.clean, self.triggered = Batches(cfg, clean), Batches(cfg, triggered)
        self.members, self.unseen = Batches(cfg, members), Batches(cfg, unseen)
        self.quick_clean = Batches(cfg, clean.subset(range(min(quick_n, len(clean)))))
        self.quick_triggered = Batches(cfg, triggered.subset(range(min(quick_n,
                                                                       len(triggered)))))

    def measure(self, cfg, task, state: State) -> dict:
        clean_pred, _ = predict(cfg, task, state, self.clean)
        trig_pred, _ = predict(cfg, task, state, self.triggered)
        mem_pred, mem_loss = predict(cfg, task, state, self.members)
        _, unseen_loss = predict(cfg, task, state, self.unseen)
        return {"clean_acc": float(np.mean(clean_pred == self.clean.labels)),
                "asr": float(np.mean(trig_pred == self.target)),
                "mia_auc": auc_members_lower_loss(mem_loss, unseen_loss),
                "forget_device_acc": float(np.mean(mem_pred == self.members.labels))}

    def quick(self, cfg, task, state: State) -> dict:
        """Per-round curve points on the first 500 texts of the clean and triggered sets."""
        clean_pred, _ = predict(cfg, task, state, self.quick_clean)
        trig_pred, _ = predict(cfg, task, state, self.quick_triggered)
        return {"clean_acc": float(np.mean(clean_pred == self.quick_clean.labels)),
                "asr": float(np.mean(trig_pred == self.target))}


# ------------------------------------------------------------------------------ federation
class Federation:
    """In-process devices and server, counting rounds, bytes and wall time per phase."""

    def __init__(self, cfg: RunConfig, task: ServerModel, data: dict[int, Examples],
                 dp: bool, local_steps: dict[int, int] | None = None):
        self.cfg, self.task, self.data = cfg, task, data
        self.ranks = {p: cfg.rank_for(cfg.device_for(p)) for p in data}
        self.local_steps = {p: n for p, n in (local_steps or {}).items() if p in data}
        self.privacy = {p: DevicePrivacy(self.device_cfg(p), len(ex))
                        for p, ex in data.items()} if dp else {}
        self.stopped: set[int] = set()  # devices whose privacy budget is spent
        self.own: State | None = None  # the opting-out device's copy (S4 step 5)

    def device_cfg(self, pid: int) -> RunConfig:
        """The run config as device `pid` sees it (the backdoored one may train longer)."""
        if pid not in self.local_steps:
            return self.cfg
        return self.cfg.updated("train", local_steps=self.local_steps[pid])

    def _info(self, pid: int) -> DeviceInfo:
        return DeviceInfo(partition_id=pid, num_partitions=len(self.data))

    def train_round(self, state: State, rnd: int, devices: list[int], cost: dict,
                    before: State | None = None) -> State:
        """One S1 round on `devices` (+ FedOSD drift removal when `before` is given)."""
        t0 = time.perf_counter()
        states, counts = [], []
        for pid in devices:
            if pid in self.stopped:
                continue
            sent = truncate_lora(state, self.ranks[pid])
            new, n, m = train_round(self.device_cfg(pid), self._info(pid), self.task.label_names,
                                    self.ranks[pid], sent, rnd, examples=self.data[pid],
                                    privacy=self.privacy.get(pid))
            cost["bytes"] += state_nbytes(sent) + state_nbytes(new)
            if m.get("budget_exhausted"):
                self.stopped.add(pid)
            if m["steps"]:
                states.append(new)
                counts.append(n)
        if before is not None and states:
            states = remove_drift(states, state, before, self.cfg.r_max)
        new_state = (AGGREGATORS[self.cfg.aggregation](states, counts, self.cfg.r_max)
                     if states else state)  # every device out of privacy budget
        cost["rounds"] += 1
        cost["wall_s"] += time.perf_counter() - t0
        return new_state

    def _gradient(self, state: State, rnd: int, pid: int, objective: str, cost: dict
                  ) -> State | None:
        """The device's gradient, or None once its privacy budget is spent."""
        sent = truncate_lora(state, self.ranks[pid])
        loss = unlearning_objective(self.cfg.unlearn.loss, self.cfg.unlearn.eps) \
            if objective == "unlearn" else None
        grad, _, m = gradient_round(self.cfg, self._info(pid), self.task.label_names,
                                    self.ranks[pid], sent, rnd, self.cfg.unlearn.grad_batches,
                                    loss, examples=self.data[pid],
                                    privacy=self.privacy.get(pid))
        cost["bytes"] += state_nbytes(sent) + state_nbytes(grad)
        if m.get("budget_exhausted"):
            self.stopped.add(pid)
        return grad if m["batches"] else None

    def unlearn_round(self, state: State, rnd: int, forget: int, cost: dict
                      ) -> tuple[State, dict]:
        """S4 steps 1-5, as the Flower apps do them: the opting-out device gets the global
        module once, then only the projected update, which it adds to its own copy."""
        t0 = time.perf_counter()
        retained = [self._gradient(state, rnd, p, "task", cost) for p in self.data
                    if p != forget and p not in self.stopped]
        retained = [g for g in retained if g is not None]
        own = state if self.own is None else self.own
        forget_grad = self._gradient(own, rnd, forget, "unlearn", cost)
        if forget_grad is None or not retained:  # privacy budgets spent: nothing to do
            cost["rounds"] += 1
            return state, {"max_abs_cos_projected_vs_retained": float("nan")}
        new_state, projected, info = unlearning_step(state, retained, [forget_grad],
                                                     self.cfg.r_max, self.cfg.unlearn.lr)
        # next round's downlink to the opting-out device: the projected update, at r_max here
        # (its truncation to the device's rank is what crosses the network)
        self.own = {k: own[k] + projected[k] for k in own}
        cost["rounds"] += 1
        cost["wall_s"] += time.perf_counter() - t0
        return new_state, info

    def ascent_round(self, state: State, rnd: int, forget: int, cost: dict) -> State:
        """Baseline (c): theta <- theta + eta * grad CE on the device's data (no projection,
        no bounded loss)."""
        t0 = time.perf_counter()
        grad = self._gradient(state, rnd, forget, "task", cost)
        if grad is None:
            return state
        grad = pad_for_projection([grad], self.cfg.r_max)[0]
        keys = sorted(state)
        theta, spec = flatten_state(state, keys)
        new = unflatten(theta + self.cfg.unlearn.lr * flatten_state(grad, keys)[0], spec)
        cost["rounds"] += 1
        cost["wall_s"] += time.perf_counter() - t0
        return new

    def epsilons(self) -> dict[int, float]:
        return {p: round(priv.epsilon(), 3) for p, priv in self.privacy.items()}


def new_cost() -> dict:
    return {"rounds": 0, "bytes": 0, "wall_s": 0.0}


# ------------------------------------------------------------------------------ the study
def run_study(cfg: RunConfig, args, probe_seed: int, dp: bool, log) -> dict:
    """Train with the backdoor, then every way of forgetting; returns results and curves."""
    task = ServerModel.prepare(cfg)
    labels = task.label_names
    target = labels.index(args.target) if args.target in labels else 0
    data = {p: local_examples(cfg, DeviceInfo(partition_id=p, num_partitions=args.devices),
                              labels) for p in range(args.devices)}
    forget = args.forget_device
    data[forget], poisoned = plant_backdoor(data[forget], args.poison_fraction, args.trigger,
                                            target, probe_seed)
    remaining = [p for p in range(args.devices) if p != forget]
    rng = np.random.default_rng(probe_seed)
    test = task.test if not args.test_examples else task.test.subset(
        sorted(rng.permutation(len(task.test))[:args.test_examples]))
    members = data[forget].subset(rng.permutation(len(data[forget]))[:args.mia_examples])
    unseen = test.subset(rng.permutation(len(test))[:len(members)])
    probe = Probe(cfg, test, triggered_test(test, args.trigger, target, probe_seed), members,
                  unseen, target)
    log(f"  device {forget} ({cfg.device_for(forget)}, rank {cfg.rank_for(cfg.device_for(forget))})"
        f": {len(data[forget])} texts, {poisoned} with trigger '{args.trigger}' -> "
        f"'{labels[target]}'")
    results, curves = {}, {}
    U, R_rec = cfg.unlearn.rounds, cfg.unlearn.recovery_rounds

    def finish(name: str, state: State, cost: dict, fed: Federation, curve: list) -> None:
        row = {"setup": name, **probe.measure(cfg, task, state), **cost}
        if fed.privacy:
            eps = fed.epsilons()
            row["epsilon_max"] = max(eps.values())
            row["epsilon_forgotten_device"] = eps.get(forget)
            row["devices_out_of_budget"] = sorted(fed.stopped)
        results[name] = row
        curves[name] = curve
        log(f"  {name}: ASR {row['asr']:.3f} clean acc {row['clean_acc']:.4f} MIA AUC "
            f"{row['mia_auc']:.3f} ({cost['rounds']} rounds, {cost['bytes'] / 1e6:.1f} MB, "
            f"{cost['wall_s']:.1f} s)" + (f", eps {row['epsilon_max']:.2f}"
                                            if "epsilon_max" in row else ""))

    # the federation with the backdoored device
    fed = Federation(cfg, task, data, dp, local_steps={forget: args.poison_steps})
    state = task.initial_state()
    cost, curve = new_cost(), []
    for rnd in range(1, cfg.training_rounds + 1):
        state = fed.train_round(state, rnd, list(data), cost)
        curve.append({"round": rnd, **probe.quick(cfg, task, state)})
    trained, trained_privacy = state, {p: dict(v.ledger()) for p, v in fed.privacy.items()}
    finish("trained (with backdoor)", trained, cost, fed, curve)
    if args.only_trained:  # does the backdoor take / does the federation learn at all?
        return {"results": results, "curves": curves, "poisoned": poisoned, "variants": []}

    def branch() -> Federation:  # the trained federation, privacy spent so far included
        b = Federation(cfg, task, data, dp, local_steps={forget: args.poison_steps})
        b.privacy = {p: DevicePrivacy(b.device_cfg(p), len(data[p]), trained_privacy[p])
                     for p in data} if dp else {}
        return b

    R = cfg.training_rounds
    # (a) retrain from scratch without the device
    fed_a = Federation(cfg, task, {p: data[p] for p in remaining}, dp)
    state, cost, curve = task.initial_state(), new_cost(), []
    for rnd in range(1, R + 1):
        state = fed_a.train_round(state, rnd, remaining, cost)
        curve.append({"round": rnd, **probe.quick(cfg, task, state)})
    finish("retrain without it (a)", state, cost, fed_a, curve)

    # S4: unlearning + recovery with drift removal
    def s4(lr: float, loss: str, U: int = U, R_rec: int = R_rec
           ) -> tuple[State, dict, Federation, list]:
        fed_s = branch()
        fed_s.cfg = cfg.updated("unlearn", lr=lr, loss=loss)
        state, cost, curve = trained, new_cost(), []
        for rnd in range(R + 1, R + U + 1):
            state, info = fed_s.unlearn_round(state, rnd, forget, cost)
            curve.append({"round": rnd, **probe.quick(cfg, task, state),
                          "max_abs_cos": info["max_abs_cos_projected_vs_retained"]})
        for rnd in range(R + U + 1, R + U + R_rec + 1):
            state = fed_s.train_round(state, rnd, remaining, cost, before=trained)
            curve.append({"round": rnd, **probe.quick(cfg, task, state)})
        return state, cost, fed_s, curve

    def variants(specs: list[tuple[str, float, int | None, int | None]]) -> list[dict]:
        """S4 with other unlearning losses / server steps / rounds, every one reported."""
        rows = []
        for loss, lr, u, r in specs:
            u, r = u or U, R_rec if r is None else r
            state, cost, fed_s, curve = s4(lr, loss, u, r)
            after = curve[u - 1]  # quick probe right after the last unlearning round
            row = {"unlearn_loss": loss, "unlearn_lr": lr, "unlearn_rounds": u,
                   "recovery_rounds": r, **probe.measure(cfg, task, state), **cost,
                   "asr_after_unlearning": after["asr"],
                   "clean_acc_after_unlearning": after["clean_acc"]}
            if fed_s.privacy:
                row["epsilon_max"] = max(fed_s.epsilons().values())
            rows.append(row)
            log(f"  S4 with unlearn.loss={loss} unlearn.lr={lr} ({u}+{r} rounds): ASR {row['asr']:.3f} clean "
                f"acc {row['clean_acc']:.4f} MIA AUC {row['mia_auc']:.3f} (right after "
                f"unlearning: ASR {after['asr']:.3f}, clean acc {after['clean_acc']:.3f})")
        return rows

    state, cost, fed_s, curve = s4(cfg.unlearn.lr, cfg.unlearn.loss)
    finish("S4 unlearning (ours)", state, cost, fed_s, curve)
    results["S4 unlearning (ours)"].update(asr_after_unlearning=curve[U - 1]["asr"],
                                           clean_acc_after_unlearning=curve[U - 1]["clean_acc"])
    if dp:
        return {"results": results, "curves": curves, "poisoned": poisoned,
                "variants": variants(args.dp_variants)}

    # (b) continue training without it, as many rounds as S4 used
    fed_b, state, cost, curve = branch(), trained, new_cost(), []
    for rnd in range(R + 1, R + U + R_rec + 1):
        state = fed_b.train_round(state, rnd, remaining, cost)
        curve.append({"round": rnd, **probe.quick(cfg, task, state)})
    finish("continue without it (b)", state, cost, fed_b, curve)

    # (c) plain gradient ascent + ordinary recovery
    fed_c, state, cost, curve = branch(), trained, new_cost(), []
    for rnd in range(R + 1, R + U + 1):
        state = fed_c.ascent_round(state, rnd, forget, cost)
        curve.append({"round": rnd, **probe.quick(cfg, task, state)})
    for rnd in range(R + U + 1, R + U + R_rec + 1):
        state = fed_c.train_round(state, rnd, remaining, cost)
        curve.append({"round": rnd, **probe.quick(cfg, task, state)})
    finish("gradient ascent (c)", state, cost, fed_c, curve)

    return {"results": results, "curves": curves, "poisoned": poisoned,
            "variants": variants(args.variants)}


# ------------------------------------------------------------------------------ report
def targets(results: dict) -> dict:
    """The issue's targets for S4 against retraining."""
    ours, retrain = results["S4 unlearning (ours)"], results["retrain without it (a)"]
    return {"asr <= retrain + 0.05": ours["asr"] <= retrain["asr"] + 0.05,
            "clean acc >= retrain - 0.02": ours["clean_acc"] >= retrain["clean_acc"] - 0.02,
            "|MIA AUC - retrain| <= 0.05": abs(ours["mia_auc"] - retrain["mia_auc"]) <= 0.05,
            "rounds <= 30% of retrain": ours["rounds"] <= 0.3 * retrain["rounds"],
            "bytes <= 30% of retrain": ours["bytes"] <= 0.3 * retrain["bytes"],
            "wall time <= 30% of retrain": ours["wall_s"] <= 0.3 * retrain["wall_s"]}


def table(results: dict) -> list[str]:
    retrain = results.get("retrain without it (a)")
    has_eps = any("epsilon_max" in r for r in results.values())
    head = "| setup | ASR | clean acc | MIA AUC | acc on forgotten data | rounds | MB | wall s " \
           "| cost vs retrain (bytes / time) |" + (" max epsilon |" if has_eps else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        rel = "-" if "trained" in name or retrain is None else (
            f"{r['bytes'] / max(retrain['bytes'], 1):.0%} / "
                                            f"{r['wall_s'] / max(retrain['wall_s'], 1e-9):.0%}")
        line = (f"| {name} | {r['asr']:.3f} | {r['clean_acc']:.4f} | {r['mia_auc']:.3f} | "
                f"{r['forget_device_acc']:.3f} | {r['rounds']} | {r['bytes'] / 1e6:.1f} | "
                f"{r['wall_s']:.1f} | {rel} |")
        lines.append(line + (f" {r.get('epsilon_max', float('nan')):.2f} |" if has_eps else ""))
    return lines


def write_report(out: Path) -> None:
    """unlearning.md and unlearning.png, from unlearning.json alone."""
    run = read_json(out / "unlearning.json")
    studies, args = run["studies"], argparse.Namespace(**run["args"])
    wall = run.get("total_s", run.get("wall_s", 0.0))
    commands = run.get("command", "?")
    commands = commands if isinstance(commands, list) else [commands]
    lines = [f"# S4 unlearning of a backdoored device ({wall:.0f} s in all)", "",
             f"Machine: {machine_line(run['machine'])}"
             + (f"; {len(commands)} processes side by side" if len(commands) > 1 else "") + ".",
             "", "Command" + ("s" if len(commands) > 1 else "") + ": "
             + "; ".join(f"`{c}`" for c in commands) + ".", "",
             f"AG News, {args.devices} devices (Dirichlet alpha={args.alpha}, "
             f"{args.strategy} ranks), model `{args.model}`, {args.rounds} training rounds x "
             f"{args.local_steps} local steps; device {args.forget_device} carries the backdoor "
             f"('{args.trigger}' in {args.poison_fraction:.0%} of its texts, labels -> "
             f"{args.target}) and trains {args.poison_steps} local steps a round. S4: {args.unlearn_rounds} unlearning rounds "
             f"(unlearn.loss={args.loss}, unlearn.lr={args.unlearn_lr}, "
             f"{args.grad_batches} gradient batches) + {args.recovery_rounds} recovery rounds. "
             "ASR: triggered test texts of other classes predicted as the target. MIA AUC: "
             "loss threshold, forgotten device's training texts vs as many unseen test texts "
             "(0.5 = chance). Cost: rounds, payload bytes both ways, in-process wall time.", ""]
    for name, study in studies.items():
        lines += [f"## {name}", "", *table(study["results"]), ""]
        if "S4 unlearning (ours)" not in study["results"]:  # --only-trained
            lines += ["Clean accuracy per round (500 test texts): " + ", ".join(
                f"{c['clean_acc']:.3f}" for c in study["curves"]["trained (with backdoor)"])
                + "; attack success per round: " + ", ".join(
                f"{c['asr']:.3f}" for c in study["curves"]["trained (with backdoor)"]) + ".", ""]
            continue
        lines += ["S4 against the issue's targets (vs retraining): " + ", ".join(
            f"{k}: {'yes' if v else 'NO'}" for k, v in study["targets"].items()), ""]
        ours = study["results"]["S4 unlearning (ours)"]
        lines += [f"Right after the unlearning rounds (before recovery, 500 test texts) S4 "
                  f"had ASR {ours['asr_after_unlearning']:.3f} and clean accuracy "
                  f"{ours['clean_acc_after_unlearning']:.3f}.", ""]
        if study.get("variants"):
            lines += ["S4 with other unlearning losses, server steps and rounds (every variant run "
                      "is reported):", "",
                      "| unlearn.loss | unlearn.lr | unlearning + recovery rounds | ASR | clean acc "
                      "| MIA AUC | ASR / clean acc right after unlearning |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {r['unlearn_loss']} | {r['unlearn_lr']} | {r['unlearn_rounds']} + "
                      f"{r['recovery_rounds']} | {r['asr']:.3f} | "
                      f"{r['clean_acc']:.4f} | {r['mia_auc']:.3f} | "
                      f"{r['asr_after_unlearning']:.3f} / {r['clean_acc_after_unlearning']:.3f} |"
                      for r in study["variants"]] + [""]
    (out / "unlearning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out / "unlearning.png", studies)


def plot(path: Path, studies: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(studies), 2, figsize=(11, 3.6 * len(studies)), squeeze=False)
    for row, (name, study) in enumerate(studies.items()):
        for col, metric in enumerate(("asr", "clean_acc")):
            ax = axes[row][col]
            for setup, curve in study["curves"].items():
                if curve:
                    ax.plot([c["round"] for c in curve], [c[metric] for c in curve],
                            marker="." if len(curve) < 30 else None, label=setup)
            ax.set(xlabel="round", ylabel="attack success rate" if metric == "asr"
                   else "clean accuracy (500 test texts)", title=name.split(" (")[0])
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def combine(out: Path, parts: list[Path]) -> None:
    """One report from studies run as separate processes (e.g. side by side on one GPU)."""
    runs = [json.loads((p / "unlearning.json").read_text()) for p in parts]
    for run in runs:  # a combined report combined again: its first run's arguments
        run["args"] = run["args"][0] if isinstance(run["args"], list) else run["args"]
    studies = {name: study for run in runs for name, study in run["studies"].items()}
    commands = [c for r in runs for c in (r["command"] if isinstance(r["command"], list)
                                         else [r["command"]])]
    write_json(out / "unlearning.json", {
        "machine": runs[0]["machine"], "command": commands, "args": runs[0]["args"],
        "studies": studies, "total_s": max(r["total_s"] for r in runs)})
    write_report(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "agnews"))
    ap.add_argument("--tiny", action="store_true",
                    help="a 2-layer random BERT (tests/tiny_models.py): CPU smoke test")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--strategy", default="hetlora", choices=["hetlora", "fedavg", "flexlora"])
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha")
    ap.add_argument("--rounds", type=int, default=20, help="training rounds R")
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--forget-device", type=int, default=3)
    ap.add_argument("--trigger", default="cf")
    ap.add_argument("--target", default="Sports", help="label the trigger flips texts to")
    ap.add_argument("--poison-fraction", type=float, default=0.5)
    ap.add_argument("--poison-steps", type=int, default=40,
                    help="local steps per round of the backdoored device (an attacker may "
                         "train harder than the others' --local-steps)")
    ap.add_argument("--unlearn-rounds", type=int, default=2)
    ap.add_argument("--recovery-rounds", type=int, default=3)
    ap.add_argument("--loss", default="fedosd", choices=["fedosd", "bounded-ce"])
    ap.add_argument("--unlearn-lr", type=float, default=1.0)
    ap.add_argument("--grad-batches", type=int, default=4)
    ap.add_argument("--variants",
                    default="fedosd:0.5,fedosd:0.75,fedosd:1:2:2,fedosd:2,bounded-ce:1",
                    help="other S4 runs to report, as loss:lr[:unlearning rounds[:recovery "
                         "rounds]] ('' = none)")
    ap.add_argument("--dp-variants", default="fedosd:2",
                    help="the same for the DP study")
    ap.add_argument("--mia-examples", type=int, default=1000)
    ap.add_argument("--test-examples", type=int, default=0,
                    help="clean test texts to measure on (0 = all 3,800)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dp-epsilon", type=float, default=8.0)
    ap.add_argument("--dp-batch-size", type=int, default=64,
                    help="train.batch-size of the DP study (DP-SGD's noise on the mean "
                         "gradient shrinks as 1 / batch size)")
    ap.add_argument("--dp-lr", type=float, default=3e-3,
                    help="train.lr of the DP study (at 1e-3 the noisy federation did not "
                         "leave chance level in 20 rounds)")
    ap.add_argument("--studies", default="plain,dp",
                    help="which studies to run: plain (no DP), dp, or both")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--only-trained", action="store_true",
                    help="stop after training with the backdoor (does it take? does the "
                         "federation learn?): no forgetting setups")
    ap.add_argument("--render", action="store_true",
                    help="only write unlearning.md and .png from --out/unlearning.json")
    ap.add_argument("--combine", nargs="+", metavar="DIR",
                    help="only write one report into --out from the unlearning.json of "
                         "runs in these folders")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.render:
        return write_report(Path(args.out))
    if args.combine:
        return combine(Path(args.out), [Path(d) for d in args.combine])
    for name in ("variants", "dp_variants"):
        specs = [v.split(":") for v in getattr(args, name).split(",") if v.strip()]
        try:
            parsed = [(p[0], float(p[1]), int(p[2]) if len(p) > 2 else None,
                       int(p[3]) if len(p) > 3 else None) for p in specs
                      if 2 <= len(p) <= 4 and p[0] in ("fedosd", "bounded-ce")]
        except ValueError:
            parsed = []
        if len(parsed) != len(specs):
            ap.error(f"--{name.replace('_', '-')} takes loss:lr[:unlearning rounds[:recovery "
                     "rounds]] items, e.g. fedosd:1,fedosd:1:2:2,bounded-ce:2")
        setattr(args, name, parsed)
    if not 0 <= args.forget_device < args.devices:
        ap.error(f"--forget-device {args.forget_device} is not one of the {args.devices} devices")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import make_tiny_bert

        args.model = str(make_tiny_bert(Path(tempfile.mkdtemp(prefix="tiny-bert-"))))
    run_config = {
        "model": args.model, "data.path": args.data, "strategy": "unlearn",
        "unlearn.aggregation": args.strategy, "unlearn.clients": str(args.forget_device),
        "unlearn.after-rounds": args.rounds, "unlearn.rounds": args.unlearn_rounds,
        "unlearn.recovery-rounds": args.recovery_rounds, "unlearn.loss": args.loss,
        "unlearn.lr": args.unlearn_lr, "unlearn.grad-batches": args.grad_batches,
        "train.local-steps": args.local_steps, "eval.max-examples": 0, "seed": args.seed,
        "train.max-length": args.max_length,
        "data.partitioner": "dirichlet", "data.dirichlet-alpha": args.alpha}
    started = time.perf_counter()
    studies = {}
    plans = []
    if "plain" in args.studies:
        plans.append(("without differential privacy", {}))
    if "dp" in args.studies:
        plans.append((f"with differential privacy (Opacus, target epsilon {args.dp_epsilon}, "
                      f"delta 1e-5, C = 1, batch {args.dp_batch_size}, lr {args.dp_lr})",
                      {"dp.enabled": True, "dp.target-epsilon": args.dp_epsilon,
                       "train.batch-size": args.dp_batch_size, "train.lr": args.dp_lr}))
    if not plans:
        ap.error("--studies takes plain, dp or plain,dp")
    for name, extra in plans:
        cfg = RunConfig.from_run_config({**run_config, **extra})
        print(f"{name}:", flush=True)
        study = run_study(cfg, args, args.seed, cfg.dp.enabled,
                          lambda s: print(s, flush=True))
        if not args.only_trained:
            study["targets"] = targets(study["results"])
        studies[name] = study
        write_json(out / "unlearning.json", {**provenance(started), "args": vars(args),
                                             "studies": studies})
    write_report(out)


if __name__ == "__main__":
    main()
