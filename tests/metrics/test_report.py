import json

from mtprl.metrics.report import write_report


def test_report_from_a_metrics_log(tmp_path):
    rows = [{"step": 0, "val-core/synthetic_arith/acc/mean@4": 0.25, "val-aux/synthetic_arith/acc/greedy@1": 0.3}]
    for s in range(1, 5):
        rows.append({"step": s, "critic/score/mean": -1 + 0.25 * s, "response_length/mean": 10.0 + s,
                     "response_length/min": 2.0, "response_length/max": 30.0,
                     "rollout/spec_accept_length": 2.0 + 0.1 * s, "rollout/spec_accept_rate_1": 0.8,
                     "rollout/spec_accept_rate_2": 0.6, "rollout/tokens_per_s": 100.0, "timing_s/step": 2.0,
                     "rollout/mean_draft_depth": 3.0 - 0.5 * (s % 2), "timing_s/gen": 1.0, "timing_s/update_actor": 0.5})
    rows[-1]["val-core/synthetic_arith/acc/mean@4"] = 0.5
    rows[-1]["val-aux/synthetic_arith/acc/greedy@1"] = 0.625
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    frozen = [dict(r, **{"rollout/spec_accept_length": 1.5}) for r in rows]
    summary = write_report(tmp_path, extra={"wall_seconds": 12.5}, lengths=list(range(1, 101)),
                           compare={"trained": rows, "frozen": frozen})
    assert summary["val_acc_before"] == 0.25 and summary["val_acc_after"] == 0.5
    assert summary["val_acc_greedy_before"] == 0.3 and summary["val_acc_greedy_after"] == 0.625
    assert summary["min_accept_length"] == 2.1 and summary["num_steps"] == 4
    assert summary["mean_draft_depth"] == 2.75 and summary["mean_accept_length[frozen]"] == 1.5
    assert summary["response_length_quantiles"] == {"p10": 11, "p50": 51, "p90": 91, "p99": 100, "max": 100}
    assert summary["phase_seconds_mean"]["gen"] == 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["wall_seconds"] == 12.5
    for name in ("reward_and_val_acc", "accept_length", "draft_depth", "response_length", "time_per_phase",
                 "ablation_accept_length", "ablation_val_acc"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert "| val_acc_after | 0.500 |" in (tmp_path / "report.md").read_text()
