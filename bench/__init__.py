"""orbcast benchmarks: ``python -m bench.run`` (``make bench``).

Everything runs as real processes on loopback in one run, so the ratios
compare like with like on the same machine at the same moment:

* the ceiling, written here from scratch: raw pyzmq PUSH->PULL, and a
  minimal Python ROUTER->PUB sequencing loop (one fsync per drained batch)
  in a per-message-frame and a batched variant;
* orbcast with fsync on: throughput (64 B and 1 KiB), end-to-end latency,
  replay speed, the sequencer's peak RSS, throughput under 5 % egress loss,
  and publish throughput with and without the plant's on-disk outbox.

Modules: :mod:`bench.run` (orchestration, table, JSON), :mod:`bench.worker`
(the processes), :mod:`bench.proc` (spawning, reaping, ports, /proc),
:mod:`bench.profile` (py-spy summaries for ``--profile``).
"""
