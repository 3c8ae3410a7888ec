"""Shared core of tauon's workloads: model-source resolution, permanent errors and the termination
message, small file helpers. Imported by ``tauon_train`` (the trainer) and ``tauon_serve`` (the model
server), which never import each other nor the operator (``tauon``)."""
