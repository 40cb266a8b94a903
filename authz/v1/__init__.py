"""Generated stubs of proto/authz/v1 (./scripts/gen-proto); do not edit the _pb2 modules."""
