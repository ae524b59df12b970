"""The throwaway world the tests and the benchmarks run in, one definition for both.

A redis-server of the run's own on a free port (:mod:`testbed.redis_server`) and network
namespaces it creates and always deletes (:mod:`testbed.netns`), workers running in them
(:mod:`testbed.worker`) with an environment of their own (:mod:`testbed.env`), the firewall
read back as an operator reads it (:mod:`testbed.kernel`), and backends driven by scripts
of steps (:mod:`testbed.driver`). ``tests/conftest.py`` wraps them in fixtures;
``bench/env.py`` in the benchmark's environment.
"""
