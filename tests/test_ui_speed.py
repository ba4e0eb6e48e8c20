"""`python -m workbench.ui.speed`: the page and the engine timed side by side, as the README
quotes them. One short round on the embedded model: what is checked is that both paths
answer, the page's figure is read from its own stats line, and the file says which CPU."""

import json

import pytest

from workbench.bench.cpu import cpu_identity
from workbench.ui import speed


@pytest.mark.embedded
def test_the_page_and_the_engine_are_timed_side_by_side_and_recorded(tmp_path):
    out = tmp_path / "speed.json"
    (result,) = speed.main(["--configs", "configs/default.yaml", "--rounds", "1", "--tokens", "16", "--out", str(out)])
    assert len(result.engine) == len(result.page) == 1 and min(result.engine + result.page) > 0
    assert 1 <= result.tokens[0] <= 16
    record = json.loads(out.read_text())
    assert record["cpu"] == cpu_identity() and record["command"].endswith("--out " + str(out))
    (row,) = record["results"]
    assert row["config"] == "configs/default.yaml" and row["page_over_engine"] == pytest.approx(result.ratio)


def test_a_stats_line_without_a_speed_is_an_error_not_a_zero():
    class Client:
        def predict(self, *args, **kwargs):
            return [], None, "_Stopped._"

    with pytest.raises(RuntimeError, match="no speed in the page's stats line"):
        speed.page_rate(Client())
