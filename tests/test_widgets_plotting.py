import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from attn_course import widgets  # noqa: E402
from attn_course.plotting import STYLE, attention_heatmap, set_style  # noqa: E402


def _draw(calls):
    def draw(fig, a, b=None):
        calls.append((a, b))
        ax = fig.subplots()
        ax.plot([0, 1], [0, a])
    return draw


def test_static_player_has_a_slider_over_every_frame_and_no_external_url():
    calls = []
    out = widgets.explore(_draw(calls), mode="static", a=[1.0, 2.0, 3.0])
    assert isinstance(out, widgets.StaticExplorer)
    html = out._repr_html_()
    assert 'type="range"' in html
    frames = re.findall(r"frames\[\d+\] = \"data:image/png;base64,", html)
    assert len(frames) == 3
    assert sorted({c[0] for c in calls}) == [1.0, 2.0, 3.0]
    assert "http://" not in html and "https://" not in html and "font-awesome" not in html
    assert "<i class" not in html  # icon fonts replaced by plain glyphs
    assert repr(out) == "<interactive figure, 3 frames: a in [1, 2, 3]>"


def test_static_frames_differ_and_output_is_deterministic():
    a = widgets.explore(_draw([]), mode="static", a=[1.0, 5.0])
    b = widgets.explore(_draw([]), mode="static", a=[1.0, 5.0])
    assert a.html == b.html
    frames = re.findall(r'frames\[\d+\] = "(data:image/png;base64,[^"]+)"', a.html)
    assert len(frames) == 2 and frames[0] != frames[1]


def test_static_player_over_two_sliders_covers_the_product():
    calls = []
    out = widgets.explore(_draw(calls), mode="static", a=[1, 2], b=["x", "y", "z"])
    assert len(out.frames) == 6
    assert set(calls) >= {(1, "x"), (2, "z")}


def test_live_mode_gives_sliders_that_redraw():
    import ipywidgets as W

    calls = []
    box = widgets.explore(_draw(calls), mode="live", a=np.array([0.5, 1.5]))
    assert isinstance(box, W.VBox)
    slider = box.sliders["a"]
    assert isinstance(slider, W.SelectionSlider) and slider.value == 0.5
    slider.value = 1.5
    assert calls[-1] == (1.5, None)
    plt.close("all")


def test_auto_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv("ATTN_COURSE_STATIC", "1")
    assert widgets.is_static()
    assert isinstance(widgets.explore(_draw([]), a=[1]), widgets.StaticExplorer)
    monkeypatch.delenv("ATTN_COURSE_STATIC")
    assert not widgets.is_static()
    # outside a kernel there is nothing to show live sliders in: static again
    assert isinstance(widgets.explore(_draw([]), a=[1]), widgets.StaticExplorer)


@pytest.mark.parametrize("kwargs, exc, word", [
    ({}, ValueError, "at least one slider"),
    ({"a": []}, ValueError, "has no values"),
    ({"a": range(10), "b": range(10)}, ValueError, "10 x 10"),
    ({"a": [1], "mode": "3d"}, ValueError, "mode"),
])
def test_explore_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        widgets.explore(_draw([]), **kwargs)
    with pytest.raises(TypeError, match="draw"):
        widgets.explore("not a function", a=[1])


def test_heatmap_has_labels_colorbar_and_white_background():
    set_style()
    fig, ax = plt.subplots()
    attention_heatmap(torch.softmax(torch.randn(2, 3), -1), ax=ax, x_labels=["the", "cat", "sat"],
                      y_labels=["q0", "q1"], title="t")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["the", "cat", "sat"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["q0", "q1"]
    assert ax.get_xlabel() and ax.get_ylabel()
    assert len(fig.axes) == 2  # the colorbar
    assert fig.axes[1].get_ylabel() == "weight"
    assert matplotlib.colors.to_hex(fig.get_facecolor()) == "#ffffff"
    assert STYLE["savefig.facecolor"] == "white"
    plt.close(fig)


def test_heatmap_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        attention_heatmap(np.zeros(3))
    with pytest.raises(ValueError, match="x_labels has 2 labels for 3 columns"):
        attention_heatmap(np.zeros((2, 3)), x_labels=["a", "b"])
    plt.close("all")


def test_heatmap_names_its_colorbar():
    fig, ax = plt.subplots()
    attention_heatmap(np.zeros((2, 2)), ax=ax, cbar_label="score")
    assert fig.axes[1].get_ylabel() == "score"
    plt.close(fig)


def test_heatmap_annotations_and_own_figure():
    ax = attention_heatmap(np.eye(2), annotate=True, colorbar=False)
    assert [t.get_text() for t in ax.texts] == ["1.00", "0.00", "0.00", "1.00"]
    plt.close("all")
