"""`edge-lam` help and progress, the silenced fresh-head load report, and the run plots
(issue 26, item 8)."""

from __future__ import annotations

import logging

import matplotlib
import pytest

matplotlib.use("Agg")

from edge_lam.cli.main import build_parser  # noqa: E402


def _help(*argv: str) -> str:
    parser = build_parser()
    if not argv:
        return parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "command").choices[argv[0]]
    return sub.format_help()


def test_top_help_examples_are_whole_lines():
    text = _help()
    examples = text.split("examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert examples and all(line.startswith(("  edge-lam ", "      --")) for line in examples), \
        examples
    assert "Answer:\"" not in text.replace("Answer:\"\n", "")  # no example cut in two


def test_evaluate_help_lists_task_choices_and_explains_every_option():
    text = _help("evaluate")
    assert "{seq-cls,causal-lm,lm-cls}" in text
    assert "examples per forward pass" in text  # --batch-size
    assert "--progress" in text
    assert "the question, posed as in training" in _help("generate")  # --prompt
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--data", "x", "--model", "m", "--task", "nope"])


def test_progress_defaults_to_a_terminal_and_can_be_forced():
    args = build_parser().parse_args(["evaluate", "--data", "x", "--adapter", "a"])
    assert args.progress is None
    assert build_parser().parse_args(["evaluate", "--data", "x", "--progress"]).progress


def test_evaluate_draws_a_progress_bar_on_stderr(tiny_bert, agnews_short, capsys):
    from edge_lam.cli.main import evaluate_model

    result = evaluate_model(str(tiny_bert), "seq-cls", agnews_short(40), [], progress=True)
    assert result["examples"] == 40
    err = capsys.readouterr().err
    assert "evaluate" in err and "40/40" in err


def test_only_a_fresh_head_report_is_silenced():
    from edge_lam.models.families import FreshHeadReport

    def record(rows: str) -> logging.LogRecord:
        message = ("\x1b[1mBertForSequenceClassification LOAD REPORT\x1b[0m from: x\n"
                   "Key               | Status  | \n------------------+---------+-\n" + rows +
                   "\nNotes:\n- MISSING:\tthose params were newly initialized")
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0,
                                 message, None, None)

    head = "classifier.weight | MISSING | \nclassifier.bias   | MISSING | "
    assert not FreshHeadReport().filter(record(head))
    more = head + "\nbert.encoder.layer.0.attention.self.query.weight | MISSING | "
    assert FreshHeadReport().filter(record(more))
    assert FreshHeadReport().filter(logging.LogRecord("t", logging.WARNING, "", 0, "other",
                                                      None, None))


def test_loading_a_classifier_prints_no_load_report(tiny_bert, caplog):
    from edge_lam.models.families import _load_classifier

    with caplog.at_level(logging.WARNING, logger="transformers.modeling_utils"):
        _load_classifier(str(tiny_bert), ("a", "b", "c", "d"))
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]


# ------------------------------------------------------------------------ plots
ROWS = [{"round": r, "accuracy": 0.25 + 0.1 * r,
         "clients": [] if r == 0 else [{"rank": k, "bytes_up": 1000 * k, "bytes_down": 1000 * k}
                                       for k in (2, 4, 8)]} for r in range(4)]


@pytest.mark.parametrize("draw", ["accuracy_figure", "communication_figure"])
def test_round_ticks_are_whole_numbers(draw):
    import edge_lam.results as results

    fig = getattr(results, draw)(ROWS)
    fig.canvas.draw()
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_upload_and_download_markers_do_not_overlap_and_the_legend_hides_none():
    from edge_lam.results import communication_figure

    fig = communication_figure(ROWS)
    fig.canvas.draw()
    ax = fig.axes[0]
    points = [tuple(map(tuple, c.get_offsets())) for c in ax.collections]
    ups, downs = points[0::2], points[1::2]
    for up, down in zip(ups, downs):  # same bytes up and down: still apart on x
        assert not set(up) & set(down)
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 >= ax.get_window_extent(renderer).x1  # right of the axes
    assert legend.x1 <= fig.bbox.x1 + 1  # and inside the saved image
