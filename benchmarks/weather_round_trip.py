"""The weather-tool round trip on a real model, sampled, N times, through a real server and the anthropic SDK.

    KAWAI_THREADS=2 .venv/bin/python benchmarks/weather_round_trip.py [--runs 20] [--temperature 0.7]
                                                                      [--tool-choice auto|any] [--no-strict]

Each run: (1) the user asks for the weather in a city, with the `get_weather` tool (strict by default);
the reply must call it with input valid against the schema (checked with jsonschema); (2) the call's
result goes back as a `tool_result`, and the reply should be a text answer, not another call. Prints a
line per run and ends with one JSON object (counts, the calls, timings). A failed first leg counts as
an invalid call; its second leg is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import anthropic
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from api_harness import LiveServer  # noqa: E402  (the tests' in-process uvicorn server)

from kawai import engine  # noqa: E402
from kawai.api.app import create_app  # noqa: E402
from kawai.api.state import ServerSettings  # noqa: E402

DEFAULT_MODEL = Path(os.environ.get("KAWAI_HOME", Path.home() / ".cache" / "kawai")) / "models" / (
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
SCHEMA = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--tool-choice", choices=["auto", "any"], default="auto")
    ap.add_argument("--no-strict", action="store_true")
    args = ap.parse_args()
    threads = int(os.environ.get("KAWAI_THREADS", "2"))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; kernel threads {threads}")
    llm = engine.load(args.model, threads=threads, n_ctx=4096)
    tool = {"name": "get_weather", "description": "Get the current weather for a location", "input_schema": SCHEMA,
            "strict": not args.no_strict}
    app = create_app(ServerSettings(home=Path(tempfile.mkdtemp()), auth=False), [llm])
    results = {"model": llm.id, "runs": args.runs, "temperature": args.temperature, "tool_choice": args.tool_choice,
               "strict": not args.no_strict, "valid_calls": 0, "text_answers_after_result": 0, "calls": [],
               "second_replies": []}
    t_start = time.perf_counter()
    with LiveServer(app) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=600)
        for i in range(args.runs):
            city = CITIES[i % len(CITIES)]
            messages = [{"role": "user", "content": f"What is the weather in {city}?"}]
            first = client.messages.create(model=llm.id, max_tokens=200, messages=messages, tools=[tool],
                                           tool_choice={"type": args.tool_choice},
                                           extra_body={"temperature": args.temperature})
            calls = [b for b in first.content if b.type == "tool_use"]
            ok = first.stop_reason == "tool_use" and len(calls) >= 1
            try:
                for call in calls:
                    jsonschema.validate(call.input, SCHEMA)
            except jsonschema.ValidationError:
                ok = False
            results["calls"].append([{"name": c.name, "input": c.input} for c in calls] if ok else
                                    {"invalid": [b.model_dump() for b in first.content]})
            if not ok:
                print(f"run {i}: no valid call: {first.content!r}")
                continue
            results["valid_calls"] += 1
            messages += [
                {"role": "assistant", "content": [c.model_dump() for c in calls]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": c.id,
                                              "content": f"Sunny, 22 degrees celsius in {c.input['location']}"}
                                             for c in calls]},
            ]
            second = client.messages.create(model=llm.id, max_tokens=120, messages=messages, tools=[tool],
                                            extra_body={"temperature": args.temperature})
            text = "".join(b.text for b in second.content if b.type == "text")
            answered = second.stop_reason == "end_turn" and not any(b.type == "tool_use" for b in second.content)
            results["text_answers_after_result"] += answered
            results["second_replies"].append({"stop_reason": second.stop_reason, "text": text[:200]})
            print(f"run {i}: call {json.dumps(calls[0].input)} -> {second.stop_reason}: {text[:80]!r}")
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(f"{results['valid_calls']}/{args.runs} valid calls; {results['text_answers_after_result']} text answers "
          f"after the tool result")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
