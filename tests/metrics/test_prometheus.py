import urllib.request

from mtprl.metrics.prometheus import PrometheusExporter, prometheus_name


def test_scrape_endpoint():
    exp = PrometheusExporter(port=0)  # any free port on 127.0.0.1
    try:
        exp.update({"rollout/spec_accept_length": 2.75, "rollout/tokens_per_s": 1234.5}, step=3)
        body = urllib.request.urlopen(f"http://127.0.0.1:{exp.port}/metrics", timeout=5).read().decode()
    finally:
        exp.close()
    assert "mtprl_rollout_spec_accept_length 2.75" in body
    assert "mtprl_rollout_tokens_per_s 1234.5" in body
    assert "mtprl_trainer_step 3.0" in body


def test_names():
    assert prometheus_name("rollout/spec_accept_rate_1") == "mtprl_rollout_spec_accept_rate_1"
