"""Real etcd in tests: the launcher lives in ``streamer.tools.etcd_members``
(the chaos run starts its members too); the tests import it from here."""

from streamer.tools.etcd_members import ETCD_MISSING, EtcdCluster, Member, etcd_cluster

__all__ = ["ETCD_MISSING", "EtcdCluster", "Member", "etcd_cluster"]
