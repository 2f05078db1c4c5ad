"""What runs on the edge server: ServerApp wiring, evaluation, results and plots."""
