"""A secret under hostile use, through a real lm-eval run: the API key reaches the endpoint and is written
nowhere (the rest of the run directory's hostile cases, which need no model, are in tests/unit/test_hostile.py)."""

import json

from tests.conftest import make_config
from tests.unit.test_faults import _Endpoint
from tests.unit.test_hostile import KEY, found_anywhere


class _KeyedEndpoint(_Endpoint):
    """The stand-in endpoint behind an API key: a request without `Bearer KEY` gets the 401 Serve gives."""

    authorized: list[int] = [0]

    def do_POST(self):  # noqa: N802 (http.server's name)
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self.rfile.read(int(self.headers["Content-Length"]))
            return self._send(401, {"error": {"message": "invalid or missing API key", "code": 401}})
        self.authorized[0] += 1
        return super().do_POST()


def test_lm_eval_reaches_a_keyed_endpoint_and_writes_the_key_nowhere(tmp_path):
    import threading
    from http.server import ThreadingHTTPServer

    import yaml

    from sasft_ray.config import LmEvalGroup
    from sasft_ray.evaluate import run_lm_eval
    from sasft_ray.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model", warmup_steps=0)  # lm-eval counts tokens with its tokenizer
    rows = tmp_path / "tasks" / "rows.jsonl"
    rows.parent.mkdir()
    rows.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"Q{i}"}) + "\n" for i in range(3)))
    (tmp_path / "tasks" / "echo.yaml").write_text(yaml.safe_dump({
        "task": "echo", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(rows)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}", "generation_kwargs": {"max_gen_toks": 4, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))
    cfg = make_config(tmp_path, model_path=str(model), serve={"api_key_env": "UNUSED_HERE"})
    group = LmEvalGroup(tasks=["echo"], include_path=str(tmp_path / "tasks"), mode="chat")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeyedEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Endpoint.fail = [0]
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        scores = run_lm_eval(group, url, "finetuned", cfg, KEY, tmp_path / "lm_eval")
    finally:
        server.shutdown()
    assert scores["echo/exact_match,none"] == 1.0 and _KeyedEndpoint.authorized[0] == 3  # the key was sent
    assert (tmp_path / "lm_eval" / "echo.json").exists() and not found_anywhere(tmp_path, KEY)
