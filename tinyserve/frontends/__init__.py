"""Front ends: each translates one wire (tcp: tinyserve's own protocol; http and grpc: the Open
Inference Protocol) to the server core's API (`tinyserve.core.api`) and nothing else."""
