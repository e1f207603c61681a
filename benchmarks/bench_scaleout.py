"""Scale-out benchmark: kawai on Ray Serve (api/ray_app.py), a local Ray cluster, loopback HTTP only.

    .venv/bin/python -P benchmarks/bench_scaleout.py [--model ID] [--streams 8] [--tokens 128]
                                                     [--max-sequences 4] [--conversations 16] [--rounds 1]

Needs the `ray` extra (`make install-ray`). Starts Ray with 2 CPUs and a 200 MB object store, then:

1. Throughput: `--streams` concurrent SSE streams through the proxy, the same long-story prompts (the
   0.5B runs on past `--tokens`, so every stream decodes exactly that many) in three layouts:
   - one replica with the deployment's default sequence slots (`--max-sequences`, 4): half the streams
     wait in its queue, as they would on a one-replica deployment;
   - two replicas of that same deployment (one thread each): the streams split between them;
   - one replica with a slot per stream: every stream in one batch (one 8-row step reads each weight
     once where two replicas' 4-row steps read it twice: the batching bound, docs/scale-out.md).
   The rate is output tokens (the `usage` of each `message_delta`) over the seconds from sending the
   first request to the last `message_stop`, prompts of ~30 tokens included (vLLM's "output token
   throughput"). SSE deltas are not tokens (the tool-call parser holds back whitespace). `--rounds`
   repeats the three layouts; the speedups are of medians. Each run also records the CPU seconds every
   process on the machine took meanwhile (`cpu_s`, from /proc): where the 2 cores went.
2. Affinity: `--conversations` two-turn conversations sharing one system prompt over two replicas;
   a hit is a second turn whose `cache_read_input_tokens` is at least 90% of its first turn's prompt.
   Once with the prefix-affinity router, once with Ray Serve's default (power of two choices).
3. Recovery: `--streams` streams over two replicas (each with one spare sequence slot), one replica's
   process SIGKILLed once every stream has its first token: streams completed, ended with an `error`
   event, lost (neither), and the seconds until a new request succeeds (served by the survivor) and
   until two replicas answer again (Ray started a replacement and it loaded the model).

Prints the machine load first; the last line is one JSON object, also written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import statistics
import threading
import time
from datetime import date
from pathlib import Path

import httpx
import ray
from ray import serve

from kawai.api.ray_app import APP_NAME, build
from kawai.api.state import ServerSettings

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEM = "You are a helpful assistant. Answer in one short sentence, plainly and without lists."
SLOT_BYTES_0_5B_1K = 24 * 2**20  # one 1024-token KV cache of the 0.5B (engine.LLM.kv_bytes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(url: str, model: str, *, replicas: int, max_sequences: int, routing: str = "affinity",
           kv_slots: int | None = None) -> None:
    settings = ServerSettings(auth=False, max_sequences=max_sequences, queue_size=16, n_ctx=1024,
                              kv_memory=kv_slots * SLOT_BYTES_0_5B_1K if kv_slots else None)
    started = time.monotonic()
    serve.run(build(settings, [model], replicas=replicas, routing=routing), name=APP_NAME, route_prefix="/")
    print(f"deployed {replicas} replica(s), routing {routing}, in {time.monotonic() - started:.0f} s", flush=True)


def stream(url: str, body: dict, out: dict) -> None:
    """One SSE request; records delta arrival times, the last event, and the usage."""
    out.setdefault("first", threading.Event())
    out.update(times=[], last=None, end=None, error=None, output_tokens=0, stop_reason=None)
    try:
        with httpx.stream("POST", url + "/v1/messages", json={**body, "stream": True}, timeout=600) as r:
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    out["last"] = event
                    out["end"] = time.perf_counter()
                    if event == "content_block_delta":
                        out["times"].append(time.perf_counter())
                        out["first"].set()
                elif event == "message_delta" and line.startswith("data: "):
                    data = json.loads(line[6:])
                    out["output_tokens"] = data["usage"]["output_tokens"]
                    out["stop_reason"] = data["delta"]["stop_reason"] or out["stop_reason"]
    except httpx.HTTPError as e:
        out["error"] = type(e).__name__


def story_body(model: str, i: int, tokens: int) -> dict:
    """A prompt the small models answer at length (asked to count, the 0.5B often stops after a few lines):
    every throughput stream decodes `tokens`, and the recovery's are still running when a replica dies."""
    return {"model": model, "max_tokens": tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write a very long story about lighthouse number {i}."}]}


def cpu_seconds() -> dict[str, tuple[str, float]]:
    """pid -> (name, CPU seconds, user + system) of every process on the machine. The name is the command
    line's first 40 characters; Ray's workers are titled by their actor (`ray::ServeReplica:kawai:Engine`,
    `ray::ProxyActor`), with `.method` while one runs, which is dropped."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[str, float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended
            continue
        name = command[:40].strip() or "?"  # kernel threads have no command line
        if name.startswith("ray::"):
            name = name.split(".")[0]
        fields = stat.rsplit(")", 1)[1].split()  # after the name: utime and stime are fields 14 and 15
        out[pid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_used(before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds between two `cpu_seconds()`, summed by process name (both engine replicas together),
    largest first; below 0.05 s left out."""
    used: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        used[name] = used.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
    return {name: round(t, 2) for name, t in sorted(used.items(), key=lambda item: -item[1]) if t >= 0.05}


def throughput(url: str, model: str, streams: int, tokens: int) -> dict:
    """Output tokens per second of `streams` concurrent long stories, first send to last message_stop, and
    the CPU seconds each process took meanwhile (where the cores went: docs/scale-out.md)."""
    before = cpu_seconds()
    outs = [{} for _ in range(streams)]
    threads = [threading.Thread(target=stream, args=(url, story_body(model, i, tokens), o))
               for i, o in enumerate(outs)]
    sent = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    done = max((o["end"] for o in outs if o["end"]), default=sent)
    n = sum(o["output_tokens"] for o in outs)
    used = cpu_used(before, cpu_seconds())
    return {"streams": streams, "output_tokens": n, "seconds": round(done - sent, 2),
            "stopped_at_max_tokens": sum(o["stop_reason"] == "max_tokens" for o in outs),
            "failed": sum(o["last"] != "message_stop" for o in outs),
            "first_token_s": sorted(round(o["times"][0] - sent, 1) for o in outs if o["times"]),
            "output_tok_s": round(n / (done - sent), 2) if done > sent else None,
            "cpu_s": used}


def affinity(url: str, model: str, conversations: int) -> dict:
    client = httpx.Client(base_url=url, timeout=600)
    firsts, hits, reads = [], 0, []
    for i in range(conversations):
        q = {"role": "user", "content": f"Question {i}: name one animal whose name starts with {chr(65 + i % 26)}."}
        r = client.post("/v1/messages", json={"model": model, "max_tokens": 8, "temperature": 0, "system": SYSTEM,
                                              "messages": [q]}).json()
        firsts.append((q, r, r["usage"]["input_tokens"] + r["usage"].get("cache_read_input_tokens", 0)))
    for q, first, prompt in firsts:
        second = client.post("/v1/messages", json={
            "model": model, "max_tokens": 4, "temperature": 0, "system": SYSTEM,
            "messages": [q, {"role": "assistant", "content": first["content"]},
                         {"role": "user", "content": "Another one?"}]}).json()
        read = second["usage"].get("cache_read_input_tokens", 0)
        reads.append(read / prompt)
        hits += read >= 0.9 * prompt
    return {"conversations": conversations, "hits": hits, "hit_rate": round(hits / conversations, 3),
            "median_turn2_read_fraction": round(statistics.median(reads), 3)}


def replicas_seen(url: str, want: int, deadline_s: float) -> dict[str, dict]:
    """replica id -> {"pid", "active"} from /metrics polls, until `want` replicas answered."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + deadline_s
    while len(found) < want and time.monotonic() < deadline:
        try:
            text = httpx.get(url + "/metrics", timeout=10).text
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        info = re.search(r'kawai_replica_info\{replica="([^"]+)",pid="(\d+)"\} 1', text)
        active = re.search(r"kawai_active_sequences\{[^}]*\} (\d+)", text)
        if info and active:
            found[info.group(1)] = {"pid": int(info.group(2)), "active": int(active.group(1))}
    return found


def recovery(url: str, model: str, streams: int) -> dict:
    outs = [{"first": threading.Event()} for _ in range(streams)]  # created before the threads read them
    threads = [threading.Thread(target=stream, args=(url, story_body(model, i, 400), o))
               for i, o in enumerate(outs)]
    for t in threads:
        t.start()
    for o in outs:
        o["first"].wait(timeout=600)
    busy = [(rid, r) for rid, r in replicas_seen(url, 2, 60).items() if r["active"] > 0]
    if not busy:
        raise SystemExit("recovery: every stream had ended before a replica could be killed")
    victim, info = busy[0]
    os.kill(info["pid"], signal.SIGKILL)
    killed = time.monotonic()
    back = None
    while back is None and time.monotonic() - killed < 300:  # bounded: one short request at a time
        try:
            r = httpx.post(url + "/v1/messages", timeout=60, json={
                "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
            if r.status_code == 200:
                back = time.monotonic() - killed
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    for t in threads:
        t.join(timeout=900)
    replaced = replicas_seen(url, 2, 300)
    both = time.monotonic() - killed if len(replaced) == 2 and victim not in replaced else None
    return {
        "streams": streams,
        "streams_on_victim": busy[0][1]["active"],
        "completed": sum(o["last"] == "message_stop" for o in outs),
        "ended_with_error_event": sum(o["last"] == "error" for o in outs),
        "lost": sum(o["last"] not in ("message_stop", "error") for o in outs),
        "first_success_after_kill_s": round(back, 1) if back is not None else None,
        "two_replicas_again_after_s": round(both, 1) if both is not None else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max-sequences", type=int, default=4, help="sequence slots per replica (kawai's default)")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {"model": args.model, "threads_per_replica": 1, "load_avg_1m": round(os.getloadavg()[0], 2),
               "throughput": [], "affinity": {}, "recovery": None}
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False, _node_ip_address="127.0.0.1")  # all of Ray's traffic on loopback
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        layouts = [(1, args.max_sequences), (2, args.max_sequences), (1, args.streams)]
        for _ in range(args.rounds):
            for replicas, slots in layouts:
                deploy(url, args.model, replicas=replicas, max_sequences=slots)
                throughput(url, args.model, args.streams, 8)  # warm-up
                r = {"replicas": replicas, "max_sequences": slots,
                     **throughput(url, args.model, args.streams, args.tokens)}
                print(json.dumps(r), flush=True)
                results["throughput"].append(r)
        for routing in ("affinity", "pow2"):
            deploy(url, args.model, replicas=2, max_sequences=4, routing=routing, kv_slots=args.conversations + 8)
            results["affinity"][routing] = affinity(url, args.model, args.conversations)
            print(routing, json.dumps(results["affinity"][routing]), flush=True)
        # one spare slot per replica: the survivor can take a new request while it finishes its streams
        deploy(url, args.model, replicas=2, max_sequences=args.streams // 2 + 1)
        results["recovery"] = recovery(url, args.model, args.streams)
        print(json.dumps(results["recovery"]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    def median(replicas: int, slots: int) -> float | None:
        rates = [r["output_tok_s"] for r in results["throughput"]
                 if (r["replicas"], r["max_sequences"]) == (replicas, slots) and r["output_tok_s"]]
        return statistics.median(rates) if rates else None

    one, two, batched = median(1, args.max_sequences), median(2, args.max_sequences), median(1, args.streams)
    if one and two and batched:
        results["speedup_two_vs_one"] = round(two / one, 2)  # the same deployment, one replica or two
        results["speedup_two_vs_one_batching_all"] = round(two / batched, 2)
    results["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{date.today()}-scaleout-{args.model}.json"
    for k in range(2, 100):  # never over an earlier run's file
        if not out.exists():
            break
        out = RESULTS / f"{date.today()}-scaleout-{args.model}-{k}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
