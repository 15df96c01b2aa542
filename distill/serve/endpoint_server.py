"""llama.cpp's own OpenAI-compatible HTTP server for a GGUF file, in this process, for hand runs of teacher=endpoint:

    python -m distill.serve.endpoint_server <model.gguf> --port 8080 [--threads 1]
    DISTILL_TEACHER_URL=http://127.0.0.1:8080 DISTILL_TEACHER_MODEL=<model.gguf> \
        python -m distill.train teacher=endpoint ...

It serves the file under its path as the model name (what GET /v1/models lists), on 127.0.0.1 only, until killed.
On cores shared with other work keep ``--threads 1`` and raise ``--parallel``: llama.cpp's threads meet at a
barrier every token, so one preempted thread stalls the rest (27 tokens/s with two threads on two busy cores,
about 95 with one; docs/results/served-teacher.md).
"""

from __future__ import annotations

import argparse
import signal


def serve(gguf: str, port: int, threads: int, context: int, parallel: int, cache_ram_mib: int = 0) -> object:
    """A running server (it stops with its last reference); its settings are the slow test's (test_endpoint_teacher)."""
    import xllamacpp  # optional: only the hand runs and the slow test serve a GGUF

    params = xllamacpp.CommonParams()
    params.model.path, params.n_ctx, params.n_parallel = gguf, context, parallel
    params.hostnames, params.port, params.verbosity = ["127.0.0.1"], port, -1
    # llama.cpp keeps finished prompts' states in host memory (up to 8 GiB by default) to reuse their prefixes; a
    # prompt pool's prompts are distinct, so the cache only grows: 5.6 GB resident after 1,500 prompts, not 0.4.
    params.cache_ram_mib = cache_ram_mib
    for cpu in (params.cpuparams, params.cpuparams_batch):
        cpu.n_threads, cpu.poll = threads, 0  # no busy polling: the CPUs are shared with the training process
    return xllamacpp.Server(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=2048, help="total tokens over the parallel slots")
    parser.add_argument("--parallel", type=int, default=2, help="requests answered at once")
    parser.add_argument("--cache-ram-mib", type=int, default=0, help="host memory for reusable prompt states")
    args = parser.parse_args()
    stops = {signal.SIGINT, signal.SIGTERM}
    # Blocked before the server's threads start, so they inherit the mask and the signal reaches sigwait.
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    server = serve(args.gguf, args.port, args.threads, args.context, args.parallel, args.cache_ram_mib)
    print(f"serving {args.gguf} at {server.listening_address}", flush=True)
    signal.sigwait(stops)
    print("stopping", flush=True)


if __name__ == "__main__":
    main()
