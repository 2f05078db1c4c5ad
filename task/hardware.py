"""What each device profile can compute and hold: one table for the training fleet
(`strategies/fleet/model.py`) and the serving fleet (`server_app/serve/fleet.py`).

speed: single-stream fp32 PyTorch CPU throughput relative to a 2-core x86 vCPU. Geekbench 6
multi-core (browser.geekbench.com, typical): Raspberry Pi 4 ~ 650, Pi 5 ~ 1,500, a 2-core
server vCPU ~ 1,800, an 8-core laptop ~ 8,000; Jetson Orin Nano (8 GB) runs the model on its
1,024-core Ampere GPU (about 1.3 TFLOPS fp16 dense, NVIDIA's data sheet), ~ 6x the vCPU for
a 135M model.

memory_mib: the board's RAM less what the OS and its services keep: Raspberry Pi 4 (4 GB)
~ 3,000 MiB and Pi 5 (8 GB) ~ 6,500 MiB under Raspberry Pi OS; Jetson Orin Nano (8 GB shared
by CPU and GPU) ~ 6,000 MiB under JetPack's Ubuntu desktop; a 16 GB laptop ~ 12,000 MiB with
a desktop session open.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    speed: float  # compute speed relative to a 2-core x86 vCPU
    memory_mib: float  # memory left for the model


HARDWARE: dict[str, Hardware] = {
    "rpi4": Hardware(speed=0.35, memory_mib=3_000.0),
    "rpi5": Hardware(speed=0.8, memory_mib=6_500.0),
    "jetson-orin-nano": Hardware(speed=6.0, memory_mib=6_000.0),
    "laptop": Hardware(speed=4.0, memory_mib=12_000.0),
}
