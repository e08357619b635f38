"""tools/choose_on_holdout.py: one run per value on the source classes, the best held-out score."""

from __future__ import annotations

import json

from tests.tool_loader import load_tool

TINY = (
    "SOLVER.BATCH_SIZE 16 DATA.HOLDOUT 8 DATA.NUM_WORKERS 0 KNN.BATCH_SIZE_PER_PROCESS 40"
    " KNN.NEIGHBORS 20 SOLVER.EPOCHS 1"
)


def test_each_value_is_one_source_class_run_and_the_best_holdout_score_wins(
    tiny_fashion_mnist, tmp_path, capsys
):
    tool = load_tool("choose_on_holdout")
    tool.main(["supervised", "SOLVER.BASE_LR", "0.001", "0.5", "--work-dir", str(tmp_path),
               "--opts", f"DATA.ROOT {tiny_fashion_mnist} {TINY}"])  # fmt: skip
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record == json.loads((tmp_path / "supervised" / "choice.json").read_text())
    scores = []
    for value in ("0.001", "0.5"):
        result = json.loads(
            (tmp_path / "supervised" / f"SOLVER.BASE_LR_{value}" / "results.json").read_text()
        )
        assert result["config"]["SOLVER"]["BASE_LR"] == float(value)
        assert result["config"]["DATA"]["CLASSES"] == [0, 2, 4, 6, 8]
        assert result["data"]["classes"] == ["T-shirt/top", "Pullover", "Coat", "Shirt", "Bag"]
        scores.append(result["metrics"]["top1"])
    assert record["scores"] == scores and record["values"] == ["0.001", "0.5"]
    assert record["choice"] == ("0.5" if scores[1] > scores[0] else "0.001")
