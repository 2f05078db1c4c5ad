"""The device profiles: ONE table of what each profile can compute and hold, its links and
its power, read by training (`strategies/fleet/model.py`: the simulated fleet, S2/S5; the
default LoRA rank of `devices.rank.<profile>`, S1) and serving alike
(`server_app/serve/fleet.py`: the planners' devices, S8; `server_app/serve/lyapunov.py`:
energy per token).

speed: single-stream fp32 PyTorch CPU throughput relative to a 2-core x86 vCPU. Geekbench 6
multi-core (browser.geekbench.com, typical): Raspberry Pi 4 ~ 650, Pi 5 ~ 1,500, a 2-core
server vCPU ~ 1,800, an 8-core laptop ~ 8,000; Jetson Orin Nano (8 GB) runs the model on its
1,024-core Ampere GPU (about 1.3 TFLOPS fp16 dense, NVIDIA's data sheet), ~ 6x the vCPU for
a 135M model.

memory_mib: the board's RAM less what the OS and its services keep: Raspberry Pi 4 (4 GB)
~ 3,000 MiB and Pi 5 (8 GB) ~ 6,500 MiB under Raspberry Pi OS; Jetson Orin Nano (8 GB shared
by CPU and GPU) ~ 6,000 MiB under JetPack's Ubuntu desktop; a 16 GB laptop ~ 12,000 MiB with
a desktop session open.

snr_db: mean uplink SNR of the training fleet's wireless model: Wi-Fi links of 10-25 dB
mean, typical indoor ranges.

up_mbps / down_mbps / latency_s: the serving fleet's links: Pi 4 / Pi 5 on Wi-Fi 5 (~100 /
200 Mbit/s measured iperf3 range), Jetson and laptop on gigabit Ethernet; latencies one way
on a LAN.

watts: typical power under load (W), for energy per token = watts x seconds per token:
Raspberry Pi 4 ~6.4 W and Pi 5 ~8.5 W running stress (Raspberry Pi Ltd power measurements),
Jetson Orin Nano in its 15 W mode (NVIDIA data sheet), a laptop CPU under load ~45 W
(typical H-series TDP).

rank: the profile's default LoRA rank r_k (S1), `devices.rank.<profile>` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_lam.config.options import ConfigError


@dataclass(frozen=True)
class Hardware:
    speed: float  # compute speed relative to a 2-core x86 vCPU
    memory_mib: float  # memory left for the model
    snr_db: float  # mean uplink SNR (training fleet)
    up_mbps: float  # device -> server (serving fleet)
    down_mbps: float  # server -> device
    latency_s: float  # one way, per message
    watts: float  # power under load
    rank: int  # default LoRA rank


HARDWARE: dict[str, Hardware] = {
    "rpi4": Hardware(speed=0.35, memory_mib=3_000.0, snr_db=10.0, up_mbps=80, down_mbps=100,
                     latency_s=0.004, watts=6.4, rank=2),
    "rpi5": Hardware(speed=0.8, memory_mib=6_500.0, snr_db=15.0, up_mbps=150, down_mbps=200,
                     latency_s=0.003, watts=8.5, rank=4),
    "jetson-orin-nano": Hardware(speed=6.0, memory_mib=6_000.0, snr_db=20.0, up_mbps=900,
                                 down_mbps=900, latency_s=0.001, watts=15.0, rank=8),
    "laptop": Hardware(speed=4.0, memory_mib=12_000.0, snr_db=25.0, up_mbps=900,
                       down_mbps=900, latency_s=0.001, watts=45.0, rank=16),
}


def check_fleet_names(key: str, names: tuple[str, ...]) -> None:
    """A list of profile names (or one JSON fleet file, read when the run starts) names only
    profiles of the table."""
    if len(names) == 1 and names[0].endswith(".json"):
        return
    from pathlib import Path

    if len(names) == 1 and Path(names[0]).expanduser().is_file():
        return
    for name in names:
        if name not in HARDWARE:
            raise ConfigError(f"{key}: fleet profile '{name}' is not known: use one of "
                              f"{', '.join(HARDWARE)} or a JSON fleet file")
