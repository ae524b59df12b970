"""pushfw's benchmark harness: ``python -m bench [--quick]`` (run as root, from the repo root).

Everything is measured in one run, inside a network namespace and against a redis-server
that the run creates and always removes: a per-rule ``sh -c "iptables ..."`` baseline (the
seed's way), pushfw end to end per backend, idle latency, reconcile time, TTL expiry lag,
Redis memory per rule, worker RSS, and the bare Redis drain and parse limits.
"""
