"""Byzantine-robust aggregation and contribution for heterogeneous-rank LoRA (S6, issue 17):
- `math`: robust statistics taken on the products B A (coordinate median, trimmed mean,
  Krum / multi-Krum, norm clipping, FLTrust), each returning the new global state and what
  each device weighed (and why a device was refused);
- `attacks`: poisoned replies (sign flip, scaling, Gaussian, a colluding pair) for tests and
  benchmarks;
- `contribution`: each device's leave-one-out contribution to the validation loss by a
  first-order influence estimate with a diagonal Fisher, and aggregation weights from it.
Pure math, not registered as an algorithm yet."""
