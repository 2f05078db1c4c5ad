"""A realistic fleet (S2, S5): wireless links, round latency, device selection with bandwidth
allocation, and FedLaAvg's choice of the longest-absent devices. Pure math here; the
training strategies use it through their selection hook."""
