"""Running deskgen on Ray clusters: the local multi-node cluster (local.sh), generated KubeRay and
cluster-launcher configs (render.py), and the helpers and probes the cluster tests use."""
