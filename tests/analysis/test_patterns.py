import numpy as np
import pytest

from plmscope.analysis import patterns


def vec(n, on, value=1.0):
    a = np.zeros(n, np.float32)
    a[list(on)] = value
    return a


CASES = {
    "point": vec(200, [17, 90, 150]),
    "short_motif": vec(200, range(40, 48)),
    "long_motif": vec(300, range(50, 130)),
    "periodic": vec(200, [20, 23, 27, 30, 34, 37, 41, 44]),  # helix-like i, i+3, i+4 ...
    "whole": np.linspace(0.5, 1.0, 150, dtype=np.float32),
}


@pytest.mark.parametrize("expected", sorted(CASES))
def test_each_pattern_is_classified(expected):
    assert patterns.classify_example(CASES[expected]) == expected
    assert patterns.classify_latent([CASES[expected]] * 3)[0] == expected


def test_dead_and_all_zero():
    assert patterns.classify_latent([], is_dead=True)[0] == "dead"
    assert patterns.classify_latent([np.zeros(50)])[0] == "dead"
    assert patterns.classify_example(np.zeros(50)) is None


def test_small_dips_do_not_split_a_domain_and_weak_tails_do_not_count():
    a = vec(300, range(50, 130))
    a[[70, 71, 100]] = 0.0  # dips inside the domain
    a[200:260] = 0.1  # weak tail below 20 % of the peak
    assert patterns.classify_example(a) == "long_motif"


def test_irregular_points_are_not_periodic():
    a = vec(300, [10, 40, 41, 95, 170, 260])
    assert patterns.classify_example(a) == "point"


def test_vote_uses_majority():
    ex = [CASES["periodic"], CASES["periodic"], CASES["point"]]
    pattern, votes = patterns.classify_latent(ex)
    assert pattern == "periodic" and votes == {"periodic": 2, "point": 1}
