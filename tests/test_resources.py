"""The resource table end to end on a tiny team: every row in its own process, a well-formed table."""
import json
import math

import pytest

from minislm import resources
from minislm.team import Team, TeamConfig
from minislm.team.team import LEXICAL
from minislm.team.training import fit
from tests.model_folders import make_tiny_folder
from tests.test_team import toy

pytestmark = pytest.mark.experts  # the lexical expert reads the pretrained experts' WordPiece vocabulary

NUMBERS = ("parameters", "flops_per_text", "latency_ms_p50", "latency_ms_p95", "docs_per_s", "loaded_rss_mb",
           "peak_rss_mb")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("res")
    (root / "bert").mkdir()
    make_tiny_folder(root / "bert", "bert")
    cfg = TeamConfig(dataset="toy", label_names=["red", "green", "blue"], experts=[LEXICAL, str(root / "bert")],
                     proj_dim=8, head_hidden=8, folds=2, lexical={"n_buckets": 256, "epochs": 3, "lr": 1.0},
                     train={"epochs": 3, "batch_size": 32, "patience": 3})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINISLM_CACHE_DIR", str(root / "cache"))
        fit(Team(cfg), toy(120, 0), log=lambda s: None, progress=False).save(root / "team", command="test")
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in toy(60, 1).texts), encoding="utf-8")
    return root


def test_quick_table_has_every_row_with_sane_numbers(checkpoint, capsys):
    out = checkpoint / "out"
    code = resources.main(["--model", str(checkpoint / "team"), "--dataset", str(checkpoint / "texts.jsonl"),
                           "--quick", "--out-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "resources.json").read_text())
    bert = str(checkpoint / "bert")
    assert [x["row"] for x in r["rows"]] == [f"single:{LEXICAL}", f"single:{bert}", "fused", "cascade",
                                             f"int8:single:{bert}", "int8:cascade"]
    for x in r["rows"]:
        for key in NUMBERS:
            assert math.isfinite(x[key]) and x[key] > 0, (x["row"], key)
        assert x["latency_ms_p95"] >= x["latency_ms_p50"]
        assert x["peak_rss_mb"] >= x["loaded_rss_mb"]
        assert x["latency_texts"] == 5 and x["throughput_texts"] == 20
    by = {x["row"]: x for x in r["rows"]}
    assert by[f"single:{bert}"]["experts"] == [bert]  # a member alone never runs the lexical expert
    assert by["fused"]["parameters"] > by[f"single:{bert}"]["parameters"] > 0
    flops = [by[r]["flops_per_text"] for r in ("fused", f"single:{bert}", "single:lexical")]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == 3
    assert math.isclose(sum(by["cascade"]["exit_share"].values()), 1.0)
    for row in (f"single:{bert}", "cascade"):  # the int8 rows serve the same heads: same weights counted
        assert by[f"int8:{row}"]["precision"] == "int8" and by[row]["precision"] == "float32"
        assert by[f"int8:{row}"]["parameters"] == by[row]["parameters"]
    m = r["machine"]
    assert m["cpu"]["model"] and m["usable_cpus"] >= 1 and len(m["load_start"]) == len(m["load_end"]) == 3
    assert m["numpy"] and m["numba"] and m["other_busy_cores"] >= 0 and isinstance(m["shared"], bool)
    md = (out / "resources.md").read_text()
    assert "| cascade |" in md and "| fused head |" in md and "lexical alone" in md and "| cascade (int8) |" in md


def test_unknown_row_is_one_line_exit_2(checkpoint, capsys):
    code = resources.main(["--model", str(checkpoint / "team"), "--dataset", str(checkpoint / "texts.jsonl"),
                           "--quick", "--rows", "L7", "--out-dir", str(checkpoint / "none")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: this team has no row L7; its rows: single:lexical")
    assert len(err.strip().splitlines()) == 1 and not (checkpoint / "none").exists()


def test_rows_are_picked_by_name_short_name_or_int8_name(checkpoint):
    from minislm.classify import load_team

    team = load_team(str(checkpoint / "team"))
    bert = str(checkpoint / "bert")
    assert resources.pick_rows(team, [bert, f"int8:{bert}", "cascade", "int8:cascade"]) == [
        f"single:{bert}", f"int8:single:{bert}", "cascade", "int8:cascade"]
