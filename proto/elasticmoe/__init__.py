"""Generated gRPC modules of elastic-moe (made by `make proto`); see proto/README.md."""
