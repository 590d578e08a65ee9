"""The one model definition; parallelism is applied to it from outside."""
