"""Real local Ray clusters for tests and benchmarks: `ray start` processes on 127.0.0.1 (a
head and worker nodes, each with its own CPUs, resources and environment)."""

from __future__ import annotations

import os
import pathlib
import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRayCluster:
    """Real `ray start` processes on 127.0.0.1: a head and worker nodes, each with its own
    CPUs, custom resources and environment (e.g. its own FISHERSFT_CACHE and HOME), token
    authentication as Ray enables it for new clusters. Every listening port is a free one:
    the fixed defaults (e.g. the job agent's 52365) collide with any other Ray instance."""

    def __init__(self):
        import secrets
        import sys

        self.ray = str(pathlib.Path(sys.executable).parent / "ray")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env["PATH"] = f"{pathlib.Path(sys.executable).parent}:{self.env['PATH']}"
        self.env["RAY_AUTH_MODE"] = "token"
        self.env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        self.port, self.dashboard = free_port(), free_port()
        self.temp_dir = f"/tmp/fsr-ray-{os.getpid()}-{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def _start(self, args: list[str], num_cpus: int, resources: dict | None, env: dict | None) -> None:
        import json
        import subprocess

        ports = ["--node-ip-address=127.0.0.1", f"--node-manager-port={free_port()}",
                 f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--num-cpus={num_cpus}", "--disable-usage-stats"]
        if resources:
            ports.append(f"--resources={json.dumps(resources)}")
        started = subprocess.run([self.ray, "start", *args, *ports], env={**self.env, **(env or {})},
                                 capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]

    def start_head(self, num_cpus: int = 2, resources: dict | None = None, env: dict | None = None) -> None:
        self._start(["--head", f"--port={self.port}", f"--dashboard-port={self.dashboard}",
                     "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                     f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}"],
                    num_cpus, resources, env)

    def add_worker(self, num_cpus: int = 2, resources: dict | None = None, env: dict | None = None) -> None:
        self._start([f"--address={self.address}"], num_cpus, resources, env)

    def client_env(self, **extra: str) -> dict:
        """The environment of a driver or `ray job submit` client of this cluster."""
        return {**self.env, "RAY_ADDRESS": self.address, **extra}

    def stop(self) -> None:
        """Stop every process of this cluster (its processes name its temp dir): `ray start
        --block` does not take its children down with it, and `ray stop` would stop every Ray
        instance on the machine."""
        import psutil

        procs = [p for p in psutil.process_iter(["cmdline"]) if self.temp_dir in " ".join(p.info["cmdline"] or [])]
        for proc in procs:
            proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=20)
        for proc in alive:
            proc.kill()
