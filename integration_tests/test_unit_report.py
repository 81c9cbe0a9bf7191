"""The lm-eval offload table (lp_plugin/core/report.py) from run info alone: no model."""

from __future__ import annotations

from lp_plugin.core.report import offload_table


def _rows(table: str) -> dict:
    cells = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("|") and "---" not in line]
    return {key.strip(): value.strip() for key, value in cells}


def test_the_table_names_the_layers_offloaded_and_the_layers_skipped():
    info = {"offload": "4,6", "layers": [4, 6], "offloaded_layers": [6], "skipped_layers": [4],
            "stand_ins": {"4": "LinearStandIn"}, "tier": "cpu", "mode": "stream", "offloaded_bytes": 2**20}
    rows = _rows(offload_table(info))
    assert rows["layers"] == "6 (1; offload=4,6)"
    assert rows["skipped"] == "4 (1; stand-ins: LinearStandIn): not exact"


def test_no_skipped_row_without_skipping():
    rows = _rows(offload_table({"offload": "even", "layers": [2, 4, 6], "offloaded_layers": [2, 4, 6], "skipped_layers": []}))
    assert rows["layers"] == "2-6:2 (3; offload=even)"
    assert "skipped" not in rows


def test_layers_dropped_at_alpha_0_have_their_row():
    info = {"offload": "3", "layers": [3], "offloaded_layers": [], "dropped_layers": [3], "skipped_layers": []}
    rows = _rows(offload_table(info))
    assert rows["layers"] == "none (0; offload=3)"
    assert rows["dropped"] == "3 (1; alpha=0): not exact"
