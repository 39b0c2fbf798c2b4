import json

from mtprl.metrics.report import write_report


def test_report_from_a_metrics_log(tmp_path):
    rows = [{"step": 0, "val-core/synthetic_arith/acc/mean@1": 0.25}]
    for s in range(1, 5):
        rows.append({"step": s, "critic/score/mean": -1 + 0.25 * s, "response_length/mean": 10.0 + s,
                     "rollout/spec_accept_length": 2.0 + 0.1 * s, "rollout/spec_accept_rate_1": 0.8,
                     "rollout/spec_accept_rate_2": 0.6, "rollout/tokens_per_s": 100.0, "timing_s/step": 2.0,
                     "timing_s/gen": 1.0, "timing_s/update_actor": 0.5})
    rows[-1]["val-core/synthetic_arith/acc/mean@1"] = 0.5
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = write_report(tmp_path, extra={"wall_seconds": 12.5})
    assert summary["val_acc_before"] == 0.25 and summary["val_acc_after"] == 0.5
    assert summary["min_accept_length"] == 2.1 and summary["num_steps"] == 4
    assert summary["phase_seconds_mean"]["gen"] == 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["wall_seconds"] == 12.5
    for name in ("reward_and_val_acc", "accept_length", "time_per_phase"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert "| val_acc_after | 0.500 |" in (tmp_path / "report.md").read_text()
