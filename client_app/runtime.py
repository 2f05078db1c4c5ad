"""`edge-lam-device`: a long-lived ClientApp runtime beside `flower-supernode --isolation process`.

Why. Flower 1.39's SuperNode (default `--isolation subprocess`) has its SuperExec claim each
task and start a fresh `flwr-clientapp` process for it, which must send its first task
heartbeat within HEARTBEAT_DEFAULT_INTERVAL (30 s) of the claim. A device whose Python starts
slowly (a Raspberry Pi importing from an SD card, a loaded board, an emulated CPU) misses it:
the SuperNode forgets the claim, launches another ClientApp for the same task, and refuses the
first one's reply (`Runtime task-token authentication failed`, 401). Every round also pays
the process start, the imports and the model load again.

What this does instead. It imports the heavy libraries once, *before* it asks for a task (the
window does not run yet); then it claims tasks as `flower-superexec` does (`AcquireTask` on the
SuperNode's Runtime API), starts the task's heartbeat at once and runs the ClientApp in this
process, exactly as `flwr-clientapp` would (pull the message, install the FAB, load the app,
call it, push the reply and the task's status). The window is met in milliseconds whatever the
device's speed, and `edge_lam.models.lora_model` keeps the base model loaded across rounds.

    flower-supernode --isolation process ... &        # deploy/supernode.sh does both
    edge-lam-device --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid $!

A task whose heartbeat the SuperNode refuses (Flower raises SIGINT for it) fails alone; the
runtime goes on with the next. SIGTERM stops it after the running task.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from pathlib import Path

from edge_lam.training.overhead import CLAIMED_AT_ENV

DEFAULT_PRELOAD = "torch,transformers,peft,numpy"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-lam-device",
        description="Long-lived ClientApp runtime for `flower-supernode --isolation process`: "
                    "imports once, then claims and runs the SuperNode's tasks in this process.")
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                   help="the SuperNode's Runtime API (its --host/--port; default %(default)s)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true",
                     help="plain HTTP to the Runtime API (it listens on loopback by default)")
    tls.add_argument("--root-certificates", metavar="CA.crt",
                     help="CA that signed the Runtime API's certificate (--ssl-* of the SuperNode)")
    p.add_argument("--parent-pid", type=int,
                   help="exit when this process (the SuperNode) exits")
    p.add_argument("--preload", default=DEFAULT_PRELOAD,
                   help="comma-separated modules imported before the first claim "
                        "(default %(default)s; '' for none)")
    p.add_argument("--poll-interval", type=float, default=0.5,
                   help="seconds between asks for a task while idle (default %(default)s)")
    p.add_argument("--max-tasks", type=int, default=0,
                   help="exit after this many tasks (0: run until stopped)")
    p.add_argument("--ready-file", metavar="PATH",
                   help="create this file once the imports are done (deploy/supernode.sh "
                        "starts the SuperNode then, so the node is online only when it can "
                        "take tasks at once)")
    return p


def preload(modules: str) -> float:
    """Import `modules` now, so no claimed task waits for them; returns the seconds taken."""
    start = time.perf_counter()
    for name in filter(None, (m.strip() for m in modules.split(","))):
        importlib.import_module(name)
    return time.perf_counter() - start


class Runtime:
    """Claims the SuperNode's ClientApp tasks and runs each in this process."""

    def __init__(self, args: argparse.Namespace):
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        self.args = args
        self._client_cls, self._retry = RuntimeHttpClient, make_simple_http_retry_invoker
        self.certificates = validate_and_resolve_root_certificates(args.root_certificates,
                                                                   args.insecure)
        self.fab_hash: str | None = None
        self.fab_dir: Path | None = None
        self.stopping = False
        self.in_task = False

    def client(self, *interceptors):
        return self._client_cls.from_server_address(
            server_address=self.args.runtime_api_address, insecure=self.args.insecure,
            root_certificates=self.certificates, interceptors=list(interceptors),
            retry_invoker=self._retry())

    def serve(self) -> int:
        """Claim and run tasks until stopped (or --max-tasks); returns how many ran."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        claims = self.client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        done = 0
        try:
            while not self.stopping and (self.args.max_tasks <= 0 or done < self.args.max_tasks):
                res = claims.AcquireTask(AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP]))
                if res.HasField("task") and res.token:
                    try:
                        self.in_task = True
                        self.run_task(res.token)
                    except KeyboardInterrupt:  # Flower's SIGINT after a refused (401) call
                        print("edge-lam-device: task abandoned after the SuperNode refused "
                              "its token", file=sys.stderr, flush=True)
                    finally:
                        self.in_task = False
                    done += 1
                else:
                    time.sleep(self.args.poll_interval)
        finally:
            claims.close()
        return done

    def run_task(self, token: str) -> None:
        """One task, as `flwr-clientapp --token` runs it, without leaving the process."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor,
                                                 RuntimeVersionHttpInterceptor)
        from flwr.supernode.runtime.run_clientapp import (pull_task_input, push_message,
                                                          push_task_output)

        os.environ[CLAIMED_AT_ENV] = repr(time.time())
        client = self.client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                             RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            app = self.load_app(run, fab)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except KeyboardInterrupt:  # the SuperNode refused this task's heartbeat
            details = "the SuperNode refused the task's heartbeat; task abandoned"
            print(f"edge-lam-device: {details}", file=sys.stderr, flush=True)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            import traceback

            traceback.print_exc()
            details = f"{type(ex)}:<'{ex}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except (Exception, KeyboardInterrupt) as ex:  # pylint: disable=broad-except
                status, details = SubStatus.FAILED, f"the reply could not be pushed: {ex!r}"
                print(f"edge-lam-device: {details}", file=sys.stderr, flush=True)
            finally:
                push_task_output(client, context, status, details)
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
                os.environ.pop(CLAIMED_AT_ENV, None)

    def load_app(self, run, fab):
        """The run's ClientApp from its FAB; the app's own modules are imported again only
        when a run brings a different FAB (new code), never the preloaded libraries."""
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if fab.hash_str != self.fab_hash:
            install_from_fab(fab.content, skip_prompt=True)
            new_dir = Path(get_project_dir(run.fab_id, run.fab_version, fab.hash_str))
            # the app's code comes from this FAB: not from an earlier FAB, nor from the copy
            # installed on the device (this module's own package was imported from there)
            forget_app_modules(new_dir, self.fab_dir)
            self.fab_hash, self.fab_dir = fab.hash_str, new_dir
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        return load(run.fab_id, run.fab_version, fab.hash_str)


def forget_app_modules(project_dir: Path, old_dir: Path | None = None) -> list[str]:
    """Drop the modules named like the app's top-level packages and modules in `project_dir`
    (and `old_dir`) from `sys.modules`, and `old_dir` from `sys.path`, so that the next load
    imports them from `project_dir`. Returns the names dropped."""
    tops: set[str] = set()
    for folder in filter(None, (project_dir, old_dir)):
        if folder.is_dir():
            tops |= {p.name for p in folder.iterdir()
                     if p.is_dir() and (p / "__init__.py").exists()}
            tops |= {p.stem for p in folder.glob("*.py")}
    gone = [m for m in sys.modules if m.split(".", 1)[0] in tops]
    for name in gone:
        del sys.modules[name]
    if old_dir is not None:
        sys.path[:] = [p for p in sys.path if Path(p or ".").absolute() != old_dir.absolute()]
    importlib.invalidate_caches()
    return gone


def _exit_with_parent(pid: int) -> None:
    from flwr.supercore.app_utils import start_parent_process_monitor

    start_parent_process_monitor(pid)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.parent_pid is not None:
        _exit_with_parent(args.parent_pid)
    seconds = preload(args.preload)
    runtime = Runtime(args)
    print(f"edge-lam-device: preloaded {args.preload or 'nothing'} in {seconds:.1f} s; "
          f"claiming tasks at {args.runtime_api_address}", flush=True)
    if args.ready_file:
        Path(args.ready_file).touch()

    def stop(*_):  # SIGTERM: finish the running task first; idle (or waiting for a SuperNode
        # that is gone, retrying): stop now
        runtime.stopping = True
        if not runtime.in_task:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    done = runtime.serve()
    print(f"edge-lam-device: ran {done} task(s); stopping", flush=True)


if __name__ == "__main__":
    main()
