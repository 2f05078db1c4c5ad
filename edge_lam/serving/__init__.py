"""What devices run for inference: answers of a member model, greedy generation, a model as
a chain of layer units, MoE experts from a dense FFN, chain-of-thought steps."""
