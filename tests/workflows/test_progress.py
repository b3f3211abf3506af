"""Progress of sampling loops: a bar on a terminal, throttled log lines in a file or pipe."""

import logging

from tqdm.auto import tqdm

from alphastomics.utils import progress


def test_sampling_progress_is_a_bar_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    bar = progress.progress_bar([(2, 1), (1, 0)], "expr_to_pos")
    assert isinstance(bar, tqdm)
    assert list(bar) == [(2, 1), (1, 0)]


def test_sampling_progress_in_a_log_is_one_line_per_interval(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    clock = iter([0.0, 30.0, 61.0, 70.0, 125.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    pairs = [(4, 3), (3, 2), (2, 1), (1, 0)]
    with caplog.at_level(logging.INFO, logger=progress.__name__):
        assert list(progress.progress_bar(pairs, "expr_to_pos")) == pairs
    assert [r.getMessage() for r in caplog.records] == [
        "expr_to_pos: step 2/4, 1.0 min",
        "expr_to_pos: step 4/4, 2.1 min",
    ]
