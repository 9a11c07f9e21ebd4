"""Benchmarks: ``python -m bench.run [--quick]`` (see docs/performance.md).

Everything runs on 127.0.0.1, every load is bounded in count and time, and every
process the benchmark starts is stopped by it. Modules:

* :mod:`bench.run` -- the one command: runs every measurement side by side, prints
  the table, writes ``docs/img/*.png`` and a JSON file with the raw numbers;
* :mod:`bench.fake_llama` -- a fast scripted llama-server (SSE chat format) for
  token rates no real model reaches here;
* :mod:`bench.device` -- the MQTT side: many devices sending requests and one
  subscriber counting what arrives (its own process);
* :mod:`bench.rawpub` -- one plain paho publisher, for the library/broker limit;
* :mod:`bench.procs` -- starting and measuring the processes (bridge, brokers);
* :mod:`bench.profile` -- py-spy on the bridge subprocess under relay load;
* :mod:`bench.ingest_compare` -- thread per stream vs one asyncio loop, reading only.
"""
