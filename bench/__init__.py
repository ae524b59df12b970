"""pushfw's benchmark harness: ``python -m bench [--quick]`` (run as root, from the repo root).

Everything is measured in one run, inside a network namespace and against a redis-server
that the run creates and always removes: a per-rule ``sh -c "iptables ..."`` baseline (the
seed's way); per backend (nftables, ipset, iptables, memory) pushfw end to end, idle
latency, reconcile time, TTL expiry lag and worker RSS (set backends: also with 1M rules);
Redis memory per rule; the bare Redis drain and parse limits and the raw kernel batch rate
of ipset and nftables; and a table of the one-host speed and timeliness targets, met or not.
"""
