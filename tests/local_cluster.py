"""Real local Ray clusters for tests and benchmarks: `ray start` processes on 127.0.0.1 (a
head and worker nodes, each with its own CPUs, resources and environment)."""

from __future__ import annotations

import os
import pathlib
import socket


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int, taken: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """`count` distinct free ports, none in `taken`. Every socket stays bound until all are
    chosen: ports asked for one at a time can repeat (the kernel may hand a just-released port
    out again), and Ray refuses to start when two of its components share one."""
    import contextlib

    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in taken:
                ports.append(port)
        return ports


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
        self.port, self.dashboard = free_ports(2)
        self.ports_in_use = {self.port, self.dashboard}
        self.temp_dir = f"/tmp/fsr-ray-{os.getpid()}-{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def _fresh_ports(self, count: int) -> list[int]:
        """Ports free now and used by no other node of this cluster."""
        ports = free_ports(count, taken=self.ports_in_use)
        self.ports_in_use.update(ports)
        return ports

    def _start(self, args: list[str], num_cpus: int, resources: dict | None, env: dict | None) -> None:
        import json
        import subprocess

        node_manager, object_manager, metrics, agent_http, agent_grpc, runtime_env = self._fresh_ports(6)
        ports = ["--node-ip-address=127.0.0.1", f"--node-manager-port={node_manager}",
                 f"--object-manager-port={object_manager}", f"--metrics-export-port={metrics}",
                 f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                 f"--runtime-env-agent-port={runtime_env}", f"--num-cpus={num_cpus}", "--disable-usage-stats"]
        if resources:
            ports.append(f"--resources={json.dumps(resources)}")
        started = subprocess.run([self.ray, "start", *args, *ports], env={**self.env, **(env or {})},
                                 capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]

    def start_head(self, num_cpus: int = 2, resources: dict | None = None, env: dict | None = None) -> None:
        self._start(["--head", f"--port={self.port}", f"--dashboard-port={self.dashboard}",
                     "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                     f"--ray-client-server-port={self._fresh_ports(1)[0]}", f"--temp-dir={self.temp_dir}"],
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
