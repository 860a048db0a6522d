"""Every place fl-ser replaces or re-implements Flower internals, in one module, each checked against flwr 1.42.0.

fl-ser runs on the pinned ``flwr==1.42.0``. Where Flower's own code was too slow,
wrong or weaker than fl-ser needs, fl-ser swaps a piece of it; all those pieces
and their installers are here, so a Flower upgrade has one file to read. Each
patch (a :class:`Patch`) refuses to install on another flwr version, and checks
that what it replaces still exists, has the expected signature and is still
looked up where Flower uses it, so that a refactor in Flower fails at install
time instead of silently bypassing the patch. ``tests/test_flower_compat.py``
checks that every patch takes effect. The patches (name: what it replaces, why;
what a Flower upgrade must recheck):

- ``secagg-device-crypto`` (:func:`install_secagg_device_crypto`, run by the
  device mod :func:`secaggplus_mod`): ``generate_key_pairs``,
  ``bytes_to_private_key``, ``create_shares`` and ``pseudo_rand_gen`` in Flower's
  device ``secaggplus_mod`` module, for P-256 keys, fast compatible Shamir sharing
  and ChaCha20 masks (:mod:`fl_ser.privacy.secagg_crypto`). Recheck that
  ``_setup``, ``_share_keys`` and ``_collect_masked_vectors`` still call these
  names from their module, and Flower's share, key and mask formats.
- ``secagg-server-crypto`` (:class:`SecAggPlus`): ``combine_shares`` and
  ``pseudo_rand_gen`` in Flower's ``secaggplus_workflow`` module: fast
  recombination, and the masks the devices use. Recheck ``unmask_stage``.
- ``secagg-setup-stage`` (:class:`SecAggPlus`, a subclass of Flower's
  ``SecAggPlusWorkflow``): a device that missed the setup stage made every
  survivor fail at unmasking (KeyError), so it is pruned after setup; the setup
  message announces :data:`~fl_ser.protocol.MASK_SCHEME` and a reply that does
  not echo it counts as a failed device. Recheck whether Flower now prunes
  setup dropouts itself, ``WorkflowState``'s fields, and that setup still goes
  through ``grid.send_and_receive`` with the ``secaggplus_configs`` record.
- ``simulation-dispatch`` (:func:`proportional_dispatch`):
  ``vce_api.add_messages_to_queue``. Flower's dispatcher asks the in-memory
  LinkState for each virtual node's next message every 0.1 s, and each ask scans
  every stored message (nodes x messages per pass: ~110 s rounds at 10,000
  devices); :func:`dispatch_messages` scans once per pass. Recheck
  ``vce_api.run_api``'s dispatcher thread, and ``InMemoryLinkState``'s lock,
  ``message_ins_store``, ``_check_stored_messages`` and ``get_message_ins``.
- ``supernode-capped-sleep`` (:func:`install_capped_sleep`): the ``time`` module
  seen by ``flwr.supernode.start_client_internal``: its 3 s idle wait made a
  four-exchange SecAgg+ round cost over 10 s on loopback. Recheck that the
  SuperNode's loop still waits with ``time.sleep`` from that module.
- ``superexec-fork-executor`` (:func:`install_fork_executor`):
  ``run_superexec.get_executor`` for the subprocess executor, so that ClientApp
  processes are forked from a parent with torch imported (~8 s of CPU saved per
  message). Recheck ``SubprocessExecutor.launch``'s command line (mirrored by
  :class:`ForkExecutor`), the ``Executor`` protocol and ``ExecutionSpec``.
- ``grid-poll-interval`` (:class:`PromptGrid`): ``Grid.send_and_receive``,
  re-implemented on ``push_messages``/``pull_messages`` because Flower's
  Deployment grid polls every 3 s and its in-memory grid every 0.1 s. Recheck
  ``Grid``'s abstract methods and ``send_and_receive``'s contract.
- ``control-api-run-status`` (:class:`RunFollower`): uses the Flower CLI's
  internals (``read_superlink_connection``, ``init_http_client_from_connection``,
  ``ListRunsRequest``, ``run_from_proto``) to follow a run without starting the
  ``flwr`` CLI for every poll. Recheck their signatures and ``ListRuns``' reply.
- ``supernode-arguments`` (:func:`supernode_args`): the private
  ``flower_supernode._parse_args_run_supernode``, to read the SuperNode's
  options and start the warm SuperExec beside it. Recheck ``--isolation`` and
  the runtime API address options (``host``, ``port``).

Importing this module is light: the standard library, fl-ser's protocol names
and the parts of ``flwr`` that ``import flwr`` loads anyway (device processes
import it regardless); the Simulation Runtime (which imports Ray), the
SuperNode, the SuperExec and the CLI are imported inside their installers.
Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import signal
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, fields
from logging import WARNING

import flwr
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.supercore import log

from fl_ser.privacy.refusals import IncompatibleProtocol
from fl_ser.protocol import MASK_SCHEME, MASK_SCHEME_KEY, PublicError

FLOWER_VERSION = "1.42.0"  # the pin in pyproject.toml; every patch below was read against this version

SECAGG_DEVICE_MODULE = "flwr.client.mod.secure_aggregation.secaggplus_mod"
SECAGG_SERVER_MODULE = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
STOCK_MASKS = "Flower's 32-bit-seeded Mersenne Twister"
PRG_PARAMS = ("seed", "num_range", "dimensions_list")


class FlowerCompatError(RuntimeError):
    """A patch of Flower internals does not fit the installed flwr; the message names the patch and what to check."""


class MaskSchemeMismatch(RuntimeError):
    """No device in a SecAgg+ round expands masks the way this server does."""


def _looked_up(function, name: str) -> bool:
    """Whether ``function`` (or code nested in it) refers to ``name`` as a global or attribute."""
    stack = [function.__code__]
    while stack:
        code = stack.pop()
        if name in code.co_names:
            return True
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return False


@dataclass(frozen=True)
class Patch:
    """One replacement of Flower internals: its name, what it replaces and what an upgrade must recheck."""

    name: str
    replaces: str
    recheck: str

    def error(self, problem: str) -> FlowerCompatError:
        return FlowerCompatError(f"fl-ser's Flower patch {self.name!r} (replaces {self.replaces}): {problem}. "
                                 f"Recheck {self.recheck}; see fl_ser/flower_compat.py.")

    def check_version(self) -> None:
        if flwr.__version__ != FLOWER_VERSION:
            raise self.error(f"it was written for flwr {FLOWER_VERSION}, but flwr {flwr.__version__} is installed. "
                             f"Install flwr=={FLOWER_VERSION} (pyproject.toml pins it), or port the patch and then "
                             "update FLOWER_VERSION and the pin")

    def require(self, condition: bool, problem: str) -> None:
        if not condition:
            raise self.error(problem)

    def module(self, name: str) -> types.ModuleType:
        self.check_version()
        try:
            return importlib.import_module(name)
        except ImportError as err:
            raise self.error(f"module {name} is gone ({err})") from err

    def original(self, module: types.ModuleType, attr: str, params: tuple[str, ...] | None = None,
                 used_by: Iterable[str] = ()):
        """Flower's own ``module.attr`` (remembered the first time, before any patch replaced it), checked: it
        still exists, takes ``params``, and each of ``used_by`` (functions of ``module``, dotted) looks it up."""
        self.require(hasattr(module, attr), f"{module.__name__}.{attr} no longer exists")
        found = _ORIGINALS.setdefault((module.__name__, attr), getattr(module, attr))
        if params is not None:
            got = tuple(inspect.signature(found).parameters)
            self.require(got == params, f"{module.__name__}.{attr} takes {got}, expected {params}")
        for path in used_by:
            function = module
            for part in path.split("."):
                function = getattr(function, part, None)
            self.require(function is not None and _looked_up(function, attr),
                         f"{module.__name__}.{path} no longer uses {attr}, so replacing it would have no effect")
        return found

    def replace(self, module: types.ModuleType, replacements: list[tuple[str, object, tuple | None, list[str]]]):
        """Check every (attr, new, params, used_by) first, then replace them all: nothing half-installed. Already
        in place (checked when it was installed): nothing to do, which keeps a per-message install cheap."""
        if all(getattr(module, attr, None) is new for attr, new, _, _ in replacements):
            return
        for attr, _, params, used_by in replacements:
            self.original(module, attr, params, used_by)
        for attr, new, _, _ in replacements:
            setattr(module, attr, new)


_ORIGINALS: dict[tuple[str, str], object] = {}  # Flower's own attributes, before any patch replaced them

SECAGG_DEVICE = Patch(
    "secagg-device-crypto",
    f"generate_key_pairs, bytes_to_private_key, create_shares and pseudo_rand_gen in {SECAGG_DEVICE_MODULE}",
    "that secaggplus_mod's _setup, _share_keys and _collect_masked_vectors still call these names from their "
    "module with these signatures, and that Flower's share, key and mask formats are unchanged "
    "(tests/test_secagg_crypto.py)")
SECAGG_SERVER = Patch(
    "secagg-server-crypto", f"combine_shares and pseudo_rand_gen in {SECAGG_SERVER_MODULE}",
    "that SecAggPlusWorkflow.unmask_stage still calls them from its module")
SECAGG_SETUP = Patch(
    "secagg-setup-stage", "SecAggPlusWorkflow.setup_stage (fl-ser's SecAggPlus subclass)",
    "whether Flower still keeps devices that missed setup among the sampled ones (then the prune is still "
    "needed), WorkflowState's fields, and that setup_stage still sends the secaggplus_configs record through "
    "grid.send_and_receive")
SIM_DISPATCH = Patch(
    "simulation-dispatch", "flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue",
    "vce_api.run_api's dispatcher thread and its arguments, and InMemoryLinkState's lock, message_ins_store, "
    "_check_stored_messages and get_message_ins's delivery rules")
CAPPED_SLEEP = Patch(
    "supernode-capped-sleep", "the time module seen by flwr.supernode.start_client_internal",
    "that the SuperNode's main loop still waits with time.sleep looked up in that module")
FORK_EXECUTOR = Patch(
    "superexec-fork-executor", "flwr.supercore.superexec.run_superexec.get_executor (the subprocess executor)",
    "SubprocessExecutor.launch's command line (ForkExecutor.launch mirrors it), the Executor protocol and "
    "ExecutionSpec's fields")
PROMPT_GRID = Patch(
    "grid-poll-interval", "Grid.send_and_receive (re-implemented by PromptGrid on push_messages/pull_messages)",
    "Grid's abstract methods and send_and_receive's contract (flwr.superlink.grid.http_grid / inmemory_grid)")
CONTROL_CLIENT = Patch(
    "control-api-run-status",
    "the Flower CLI's read_superlink_connection, init_http_client_from_connection, ListRunsRequest and "
    "run_from_proto", "that these still exist with these signatures and that ListRuns still answers run_dict")
SUPERNODE_ARGS = Patch(
    "supernode-arguments", "flwr.supernode.cli.flower_supernode._parse_args_run_supernode (private)",
    "the SuperNode's --isolation option and its runtime API address (host, port)")
PATCHES = (SECAGG_DEVICE, SECAGG_SERVER, SECAGG_SETUP, SIM_DISPATCH, CAPPED_SLEEP, FORK_EXECUTOR, PROMPT_GRID,
           CONTROL_CLIENT, SUPERNODE_ARGS)


# --- SecAgg+: fl-ser's cryptography in Flower's device mod and server workflow --------------------------------


def install_secagg_device_crypto() -> None:
    """Make Flower's SecAgg+ device mod use fl-ser's keys, secret sharing and ChaCha20 masks."""
    from fl_ser.privacy import secagg_crypto

    SECAGG_DEVICE.replace(SECAGG_DEVICE.module(SECAGG_DEVICE_MODULE), [
        ("generate_key_pairs", secagg_crypto.key_pair, (), ["_setup"]),
        ("bytes_to_private_key", secagg_crypto.private_key, ("private_key_bytes",),
         ["_share_keys", "_collect_masked_vectors"]),
        ("create_shares", secagg_crypto.create_shares, ("secret", "threshold", "num"), ["_share_keys"]),
        ("pseudo_rand_gen", secagg_crypto.mask_prg, PRG_PARAMS, ["_collect_masked_vectors"]),
    ])


def install_secagg_server_crypto() -> None:
    """Make Flower's SecAgg+ server workflow recombine secrets fast and remove fl-ser's ChaCha20 masks."""
    from fl_ser.privacy import secagg_crypto

    unmask = ["SecAggPlusWorkflow.unmask_stage"]
    SECAGG_SERVER.replace(SECAGG_SERVER.module(SECAGG_SERVER_MODULE), [
        ("combine_shares", secagg_crypto.combine_shares, ("share_list",), unmask),
        ("pseudo_rand_gen", secagg_crypto.mask_prg, PRG_PARAMS, unmask),
    ])


def secaggplus_mod(msg: Message, ctxt, call_next) -> Message:
    """The device's SecAgg+ mod: Flower's ``secaggplus_mod`` with fl-ser's crypto installed, refusing a server
    whose announced mask scheme is not fl-ser's and echoing the scheme in its setup reply."""
    from flwr.app.message_type import MessageType
    from flwr.client.mod import secaggplus_mod as flower_secaggplus_mod

    install_secagg_device_crypto()
    setup = False
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        setup = configs.get(Key.STAGE) == Stage.SETUP
        announced = configs.get(MASK_SCHEME_KEY)
        if setup and announced != MASK_SCHEME:
            theirs = repr(announced) if announced else f"{STOCK_MASKS} (it announced no {MASK_SCHEME_KEY})"
            raise IncompatibleProtocol(f"the server's SecAgg+ expands masks with {theirs}, this device only with "
                                       f"fl-ser's ChaCha20 scheme {MASK_SCHEME!r}; run fl-ser's ServerApp (of the "
                                       "same fl-ser version as this device's)")
    reply = flower_secaggplus_mod(msg, ctxt, call_next)
    if setup and not reply.has_error():
        reply.content.config_records[RECORD_KEY_CONFIGS][MASK_SCHEME_KEY] = MASK_SCHEME
    return reply


class _MaskSchemeGrid:
    """The grid Flower's setup stage talks through: announces fl-ser's mask scheme in every setup message and
    passes on only the replies that echo it (any other counts as a failed device for the round)."""

    def __init__(self, grid, state):
        self.grid, self.state = grid, state
        self.matching, self.mismatched = 0, 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for m in messages:
            m.content.config_records[RECORD_KEY_CONFIGS][MASK_SCHEME_KEY] = MASK_SCHEME
        kept = []
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error():
                self.mismatched += reply.error.code == PublicError.INCOMPATIBLE_PROTOCOL
                kept.append(reply)
                continue
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            echoed = configs.get(MASK_SCHEME_KEY) if configs is not None else None
            if echoed == MASK_SCHEME:
                self.matching += 1
                kept.append(reply)
                continue
            self.mismatched += 1
            problem = (f"device {reply.metadata.src_node_id}'s SecAgg+ mask scheme is not fl-ser's "
                       f"({echoed!r} instead of {MASK_SCHEME!r}; a stock Flower secaggplus_mod expands masks "
                       f"with {STOCK_MASKS}): it is left out of this round; run fl-ser's ClientApp on every device.")
            log(WARNING, "%s", problem)
            self.state.failures.append(MaskSchemeMismatch(problem))
        return kept

    def __getattr__(self, name: str):
        return getattr(self.grid, name)


class SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with fl-ser's crypto, the mask scheme checked at setup, and setup dropouts pruned.

    Flower 1.42 keeps a device that never answered the *setup* stage among the
    sampled devices, so at unmasking it counts as "dropped after sharing keys" and
    the surviving devices are asked for key shares they never received: they fail
    (``KeyError`` in ``secaggplus_mod``) and the round is lost. This workflow
    removes such devices right after setup (they never sent a key, so nobody
    masked with them); dropouts in later stages are Flower's own recovery. Devices
    whose setup reply does not echo fl-ser's mask scheme are treated the same way;
    if no device answers with it, the workflow raises :class:`MaskSchemeMismatch`.
    """

    def __init__(self, **kwargs):
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

        SECAGG_SETUP.check_version()
        state_fields = {f.name for f in fields(WorkflowState)}
        SECAGG_SETUP.require({"active_node_ids", "sampled_node_ids", "nid_to_neighbours", "failures"} <= state_fields,
                             f"WorkflowState has fields {sorted(state_fields)}")
        SECAGG_SETUP.require(_looked_up(SecAggPlusWorkflow.setup_stage, "send_and_receive"),
                             "SecAggPlusWorkflow.setup_stage no longer calls grid.send_and_receive")
        install_secagg_server_crypto()
        super().__init__(**kwargs)

    def setup_stage(self, grid, context, state) -> bool:
        checked = _MaskSchemeGrid(grid, state)
        ok = super().setup_stage(checked, context, state)
        if checked.mismatched and not checked.matching:
            raise MaskSchemeMismatch(f"SecAgg+ setup: none of the {checked.mismatched} devices that answered "
                                     f"expands masks with fl-ser's scheme {MASK_SCHEME!r} (a stock Flower "
                                     f"secaggplus_mod uses {STOCK_MASKS} and sends no {MASK_SCHEME_KEY}). Run "
                                     "fl-ser's ClientApp on every device.")
        keyed = set(state.active_node_ids)  # the devices that sent their public keys
        state.sampled_node_ids = keyed
        state.nid_to_neighbours = {nid: nbrs & keyed for nid, nbrs in state.nid_to_neighbours.items() if nid in keyed}
        return ok


# --- Simulation Runtime: a dispatcher proportional to the messages waiting --------------------------------------

VCE_API = "flwr.server.superlink.fleet.vce.vce_api"
DISPATCH_INTERVAL_S = 0.01
dispatch_counts: Counter = Counter()  # "passes" and "messages" of fl-ser's dispatcher in this process


def dispatch_messages(state, queue, nodes_mapping, f_stop: threading.Event) -> None:
    """Put each virtual node's next undelivered message in the workers' queue, until ``f_stop`` is set: one scan
    of the waiting messages per pass, with Flower's validity checks (``_check_stored_messages``: expiry and
    federation membership) and its at-most-one message per node per pass. Another LinkState gets Flower's."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.supercore.date import now

    if not isinstance(state, InMemoryLinkState):
        return _ORIGINALS[(VCE_API, "add_messages_to_queue")](state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        with state.lock:
            waiting = {mid for mid, m in state.message_ins_store.items()
                       if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes_mapping}
            state._check_stored_messages(waiting)  # drops expired and out-of-federation messages, as Flower does
            batch, nodes = [], set()
            for mid, m in state.message_ins_store.items():  # insertion order: a node's oldest message first
                if mid in waiting and m.metadata.dst_node_id not in nodes:
                    nodes.add(m.metadata.dst_node_id)
                    batch.append(m)
            delivered_at = now().isoformat()
            for m in batch:
                m.metadata.delivered_at = delivered_at
        for m in batch:
            queue.put(m)
        dispatch_counts.update(passes=1, messages=len(batch))
        f_stop.wait(DISPATCH_INTERVAL_S)


@contextlib.contextmanager
def proportional_dispatch():
    """Within the block, Flower's Simulation Runtime dispatches with :func:`dispatch_messages`."""
    vce_api = SIM_DISPATCH.module(VCE_API)
    linkstate = SIM_DISPATCH.module("flwr.server.superlink.linkstate.in_memory_linkstate").InMemoryLinkState
    SIM_DISPATCH.require(all(_looked_up(linkstate.__init__, a) for a in ("lock", "message_ins_store")),
                         "InMemoryLinkState no longer has lock and message_ins_store")
    SIM_DISPATCH.require(tuple(inspect.signature(linkstate._check_stored_messages).parameters)
                         == ("self", "message_ids", "run_id"), "InMemoryLinkState._check_stored_messages changed")
    flower_dispatch = SIM_DISPATCH.original(vce_api, "add_messages_to_queue",
                                            ("state", "queue", "nodes_mapping", "f_stop"), ["run_api"])
    vce_api.add_messages_to_queue = dispatch_messages
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = flower_dispatch


# --- SuperNode: capped idle waits --------------------------------------------------------------------------------


class CappedSleep:
    """The ``time`` module, except that ``sleep`` never waits longer than ``cap`` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def install_capped_sleep(cap: float) -> None:
    """Cap every wait of the SuperNode's main loop (idle pulls, push retries) at ``cap`` seconds."""
    node_loop = CAPPED_SLEEP.module("flwr.supernode.start_client_internal")
    flower_time = CAPPED_SLEEP.original(node_loop, "time", used_by=["start_client_internal"])
    CAPPED_SLEEP.require(flower_time is time, f"{node_loop.__name__}.time is {flower_time!r}, not the time module")
    CAPPED_SLEEP.require(_looked_up(node_loop.start_client_internal, "sleep"),
                         "start_client_internal no longer calls time.sleep")
    node_loop.time = CappedSleep(cap)


# --- SuperExec: ClientApp processes forked warm ------------------------------------------------------------------


class ForkExecutor:
    """Flower's ``SubprocessExecutor``, except that ClientApp tasks run in a fork of this (warm) process.

    The child runs ``flwr-clientapp`` with the arguments Flower's executor would
    give it, handles one message and exits; it forgets the parent's fl-ser
    modules first, so the app is loaded from the run's FAB (Flower's ``load_app``
    reuses modules already in ``sys.modules``)."""

    def __init__(self):
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.fallback = SubprocessExecutor()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished children

    def get_eligible_capacity(self, supported_task_types, **kwargs):
        return self.fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type=None, **kwargs) -> None:
        self.fallback.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec):
        from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.fallback.launch(spec)
        args = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
                spec.runtime_api_address, "--token", spec.token]
        if spec.insecure:
            args.append("--insecure")
        elif spec.root_certificates_path is not None:
            args += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            args += ["--parent-pid", str(spec.parent_pid)]
        if spec.runtime_dependency_install:
            args.append("--allow-runtime-dependency-installation")
        if os.fork() == 0:  # the child: become a ClientApp process, never return into the executor loop
            code = 1
            try:
                os.setsid()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                if spec.suppress_output:
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 1)
                    os.dup2(devnull, 2)
                for name in [m for m in sys.modules if m == "fl_ser" or m.startswith("fl_ser.")]:
                    del sys.modules[name]
                from flwr.supernode.cli import flwr_clientapp

                sys.argv = args
                flwr_clientapp()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return LaunchResult.accepted()

    def close(self) -> None:
        self.fallback.close()

    def reconcile(self) -> None:
        self.fallback.reconcile()


def install_fork_executor() -> None:
    """Make the SuperExec of this process launch ClientApp processes with :class:`ForkExecutor`."""
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec.executor.types import ExecutionSpec, Executor

    superexec = FORK_EXECUTOR.module("flwr.supercore.superexec.run_superexec")
    protocol = {n for n in vars(Executor) if not n.startswith("_")}
    FORK_EXECUTOR.require(protocol <= set(vars(ForkExecutor)), f"the Executor protocol now has {sorted(protocol)}")
    spec_fields = {f.name for f in fields(ExecutionSpec)}
    used = {"task_type", "runtime_api_address", "token", "insecure", "root_certificates_path", "parent_pid",
            "runtime_dependency_install", "suppress_output"}
    FORK_EXECUTOR.require(used <= spec_fields, f"ExecutionSpec has fields {sorted(spec_fields)}")
    flower_get_executor = FORK_EXECUTOR.original(
        superexec, "get_executor", ("executor_type", "executor_config", "insecure", "root_certificates_path"),
        ["run_superexec"])

    def get_executor(executor_type, *args, **kwargs):
        if executor_type == ExecutorType.SUBPROCESS:
            return ForkExecutor()
        return flower_get_executor(executor_type, *args, **kwargs)

    superexec.get_executor = get_executor


def supernode_args(argv: list[str]):
    """The SuperNode's options as ``flower-supernode`` parses them (unknown options ignored)."""
    cli = SUPERNODE_ARGS.module("flwr.supernode.cli.flower_supernode")
    parser = SUPERNODE_ARGS.original(cli, "_parse_args_run_supernode", ())()
    args, _ = parser.parse_known_args(argv)
    SUPERNODE_ARGS.require(all(hasattr(args, a) for a in ("isolation", "host", "port")),
                           "the SuperNode's options no longer include isolation, host and port")
    return args


# --- ServerApp: a grid that polls for replies at fl-ser's interval -----------------------------------------------


class PromptGrid(Grid):
    """Any grid, with ``send_and_receive`` polling for replies every ``poll_interval_s`` (Flower's Deployment
    grid polls every 3 s, its in-memory grid every 0.1 s); everything else is delegated."""

    EXPECTED = frozenset({"run", "push_messages", "pull_messages", "create_message", "set_run", "send_and_receive",
                          "get_node_ids"})

    def __init__(self, grid: Grid, poll_interval_s: float):
        PROMPT_GRID.check_version()
        PROMPT_GRID.require(Grid.__abstractmethods__ == self.EXPECTED,
                            f"Grid's abstract methods are now {sorted(Grid.__abstractmethods__)}")
        PROMPT_GRID.require(tuple(inspect.signature(Grid.send_and_receive).parameters)
                            == ("self", "messages", "timeout"), "Grid.send_and_receive's signature changed")
        if poll_interval_s <= 0:
            raise ValueError(f"federation.poll_interval_s must be positive, got {poll_interval_s}")
        self.grid = grid
        self.poll_interval_s = poll_interval_s

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None):
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push the messages, then collect replies until all arrived or ``timeout`` seconds passed."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval_s)
        return replies


# --- Deployment: follow a run through the Control API in-process -------------------------------------------------


class RunFollower:
    """The status of runs on a SuperLink, through its Control API with the Flower CLI's own client and
    connection settings (``FLWR_HOME``'s ``connection``), without starting the ``flwr`` CLI for every poll."""

    def __init__(self, flwr_home: str, connection: str):
        config = CONTROL_CLIENT.module("flwr.cli.flower_config")
        utils = CONTROL_CLIENT.module("flwr.cli.utils")
        read = CONTROL_CLIENT.original(config, "read_superlink_connection", ("connection_name",))
        init = CONTROL_CLIENT.original(utils, "init_http_client_from_connection", ("connection", "auth_plugin"))
        self.run_from_proto = CONTROL_CLIENT.original(CONTROL_CLIENT.module("flwr.common.serde"), "run_from_proto",
                                                      ("run_proto",))
        self.request = CONTROL_CLIENT.original(CONTROL_CLIENT.module("flwr.proto.control_pb2"), "ListRunsRequest")
        CONTROL_CLIENT.require("run_id" in self.request.DESCRIPTOR.fields_by_name, "ListRunsRequest has no run_id")
        previous = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = flwr_home
        try:
            self.client = init(read(connection))
        finally:
            if previous is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = previous

    def status(self, run_id: int) -> tuple[str, str, str]:
        """(status, sub-status, details) of the run."""
        res = self.client.ListRuns(self.request(run_id=run_id))
        run = self.run_from_proto(next(iter(res.run_dict.values())))
        return run.status.status, run.status.sub_status, run.status.details

    def close(self) -> None:
        self.client.close()
