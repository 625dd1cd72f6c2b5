"""elasticmoe.v1: expert.proto (internal) and serving.proto (client API), generated."""
