"""Building blocks shared by every family: linear layers, norms, attention, RoPE, MLPs, MoE."""
