"""Teacher to student: losses, the fused head-and-loss, bridges, train steps, teacher cache."""
