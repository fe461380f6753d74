"""Glued results: rounded for stable stored outputs, readable spreads, silent without myst-nb."""

import builtins
import math

import numpy as np
import pytest
import torch

from attn_course.report import glue, significant, spread


def test_significant_rounds_to_digits_and_keeps_special_values():
    assert significant(0.123456789) == 0.1235
    assert significant(123456.0, 2) == 120000.0
    assert significant(-3.14159e-12, 3) == -3.14e-12
    assert significant(0.0) == 0.0 and math.isinf(significant(float("inf"))) and math.isnan(significant(float("nan")))


def test_spread_is_mean_and_range():
    assert spread([0.9, 0.95, 0.91]) == "0.92 (0.90 to 0.95)"
    assert spread([0.5], ".1%") == "50.0%"
    assert spread(np.array([1, 2, 3]), ".0f") == "2 (1 to 3)"
    with pytest.raises(ValueError, match="at least one"):
        spread([])


def test_glue_stores_rounded_numbers_for_myst_nb(monkeypatch):
    stored = {}
    import myst_nb

    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=True: stored.update({name: (value, display)}))
    assert glue("a", torch.tensor(0.123456789)) is None
    glue("b", np.float64(2.0 / 3.0), digits=2)
    glue("c", 7)
    glue("d", "text", display=True)
    glue("e", torch.arange(3))
    assert stored["a"] == (0.1235, False) and stored["b"] == (0.67, False) and stored["c"] == (7, False)
    assert stored["d"] == ("text", True) and torch.equal(stored["e"][0], torch.arange(3))
    with pytest.raises(TypeError, match="name"):
        glue("", 1)


def test_glue_without_myst_nb_is_silent_unless_asked(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_myst(name, *args, **kwargs):
        if name.startswith("myst_nb"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_myst)
    glue("x", 1.23456789)
    assert capsys.readouterr().out == ""
    glue("y", 1.23456789, display=True)
    assert capsys.readouterr().out.strip() == "1.235"
