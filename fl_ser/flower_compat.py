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
  ``SecAggPlusWorkflow``): a device that missed the setup or the share-keys
  stage made every survivor fail at unmasking (KeyError), so it is pruned after
  each of those stages; the setup message announces
  :data:`~fl_ser.protocol.MASK_SCHEME` and a reply that does not echo it counts
  as a failed device. Recheck whether Flower now prunes those dropouts itself,
  ``WorkflowState``'s fields, and that setup still goes through
  ``grid.send_and_receive`` with the ``secaggplus_configs`` record.
- ``secagg-reply-check`` (:class:`SecAggPlus`): the grid each of
  ``SecAggPlusWorkflow``'s four stages sends and receives through, wrapped
  (:class:`_StageGrid`) to report who was asked and who answered at each stage
  (:attr:`SecAggPlus.round_report`), and to drop a masked vector that is not
  integers of the model's size below the modulus before
  ``collect_masked_vectors_stage`` sums it (Flower sums whatever arrives: one bad
  vector corrupted the aggregate); the device then counts as dropped at that
  stage and Flower's recovery removes its masks. Recheck that every stage still
  sends through ``grid.send_and_receive`` with the stage in the
  ``secaggplus_configs`` record, that ``collect_masked_vectors_stage`` sums
  exactly the replies it gets back, and the masked vector's layout (the weight
  factor first, ``factor_extract``).
- ``secagg-quantisation-range`` (:func:`check_quantisation_range`, run by
  :func:`secaggplus_mod`): replaces nothing; it reads the ``clipping_range`` and
  ``max_weight`` of the SecAgg+ setup from the state Flower's device mod keeps in
  the node state, to refuse (at the masked-vector stage, after the device's
  clipping and noise share, before quantisation) an update that Flower's
  quantiser would clip silently; values already on the quantiser's grid inside
  the range (distributed DP shares) pass, as Flower quantises them exactly.
  :func:`secagg_round_settings` reads the same state (with ``target_range`` and
  ``threshold``) for distributed DP. Recheck ``SecAggPlusState``'s fields, the
  state record's name and ``_collect_masked_vectors``'s weighting and
  quantisation.
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
- ``supernode-heartbeat`` (:func:`install_heartbeat_interval`): the heartbeat
  interval (``HEARTBEAT_DEFAULT_INTERVAL``, 30 s) that the SuperNode announces to
  the SuperLink and paces its heartbeats by. The SuperLink counts a node offline
  two intervals after its last heartbeat, so a device that died stayed "online"
  (sampled, then dropped) for up to 60 s and a restarted one was refused until
  then. Recheck that ``fleet_http_connection.http_request_response`` and
  ``HeartbeatSender._run`` still read that module-level constant, and the
  SuperLink's accepted range (``HEARTBEAT_MIN_INTERVAL``).
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
- ``resumable-rounds`` (:class:`ResumableWorkflow`): ``DefaultWorkflow.__call__``,
  whose loop always starts at round 1 from the strategy's initial parameters; a
  resumed run (``resume=RUN_DIR``) starts after its last checkpointed round, and
  every round ends with a hook that checkpoints the server's state. Recheck the
  steps of ``DefaultWorkflow.__call__`` and the ``MAIN_CONFIGS_RECORD`` keys.
- ``csprng-sampling`` (:func:`csprng_client_manager`):
  ``SimpleClientManager.sample``, which draws cohorts from the ``random`` module's
  Mersenne Twister (predictable from 624 outputs). Privacy amplification by
  subsampling assumes cohorts nobody can predict, so cohorts come from the OS
  CSPRNG: there is no generator state to save, and a resumed run's cohorts are as
  unpredictable as an uninterrupted run's. Recheck ``wait_for``, ``clients`` and
  ``sample``'s signature.

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
from logging import ERROR, INFO, WARNING

import flwr
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.supercore import log

from fl_ser.privacy.refusals import IncompatibleProtocol
from fl_ser.protocol import MASK_SCHEME, MASK_SCHEME_KEY, PublicError
from fl_ser.round_report import NO_REPLY, RoundReport, error_cause

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
    stack = [inspect.unwrap(function).__code__]  # a decorated function's own code (e.g. a @contextmanager)
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
    "secagg-setup-stage", "SecAggPlusWorkflow.setup_stage and share_keys_stage (fl-ser's SecAggPlus subclass)",
    "whether Flower still keeps devices that missed setup or share keys among the sampled ones (then the prune is "
    "still needed), WorkflowState's fields, and that setup_stage still sends the secaggplus_configs record "
    "through grid.send_and_receive")
SECAGG_REPLIES = Patch(
    "secagg-reply-check", "the grid of SecAggPlusWorkflow's four stages (fl-ser's SecAggPlus wraps it per stage)",
    "that every stage still sends through grid.send_and_receive with the stage in the secaggplus_configs record, "
    "that collect_masked_vectors_stage sums exactly the replies it gets back, and the masked vector's layout "
    "(weight factor first)")
SECAGG_RANGE = Patch(
    "secagg-quantisation-range", "nothing: it reads the SecAgg+ setup that Flower's secaggplus_mod keeps in the node "
    "state (clipping_range, max_weight)",
    "SecAggPlusState's fields, the secaggplus_state record, and that _collect_masked_vectors weights the fit "
    "reply's parameters by num_examples / max_weight and quantises them within +-clipping_range")
SIM_DISPATCH = Patch(
    "simulation-dispatch", "flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue",
    "vce_api.run_api's dispatcher thread and its arguments, and InMemoryLinkState's lock, message_ins_store, "
    "_check_stored_messages and get_message_ins's delivery rules")
CAPPED_SLEEP = Patch(
    "supernode-capped-sleep", "the time module seen by flwr.supernode.start_client_internal",
    "that the SuperNode's main loop still waits with time.sleep looked up in that module")
HEARTBEAT = Patch(
    "supernode-heartbeat", "HEARTBEAT_DEFAULT_INTERVAL in flwr.supernode.fleet_http_connection and "
    "flwr.supercore.heartbeat (the SuperNode's announced heartbeat interval and its pace)",
    "that http_request_response and HeartbeatSender._run still read it from their modules, and the SuperLink's "
    "accepted range HEARTBEAT_MIN_INTERVAL .. HEARTBEAT_MAX_INTERVAL")
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
RESUMABLE_ROUNDS = Patch(
    "resumable-rounds", "DefaultWorkflow.__call__ (re-implemented by ResumableWorkflow)",
    "DefaultWorkflow.__call__'s steps (client-manager thread, init, per-round fit / centralised evaluation / "
    "evaluate) and the MAIN_CONFIGS_RECORD keys it sets (Key.START_TIME, Key.CURRENT_ROUND)")
CSPRNG_SAMPLING = Patch(
    "csprng-sampling", "SimpleClientManager.sample (re-implemented by csprng_client_manager's subclass)",
    "SimpleClientManager's clients dict and wait_for, and that strategies still sample through the client "
    "manager's sample(num_clients, min_num_clients, criterion)")
PATCHES = (SECAGG_DEVICE, SECAGG_SERVER, SECAGG_SETUP, SECAGG_REPLIES, SECAGG_RANGE, SIM_DISPATCH, CAPPED_SLEEP,
           HEARTBEAT, FORK_EXECUTOR, PROMPT_GRID, CONTROL_CLIENT, SUPERNODE_ARGS, RESUMABLE_ROUNDS, CSPRNG_SAMPLING)


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
    whose announced mask scheme is not fl-ser's, echoing the scheme in its setup reply, and refusing an update
    that does not fit the quantisation range (:func:`check_quantisation_range`) before it is quantised."""
    from flwr.app.message_type import MessageType
    from flwr.client.mod import secaggplus_mod as flower_secaggplus_mod

    install_secagg_device_crypto()
    stage = None
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        stage = configs.get(Key.STAGE)
        announced = configs.get(MASK_SCHEME_KEY)
        if stage == Stage.SETUP and announced != MASK_SCHEME:
            theirs = repr(announced) if announced else f"{STOCK_MASKS} (it announced no {MASK_SCHEME_KEY})"
            raise IncompatibleProtocol(f"the server's SecAgg+ expands masks with {theirs}, this device only with "
                                       f"fl-ser's ChaCha20 scheme {MASK_SCHEME!r}; run fl-ser's ServerApp (of the "
                                       "same fl-ser version as this device's)")
    inner = call_next
    if stage == Stage.COLLECT_MASKED_VECTORS:  # the only stage at which Flower's mod trains (calls call_next)

        def inner(m, c):
            reply = call_next(m, c)
            if not reply.has_error():
                check_quantisation_range(reply, c)
            return reply

    reply = flower_secaggplus_mod(msg, ctxt, inner)
    if stage == Stage.SETUP and not reply.has_error():
        reply.content.config_records[RECORD_KEY_CONFIGS][MASK_SCHEME_KEY] = MASK_SCHEME
    return reply


class QuantisationRangeError(ValueError):
    """A device's update does not fit SecAgg+'s quantisation range (Flower would clip it silently)."""


def check_secagg_device_state() -> None:
    """Check that Flower's device SecAgg+ mod still keeps the setup's ``clipping_range`` and ``max_weight`` in
    the node state and quantises the update with them (the patch ``secagg-quantisation-range``)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    device = SECAGG_RANGE.module(SECAGG_DEVICE_MODULE)
    state_fields = {f.name for f in fields(device.SecAggPlusState)}
    SECAGG_RANGE.require({"clipping_range", "max_weight", "target_range", "threshold"} <= state_fields,
                         f"SecAggPlusState has fields {sorted(state_fields)}")
    SECAGG_RANGE.require(_looked_up(device.secaggplus_mod, "RECORD_KEY_STATE"),
                         f"secaggplus_mod no longer keeps its state in the node state's {RECORD_KEY_STATE} record")
    SECAGG_RANGE.require(all(_looked_up(device._collect_masked_vectors, name)
                             for name in ("clipping_range", "max_weight", "parameters_multiply", "quantize")),
                         "_collect_masked_vectors no longer weights by num_examples / max_weight and quantises "
                         "within clipping_range")
    SECAGG_RANGE.require(tuple(inspect.signature(device._collect_masked_vectors).parameters)
                         == ("state", "configs", "num_examples", "updated_parameters"),
                         "_collect_masked_vectors no longer quantises the fit reply's num_examples and parameters")


def check_quantisation_range(reply: Message, ctxt) -> None:
    """Refuse an update that Flower's SecAgg+ quantiser would silently clip (a corrupted sum).

    ``reply`` is the device's final fit reply, after its update clipping and noise share: exactly what
    ``_collect_masked_vectors`` weights by ``num_examples / max_weight`` and quantises to +-``clipping_range``,
    with the values of the SecAgg+ setup that the device keeps in its node state."""
    import numpy as np
    from flwr.common import parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
    from flwr.compat.common import recorddict_compat as compat

    check_secagg_device_state()
    setup = ctxt.state.config_records[RECORD_KEY_STATE]
    clipping_range, max_weight = float(setup["clipping_range"]), float(setup["max_weight"])
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    weight = fitres.num_examples
    arrays = parameters_to_ndarrays(fitres.parameters)
    if weight == max_weight and on_quantisation_grid(arrays, clipping_range, int(setup["target_range"])):
        return  # values on the grid inside the range (a distributed DP share) pass the quantiser exactly
    peak = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0) * weight / max_weight
    if peak > 0.9 * clipping_range or weight > max_weight:
        raise QuantisationRangeError(
            f"the update does not fit SecAgg+'s quantisation range: weighted peak {peak:.3g} vs clipping_range "
            f"{clipping_range} (weight {weight}, max_weight {max_weight}). Raise aggregation.clipping_range "
            f"(and aggregation.max_weight if the weight exceeds it), or clip updates with privacy=full.")


def on_quantisation_grid(arrays, clipping_range: float, target_range: int) -> bool:
    """Every value on the quantiser's grid inside the range, where its arithmetic is exact
    (:meth:`fl_ser.privacy.distributed.SecAggGrid.holds`): Flower's ``quantize`` then neither clips nor rounds."""
    from fl_ser.privacy.distributed import SecAggGrid

    return SecAggGrid.is_exact(clipping_range, target_range) and SecAggGrid(clipping_range, target_range).holds(arrays)


def secagg_round_settings(ctxt) -> tuple[float, int, int]:
    """``(clipping_range, quantization_range, threshold)`` of the SecAgg+ round this device is in, as its setup
    stage stored them in the node state (read while the device trains, inside Flower's mod)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    check_secagg_device_state()
    setup = ctxt.state.config_records.get(RECORD_KEY_STATE)
    if setup is None or not int(setup.get("threshold", 0)):
        raise FlowerCompatError("distributed DP trains only inside a SecAgg+ round (aggregation=secagg_plus): no "
                                "SecAgg+ setup is stored in this device's node state")
    return float(setup["clipping_range"]), int(setup["target_range"]), int(setup["threshold"])


class MalformedReply(RuntimeError):
    """A device's SecAgg+ reply that the server left out of the round (the message says why)."""


def _masked_vector_shapes(message: Message) -> list[tuple[int, ...]]:
    """The shapes a masked vector must have: the weight factor, then the global model the message carries."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    params = compat.recorddict_to_fitins(message.content, keep_input=True).parameters
    return [(1,), *(a.shape for a in parameters_to_ndarrays(params))]


def _masked_vector_problem(reply: Message, shapes: list[tuple[int, ...]], mod_range: int) -> str | None:
    """What is wrong with a device's masked vector (None: integers of ``shapes``, each in [0, mod_range))."""
    from flwr.common import bytes_to_ndarray

    try:
        vector = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    except Exception as err:  # no masked vector, or bytes that are no (pickle-free) numpy array
        return f"is unreadable ({type(err).__name__})"
    got = [a.shape for a in vector]
    if got != shapes:
        return f"has shapes {got}, not the model's {shapes} (weight factor first)"
    dtypes = sorted({str(a.dtype) for a in vector if a.dtype.kind not in "iu"})
    if dtypes:
        return f"is not integer data ({', '.join(dtypes)})"
    if any(a.size and (a.min() < 0 or a.max() >= mod_range) for a in vector):
        return f"has values outside [0, {mod_range})"
    return None


class _StageGrid:
    """The grid one of Flower's SecAgg+ stages talks through. It reports who was asked and who answered (a
    :class:`~fl_ser.round_report.RoundReport`) and passes on only well-formed replies: at setup, fl-ser's mask
    scheme is announced and only replies that echo it count; at the masked-vector stage, only vectors of the
    model's size in integers below the modulus. Any other reply counts as a failed device for the round: Flower
    never sums it, and from the masked-vector stage on its recovery removes that device's masks with the others
    from their key shares, as for a dropout."""

    def __init__(self, grid, state, report: RoundReport):
        self.grid, self.state, self.report = grid, state, report
        self.matching, self.mismatched = 0, 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        if stage == Stage.SETUP:
            for m in messages:
                m.content.config_records[RECORD_KEY_CONFIGS][MASK_SCHEME_KEY] = MASK_SCHEME
        shapes = _masked_vector_shapes(messages[0]) if stage == Stage.COLLECT_MASKED_VECTORS else None
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        # An error the SuperLink sends for a lost reply comes from the SuperLink's node id: map it to the device.
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        unanswered = {m.metadata.dst_node_id for m in messages}
        kept = []
        for reply in replies:
            nid = asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            unanswered.discard(nid)
            if reply.has_error():
                self.report.lost(stage, nid, error_cause(reply.error.code))
                self.mismatched += reply.error.code == PublicError.INCOMPATIBLE_PROTOCOL
                kept.append(reply)
            elif stage == Stage.SETUP:
                self._check_scheme(reply, nid, kept)
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                problem = _masked_vector_problem(reply, shapes, self.state.mod_range)
                if problem is None:
                    kept.append(reply)
                    continue
                text = (f"device {nid}'s masked vector {problem}: it is left out of this round (Flower's dropout "
                        "recovery removes its masks from the others' key shares); check that device's fl-ser "
                        "version and its link")
                self._reject(stage, nid, f"masked vector {problem}", MalformedReply(text))
            else:
                kept.append(reply)
        for nid in sorted(unanswered):
            self.report.lost(stage, nid, NO_REPLY)
        return kept

    def _check_scheme(self, reply: Message, nid: int, kept: list[Message]) -> None:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        echoed = configs.get(MASK_SCHEME_KEY) if configs is not None else None
        if echoed == MASK_SCHEME:
            self.matching += 1
            kept.append(reply)
            return
        self.mismatched += 1
        text = (f"device {nid}'s SecAgg+ mask scheme is not fl-ser's ({echoed!r} instead of {MASK_SCHEME!r}; a "
                f"stock Flower secaggplus_mod expands masks with {STOCK_MASKS}): it is left out of this round; run "
                "fl-ser's ClientApp on every device.")
        self._reject(Stage.SETUP, nid, f"mask scheme {echoed!r}, not fl-ser's {MASK_SCHEME!r}",
                     MaskSchemeMismatch(text))

    def _reject(self, stage: str, nid: int, reason: str, failure: Exception) -> None:
        log(WARNING, "%s", failure)
        self.state.failures.append(failure)
        self.report.reject(stage, nid, reason)

    def __getattr__(self, name: str):
        return getattr(self.grid, name)


def _keep_active(state) -> None:
    """Forget the devices that are no longer active, as if they had never been sampled: nobody masked with them,
    so unmasking must neither ask for their shares nor remove masks with them."""
    active = set(state.active_node_ids)
    state.sampled_node_ids = active
    state.nid_to_neighbours = {nid: nbrs & active for nid, nbrs in state.nid_to_neighbours.items() if nid in active}


def check_secagg_stages() -> None:
    """Check that each of Flower's SecAgg+ stages still talks through the grid it is given and that the
    masked-vector stage sums exactly the replies it gets back (the patch ``secagg-reply-check``)."""
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    SECAGG_REPLIES.check_version()
    state_fields = {f.name for f in fields(WorkflowState)}
    SECAGG_REPLIES.require({"nid_to_proxies", "legacy_results", "mod_range", "failures"} <= state_fields,
                           f"WorkflowState has fields {sorted(state_fields)}")
    for stage in ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage"):
        SECAGG_REPLIES.require(_looked_up(SecAggPlusWorkflow.__call__, stage),
                               f"SecAggPlusWorkflow.__call__ no longer runs {stage}")
        SECAGG_REPLIES.require(_looked_up(getattr(SecAggPlusWorkflow, stage), "send_and_receive"),
                               f"SecAggPlusWorkflow.{stage} no longer calls grid.send_and_receive")
    SECAGG_REPLIES.require(all(_looked_up(SecAggPlusWorkflow.collect_masked_vectors_stage, name)
                               for name in ("MASKED_PARAMETERS", "bytes_to_ndarray", "parameters_addition")),
                           "collect_masked_vectors_stage no longer sums the masked vectors of the replies")
    SECAGG_REPLIES.require(_looked_up(SecAggPlusWorkflow.unmask_stage, "factor_extract"),
                           "unmask_stage no longer reads the weight factor first in the masked vector")


class SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with fl-ser's crypto, every stage's replies checked and reported, and setup and
    share-keys dropouts pruned.

    Flower 1.42 keeps a device that never answered the *setup* or the *share
    keys* stage among the sampled devices, so at unmasking it counts as "dropped
    after sharing keys" and the surviving devices are asked for key shares they
    never received: they fail (``KeyError`` in ``secaggplus_mod``) and the round is
    lost. This workflow removes such devices right after each of those stages
    (their keys or key shares never reached anybody, so nobody masked with them);
    dropouts in later stages are Flower's own recovery. Devices
    whose setup reply does not echo fl-ser's mask scheme are treated the same way;
    if no device answers with it, the workflow raises :class:`MaskSchemeMismatch`.
    A masked vector that is not integers of the model's size below the modulus is
    never summed: the device counts as dropped at that stage (:class:`_StageGrid`).
    After each round, :attr:`round_report` says who was sampled and who was lost
    at which stage, and why. With ``min_contributors`` k, a round whose masked
    vectors came from fewer than k devices halts before unmasking, so no sum of
    fewer than k devices' inputs is ever computed (distributed DP calibrates
    each device's noise share to k, :mod:`fl_ser.privacy.distributed`).
    """

    def __init__(self, min_contributors: int = 0, **kwargs):
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

        SECAGG_SETUP.check_version()
        state_fields = {f.name for f in fields(WorkflowState)}
        SECAGG_SETUP.require({"active_node_ids", "sampled_node_ids", "nid_to_neighbours", "failures"} <= state_fields,
                             f"WorkflowState has fields {sorted(state_fields)}")
        check_secagg_stages()  # every stage, setup included, talks through the grid it is given
        install_secagg_server_crypto()
        super().__init__(**kwargs)
        self.min_contributors = int(min_contributors)
        self._report = RoundReport()

    @property
    def round_report(self) -> dict:
        """The last round's :class:`~fl_ser.round_report.RoundReport` as a JSON-able dict (node ids as ints),
        complete once the round's SecAgg+ protocol ended (aggregated or halted)."""
        return self._report.as_dict()

    @property
    def threshold(self) -> int:
        """The reconstruction threshold: the fewest devices whose shares unmask a sum."""
        return int(self.reconstruction_threshold)

    def setup_stage(self, grid, context, state) -> bool:
        self._report = RoundReport()
        checked = self._checked(grid, state)
        ok = super().setup_stage(checked, context, state)
        self._report.sampled = sorted(state.nid_to_proxies)
        if checked.mismatched and not checked.matching:
            raise MaskSchemeMismatch(f"SecAgg+ setup: none of the {checked.mismatched} devices that answered "
                                     f"expands masks with fl-ser's scheme {MASK_SCHEME!r} (a stock Flower "
                                     f"secaggplus_mod uses {STOCK_MASKS} and sends no {MASK_SCHEME_KEY}). Run "
                                     "fl-ser's ClientApp on every device.")
        _keep_active(state)  # the devices that sent their public keys
        return self._ended(Stage.SETUP, ok)

    def share_keys_stage(self, grid, context, state) -> bool:
        ok = super().share_keys_stage(self._checked(grid, state), context, state)
        _keep_active(state)  # the devices that sent key shares: nobody received any from the others
        return self._ended(Stage.SHARE_KEYS, ok)

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        ok = super().collect_masked_vectors_stage(self._checked(grid, state), context, state)
        if ok and len(state.active_node_ids) < self.min_contributors:
            log(ERROR, "SecAgg+: masked vectors from %d devices, fewer than the %d every sum must hold: the round "
                       "halts before unmasking", len(state.active_node_ids), self.min_contributors)
            ok = False
        return self._ended(Stage.COLLECT_MASKED_VECTORS, ok)

    def unmask_stage(self, grid, context, state) -> bool:
        ok = super().unmask_stage(self._checked(grid, state), context, state)
        if ok:  # every device whose masked vector was summed, unmask dropouts included (their masks were removed)
            self._report.participants = [proxy.node_id for proxy, _ in state.legacy_results]
        return self._ended(Stage.UNMASK, ok)

    def _checked(self, grid, state) -> _StageGrid:
        return _StageGrid(grid, state, self._report)

    def _ended(self, stage: str, ok: bool) -> bool:
        if not ok:
            self._report.halted_at = stage
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


def install_heartbeat_interval(seconds: float) -> None:
    """Make the SuperNode announce (and keep) a heartbeat every ``seconds`` instead of Flower's 30 s: the SuperLink
    then counts a dead node offline after ``2 * seconds`` instead of 60 s."""
    from flwr.common import constant

    HEARTBEAT.require(constant.HEARTBEAT_MIN_INTERVAL <= seconds <= constant.HEARTBEAT_MAX_INTERVAL,
                      f"a heartbeat interval of {seconds} s is outside the SuperLink's accepted range "
                      f"[{constant.HEARTBEAT_MIN_INTERVAL}, {constant.HEARTBEAT_MAX_INTERVAL}]")
    connection = HEARTBEAT.module("flwr.supernode.fleet_http_connection")
    sender = HEARTBEAT.module("flwr.supercore.heartbeat")
    HEARTBEAT.replace(connection, [("HEARTBEAT_DEFAULT_INTERVAL", seconds, None, ["http_request_response"])])
    HEARTBEAT.replace(sender, [("HEARTBEAT_DEFAULT_INTERVAL", seconds, None, ["HeartbeatSender._run"])])


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


# --- ServerApp: the round loop, resumable, and cohorts from the OS CSPRNG ----------------------------------------


def csprng_client_manager():
    """A ``SimpleClientManager`` whose ``sample`` draws from the OS CSPRNG (see ``csprng-sampling`` above); the
    subclass is built here so that importing this module stays light."""
    import random

    from flwr.server.client_manager import SimpleClientManager

    CSPRNG_SAMPLING.check_version()
    CSPRNG_SAMPLING.require(tuple(inspect.signature(SimpleClientManager.sample).parameters)
                            == ("self", "num_clients", "min_num_clients", "criterion"),
                            "SimpleClientManager.sample's signature changed")
    CSPRNG_SAMPLING.require(_looked_up(SimpleClientManager.sample, "random"),
                            "SimpleClientManager.sample no longer samples with the random module")

    class CsprngClientManager(SimpleClientManager):
        def __init__(self):
            super().__init__()
            CSPRNG_SAMPLING.require(isinstance(getattr(self, "clients", None), dict),
                                    "SimpleClientManager no longer keeps its clients in a dict")
            self.rng = random.SystemRandom()

        def sample(self, num_clients, min_num_clients=None, criterion=None):
            self.wait_for(num_clients if min_num_clients is None else min_num_clients)
            cids = sorted(c for c, proxy in self.clients.items() if criterion is None or criterion.select(proxy))
            if num_clients > len(cids):
                log(WARNING, "sampling failed: %d devices available, %d requested", len(cids), num_clients)
                return []
            return [self.clients[c] for c in self.rng.sample(cids, num_clients)]

    return CsprngClientManager()


class ResumableWorkflow:
    """Flower's ``DefaultWorkflow`` loop, started at any round, with a hook after every round.

    ``start_round`` 1 is Flower's loop exactly (initial parameters from the strategy, evaluated as round 0).
    A later ``start_round`` continues a run: the strategy's ``initialize_parameters`` returns the checkpointed
    global model, which is not evaluated again. ``after_round(round, context)`` runs after each round's
    centralised evaluation (fl-ser checkpoints there; an exception it raises ends the run)."""

    def __init__(self, fit_workflow=None, start_round: int = 1, after_round=None):
        from flwr.server.workflow import DefaultWorkflow

        RESUMABLE_ROUNDS.check_version()
        call = DefaultWorkflow.__call__
        for step in ("start_update_client_manager_thread", "default_init_params_workflow",
                     "default_centralized_evaluation_workflow", "CURRENT_ROUND", "START_TIME"):
            RESUMABLE_ROUNDS.require(_looked_up(call, step), f"DefaultWorkflow.__call__ no longer uses {step}")
        if start_round < 1:
            raise ValueError(f"start_round must be at least 1, got {start_round}")
        self.workflow = DefaultWorkflow(fit_workflow=fit_workflow)
        self.start_round = start_round
        self.after_round = after_round

    def __call__(self, grid, context) -> None:
        import timeit

        from flwr.app import ConfigRecord
        from flwr.compat.common import recorddict_compat as compat
        from flwr.server.compat.app_utils import start_update_client_manager_thread
        from flwr.server.workflow import default_workflows as flower
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        try:
            c_done.wait()
            if self.start_round == 1:
                flower.default_init_params_workflow(grid, context)
            else:
                params = context.strategy.initialize_parameters(client_manager=context.client_manager)
                context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params,
                                                                                                   keep_input=True)
            cfg = ConfigRecord()
            cfg[Key.START_TIME] = timeit.default_timer()
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            for current_round in range(self.start_round, context.config.num_rounds + 1):
                log(INFO, "[ROUND %s]", current_round)
                cfg[Key.CURRENT_ROUND] = current_round
                self.workflow.fit_workflow(grid, context)
                flower.default_centralized_evaluation_workflow(grid, context)
                self.workflow.evaluate_workflow(grid, context)
                if self.after_round is not None:
                    self.after_round(current_round, context)
        finally:
            f_stop.set()
            thread.join()
