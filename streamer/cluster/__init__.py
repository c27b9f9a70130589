"""Cluster coordination: what several Streamer nodes agree on through etcd
(membership, shard ownership, fencing) and the etcd client it runs on
(``streamer.cluster.etcd``)."""
