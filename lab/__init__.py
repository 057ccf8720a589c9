"""vigil's fault lab: real hosts (network namespaces), real etcd, real agents, random faults, audits (see docs/reliability.md)."""
