"""3D parallelism on torch.distributed: tensor, sequence, pipeline and data parallel, and the cluster planner."""
