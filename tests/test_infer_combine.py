"""Every way of combining members' answers (server_app.infer.combine) against hand-computed
cases."""

from __future__ import annotations

import numpy as np
import pytest

from server_app.infer.combine import (agreement, candidate_votes, cascade, confidence,
                                      geometric_probs, log_odds_weights, majority_vote,
                                      mean_probs, trust_update, trust_weights, weighted_vote)
from server_app.infer.report import Answers, generated_votes

# 3 members, 2 queries, 3 classes
P = np.array([
    [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]],  # member 0: labels 0, 1
    [[0.1, 0.8, 0.1], [0.1, 0.2, 0.7]],  # member 1: labels 1, 2
    [[0.5, 0.4, 0.1], [0.3, 0.3, 0.4]],  # member 2: labels 0, 2
])
ALL = np.ones((3, 2), dtype=bool)


def test_votes():
    assert majority_vote(P, ALL).tolist() == [0, 2]
    # member 1 weighs more than members 0 and 2 together on query 0
    assert weighted_vote(P, ALL, np.array([1.0, 3.0, 1.0])).tolist() == [1, 2]
    # a failed answer counts nowhere: without member 2, query 1 is a 1-1 tie -> lowest id
    valid = ALL.copy()
    valid[2] = False
    assert majority_vote(P, valid).tolist() == [0, 1]
    # nobody answered query 0
    valid = np.array([[False, True], [False, True], [False, True]])
    assert majority_vote(P, valid).tolist() == [-1, 2]


def test_probability_averages():
    np.testing.assert_allclose(mean_probs(P, ALL)[0], [0.4, 0.5, 0.1])
    np.testing.assert_allclose(mean_probs(P, ALL, np.array([2.0, 1.0, 1.0]))[0],
                               [(1.2 + 0.1 + 0.5) / 4, (0.6 + 0.8 + 0.4) / 4, 0.1])
    valid = ALL.copy()
    valid[1, 0] = False  # member 1 failed on query 0: the mean of members 0 and 2
    np.testing.assert_allclose(mean_probs(P, valid)[0], [0.55, 0.35, 0.1])
    g = geometric_probs(P, ALL)[0]
    raw = np.cbrt([0.6 * 0.1 * 0.5, 0.3 * 0.8 * 0.4, 0.1 * 0.1 * 0.1])
    np.testing.assert_allclose(g, raw / raw.sum())
    assert g.argmax() == 1 and mean_probs(P, ALL)[0].argmax() == 1


def test_trust():
    consensus = np.array([0, 2])
    np.testing.assert_allclose(agreement(P, ALL, consensus), [0.5, 0.5, 1.0])
    valid = ALL.copy()
    valid[0] = False
    agree = agreement(P, valid, consensus)
    assert np.isnan(agree[0])
    t = trust_update(np.array([0.8, 1.0, 0.5]), agree, rate=0.5)
    np.testing.assert_allclose(t, [0.8, 0.75, 0.75])  # member 0 answered nothing: unchanged
    np.testing.assert_allclose(trust_weights(np.array([0.9, 0.2]), np.array([1.0, 0.0]),
                                             alpha=0.5, beta=1.0), [1.45, 0.1])


def test_an_adversary_loses_trust_round_after_round():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=(10, 50))
    trust = np.ones(4)
    for batch in truth:  # 3 honest members (80% right) and one always wrong
        probs = np.zeros((4, 50, 3))
        for i in range(3):
            right = rng.random(50) < 0.8
            labels = np.where(right, batch, (batch + 1) % 3)
            probs[i, np.arange(50), labels] = 1.0
        probs[3, np.arange(50), (batch + 2) % 3] = 1.0
        consensus = weighted_vote(probs, np.ones((4, 50), bool), trust)
        trust = trust_update(trust, agreement(probs, np.ones((4, 50), bool), consensus), 0.3)
    assert trust[3] < 0.05 and trust[:3].min() > 0.7


def test_confidence_kinds():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    np.testing.assert_allclose(confidence(p, "max"), [0.7, 0.4])
    np.testing.assert_allclose(confidence(p, "margin"), [0.5, 0.05])
    ent = (p * np.log(p)).sum(axis=1)
    np.testing.assert_allclose(confidence(p, "entropy"), ent)
    assert confidence(p, "entropy")[0] > confidence(p, "entropy")[1]
    with pytest.raises(ValueError, match="max, margin, entropy"):
        confidence(p, "variance")


def test_cascade_escalates_only_the_unsure_queries():
    small = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8]])  # sure, unsure, sure
    large = np.array([[0.1, 0.9], [0.1, 0.9], [0.1, 0.9]])
    costs = np.array([[1.0, 1.0, 1.0], [10.0, 10.0, 10.0]])
    labels, by, cost = cascade([small, large], [0.7], costs)
    assert labels.tolist() == [0, 1, 1] and by.tolist() == [0, 1, 0]
    assert cost.tolist() == [1.0, 11.0, 1.0]  # the escalated query paid both stages
    # threshold 0: never escalate; above 1: always
    assert cascade([small, large], [0.0], costs)[2].sum() == 3.0
    labels, by, cost = cascade([small, large], [1.01], costs)
    assert labels.tolist() == [1, 1, 1] and cost.sum() == 33.0


def test_the_cascade_report_adds_members_cheapest_first():
    from server_app.infer.report import Answers, Knobs, summarise

    truth = np.array([0, 1, 0, 1, 0, 1])
    sure = np.array([[0.95, 0.05], [0.05, 0.95]] * 3)  # always right, always sure
    unsure = np.array([[0.6, 0.4], [0.6, 0.4]] * 3)  # says 0, unsure: wrong on odd queries
    # member 0 (cheap, unsure), member 1 (costly, sure)
    ans = Answers(["cheap", "costly"], np.stack([unsure, sure]), np.ones((2, 6), bool),
                  np.array([[1.0] * 6, [9.0] * 6]), np.array([0, 0, 1, 1, 2, 2]))
    report = summarise(ans, truth, Knobs(calibration=2, cascade_loss=0.0))
    cas = report["cascade"]
    assert cas["order"] == ["cheap", "costly"]
    assert cas["everyone"]["seconds_per_query"] == 10.0 and cas["everyone"]["accuracy"] == 1.0
    # 0.6 is never sure enough to match everyone's calibration accuracy: all escalate
    assert cas["chosen"]["accuracy"] == 1.0 and cas["saved_share"] == pytest.approx(0.0)
    assert cas["costliest_alone"] == {"member": "costly", "accuracy": 1.0,
                                      "seconds_per_query": 9.0}
    members = {m["member"]: m for m in report["members"]}
    assert members["cheap"]["accuracy"] == 0.5 and members["costly"]["calibration_accuracy"] == 1


def test_equally_cheap_members_are_asked_best_first():
    from server_app.infer.report import cheapest_first

    seconds = np.array([[1.0, 1.0], [1.05, 1.05], [3.0, 3.0], [np.nan, np.nan]])
    assert cheapest_first(seconds).tolist() == [0, 1, 2, 3]
    # within 10% of each other: the better one first; a member that never answered: last
    assert cheapest_first(seconds, np.array([0.5, 0.9, 1.0, 1.0])).tolist() == [1, 0, 2, 3]


def test_log_odds_weights_silence_members_at_chance():
    w = log_odds_weights(np.array([0.9, 0.25, 0.1, 0.5]), k=4)
    np.testing.assert_allclose(w, [np.log(0.9 * 3 / 0.1), 0.0, 0.0, np.log(3.0)])
    # two members at 0.6 outvote one at 0.9 by majority, not by log-odds (binary labels)
    probs = np.array([[[0.9, 0.1]], [[0.9, 0.1]], [[0.1, 0.9]]])
    valid = np.ones((3, 1), bool)
    assert majority_vote(probs, valid).tolist() == [0]
    w = log_odds_weights(np.array([0.6, 0.6, 0.9]), k=2)  # 0.405 + 0.405 < 2.197
    assert weighted_vote(probs, valid, w).tolist() == [1]


def test_members_that_all_weigh_nothing_fall_back_to_one_vote_each():
    probs = np.array([[[0.9, 0.1]], [[0.2, 0.8]], [[0.3, 0.7]]])
    valid = np.ones((3, 1), bool)
    assert weighted_vote(probs, valid, np.zeros(3)).tolist() == [1]  # majority, not label 0
    valid[1:] = False  # the only member that answered weighs 0: its vote still counts
    assert weighted_vote(probs, valid, np.array([0.0, 5.0, 5.0])).tolist() == [0]


def test_generated_answers_become_votes_over_their_candidates():
    # 3 members (K = 4 slots), 3 queries
    keys = [["5", "3", None], ["5", "4", None], ["7", None, "8"]]
    conf = np.array([[0.4, 0.8, 0.9], [0.4, 0.9, 0.9], [0.99, 0.1, 0.6]])
    valid = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], bool)
    probs, truth = candidate_votes(keys, conf, valid, ["5", "4", "8"])
    # query 0: "5" (members 0, 1) is slot 0, "7" slot 1; the reference "5" is slot 0
    np.testing.assert_allclose(probs[0, 0], [0.4, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(probs[2, 0], [0.01 / 3, 0.99, 0.01 / 3, 0.01 / 3])
    assert truth.tolist() == [0, -1, 2]  # query 1: nobody answered "4" (member 1 failed)
    # query 1: member 1 failed (uniform, no candidate); "none" is member 2's own slot, and
    # its confidence 0.1 < 1/K is raised to 1/K + 1e-6 so its top slot stays its own
    np.testing.assert_allclose(probs[1, 1], [0.25] * 4)
    assert probs[2, 1].argmax() == 1 and probs[2, 1, 1] == pytest.approx(0.25 + 1e-6)
    # query 2: two members without a number do not agree with each other
    assert probs[0, 2].argmax() == 0 and probs[1, 2].argmax() == 1 and probs[2, 2].argmax() == 2
    # majority picks "5" in query 0; the confidence-weighted mean picks the sure "7":
    # 0.4 + 0.4 + 0.01 / 3 < 0.2 + 0.2 + 0.99
    assert majority_vote(probs, valid)[0] == 0 and mean_probs(probs, valid)[0].argmax() == 1


def test_generated_votes_compare_final_numbers_and_set_the_chance_level():
    texts = np.array([["so 2+3=5\n#### 5", "It is 1,200 dollars."],
                      ["#### 5.0", "#### 1200"]], dtype=object)
    ans = Answers(["a", "b"], np.zeros((2, 2, 0)), np.ones((2, 2), bool), np.ones((2, 2)),
                  np.array([0, 0]), texts=texts, conf=np.array([[0.9, 0.8], [0.7, 0.6]]))
    truth = generated_votes(ans, ["x\n#### 5", "y\n#### 1,200"], calibration=2)
    # both members agree on each query (5 == 5.0, 1,200 == 1200): one candidate, slot 0
    assert truth.tolist() == [0, 0] and ans.probs.shape == (2, 2, 3)
    assert (ans.probs.argmax(axis=2) == 0).all() and ans.classes == 2
