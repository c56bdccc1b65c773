"""Stage progress bars (jobs/progress.py): drawn with an ETA on a terminal, off elsewhere."""

import io

from jobs.progress import Bar, Ticker, bars_enabled, stage


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_bars_follow_the_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv("LLMREC_PROGRESS", raising=False)
    assert bars_enabled(_Tty()) is True and bars_enabled(io.StringIO()) is False
    monkeypatch.setenv("LLMREC_PROGRESS", "0")
    assert bars_enabled(_Tty()) is False
    monkeypatch.setenv("LLMREC_PROGRESS", "1")
    assert bars_enabled(io.StringIO()) is True


def test_a_stage_bar_counts_shows_an_eta_and_leaves_one_line():
    out = _Tty()
    with stage("train retriever", total=None, unit="step", file=out) as bar:
        bar.update(0, total=40)  # the total arrives with the first tick, as from a worker
        for _ in range(40):
            bar.update(1, epoch=3, valid_ndcg10=0.071234)
    assert bar.n == 40 and bar.total == 40
    last = out.getvalue().split("\r")[-1]
    assert "train retriever" in last and "100%" in last and "40/40" in last and "<00:00" in last  # elapsed<ETA
    assert "valid_ndcg10=0.07123" in last and last.endswith("\n")


def test_bars_off_write_nothing_and_still_count():
    out = io.StringIO()
    with stage("embed items", total=5, unit="item", file=out) as bar:
        bar.update(5)
    assert bar.n == 5 and out.getvalue() == ""
    Bar("x", 1, "it", file=out, enabled=False).update(1)


def test_a_ticker_without_its_actor_does_nothing():
    t = Ticker(None)  # a stage run outside a remote-fed bar (e.g. a worker started by a test)
    t.tick(3, total=9, force=True)
    assert t._actor is None and (t._pending, t._total) == (0, None)  # nothing queued, nothing sent
    lost = Ticker("no-such-progress-actor")
    lost.tick(1, force=True)  # no Ray here: ignored, not raised
    assert lost._actor is None and lost._pending == 0

    class Counter:  # stands in for the stage's actor: what a worker that found it would send
        def __init__(self):
            self.sent = []
            self.update = self

        def remote(self, n, total, postfix):
            self.sent.append((n, total, dict(postfix)))

    found = Ticker(None)
    found._actor = actor = Counter()
    found.tick(3, total=9, epoch=1)  # the first tick goes out at once
    found.tick(2)  # within half a second of it: batched, not sent
    assert actor.sent == [(3, 9, {"epoch": 1})] and found._pending == 2
