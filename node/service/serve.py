"""`serve`: the receiver, watch folder, scheduler, delivery loop and worker supervisor in one process.

Shutdown on SIGTERM/SIGINT, in an order that loses nothing: tell the workers to stop (each
hands its running job back to the queue) and the sender to start no new association; stop
accepting associations and let the stores in flight finish (each is durable before it is
acknowledged); stop the watch folder; wait for the workers and the send in progress; then
close the database. Series still waiting for their quiet period are not lost: they are
in the spool and `SeriesTracker.recover` picks them up at the next start.

SIGHUP reloads the DICOM TLS certificate, key and CAs (open associations keep theirs); nothing else
is reloaded (the config is read at start; change it and restart), and logs go to stderr, so there is
no log file to reopen. A terminal closing or a `systemctl kill -s HUP` must not take the node down.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from node.backfill.runner import BackfillRunner
from node.config import Config, ReceiverConfig
from node.delivery.loop import DeliveryLoop
from node.ingest.dixon import spooled_sop_classes
from node.ingest.receiver import Receiver
from node.ingest.series import SeriesTracker
from node.ingest.spool import Spool
from node.ingest.watch import Watcher
from node.priors.inbox import PriorsInbox
from node.service.housekeeping import Housekeeper
from node.service.ids import serve_name
from node.service.owner import OwnerError, StateDirOwner, check_state_present, make_private
from node.service.supervisor import WorkerSupervisor
from node.state.pending import pending_path
from node.state.store import ServeRecord, State, open_configured
from node.tls import TlsError

log = logging.getLogger(__name__)

SCHEDULER_TICK_S = 0.1  # the longest the scheduler sleeps; a series falling due wakes it sooner
MIN_WAIT_S = 0.001
SHUTDOWN_GRACE_S = 30.0
SERVE_HEARTBEAT_S = 10.0  # how often serve tells the shared state it is alive, and where its DICOMweb is


def exposure_warning(receiver: ReceiverConfig) -> str | None:
    """A line for the log and `config check` when any host may store to the node under any calling AE."""
    if receiver.allowed_calling_aes or _loopback(receiver.bind_address):
        return None
    return (f"the receiver listens on {receiver.bind_address} and accepts any calling AE: set "
            "receiver.allowed_calling_aes to the PACS and modalities that send, or bind_address to one interface")


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


class StartError(Exception):
    """The node cannot start; the message names the setting to change."""


def stop_on_signals(on_hangup: Callable[[], object] | None = None) -> threading.Event:
    """An event set by SIGTERM or SIGINT (the main loop polls it; nothing is interrupted); SIGHUP calls
    `on_hangup` on its own thread (a handler must not take locks the interrupted code may hold)."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("event=shutdown_requested signal=%s", signal.Signals(signum).name)
        stop.set()

    def ignore(signum: int, frame: FrameType | None) -> None:
        if on_hangup is not None:
            threading.Thread(target=on_hangup, name="sighup", daemon=True).start()
            return
        log.warning("event=signal_ignored signal=SIGHUP reason=%s",
                    "nothing to reload: change the config and restart the service")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGHUP, ignore)
    return stop


class Service:
    """Owns the long-running parts of the node and starts/stops them in order."""

    def __init__(self, config: Config, config_path: Path | None, init: bool = False) -> None:
        self.config = config
        self.owner = StateDirOwner(config.storage.state_dir)
        try:
            self.owner.acquire()
            storage = config.storage
            if not config.state.shared:
                check_state_present(storage.database, storage.spool_dir, storage.outbox_dir, init)
            self.state: State = open_configured(config, create=True, serve=serve_name(config))
        except OwnerError as exc:
            self.owner.release()
            raise StartError(str(exc)) from None
        if not config.state.shared:
            make_private(*(storage.database.with_name(storage.database.name + suffix) for suffix in ("", "-wal", "-shm")))
        self.spool = Spool(config.storage.spool_dir, config.storage.spool_direct_io)
        self.tracker = SeriesTracker(self.spool, self.state, config.completion, config.selection,
                                     pending_file=pending_path(config.storage.state_dir))
        spooled = spooled_sop_classes(config.selection.modalities)
        self.receiver = Receiver(config.receiver, self.spool, self.tracker, spooled=spooled,
                                 priors_inbox=PriorsInbox.from_config(config))
        self.watcher = Watcher(config.receiver, self.spool, self.tracker, spooled) if config.receiver.watch_dir else None
        self.supervisor = WorkerSupervisor(config_path, config.worker.count, self.state)
        self.delivery = DeliveryLoop(config, self.state)
        self.housekeeper = Housekeeper(config.storage, self.state, self.tracker)
        self._delivery_stop = threading.Event()
        self._delivery_thread = threading.Thread(target=self.delivery.run, args=(self._delivery_stop,),
                                                 name="delivery", daemon=True)
        self.backfill = BackfillRunner(config, self.state, self.spool, self.receiver.store_handlers(),
                                       list(self.receiver.spooled))
        self._backfill_thread = threading.Thread(target=self.backfill.run, args=(self._delivery_stop,),
                                                 name="backfill", daemon=True)
        self._next_heartbeat = 0.0
        self.web = None  # the status page, /metrics and health checks; started after the receiver
        self.dicomweb = None  # WADO-RS/STOW-RS for workers on other hosts ([dicomweb] enabled)

    def run(self, stop: threading.Event) -> None:
        self.start()
        try:
            while not stop.wait(self._until_next_round()):
                self._schedule()
        finally:
            self.shutdown()

    def _until_next_round(self) -> float:
        """At most a tick, less when a series completes sooner: it is queued on time, not up to a tick late."""
        due = self.tracker.next_completion_at()
        if due is None:
            return SCHEDULER_TICK_S
        return min(SCHEDULER_TICK_S, max(MIN_WAIT_S, due - time.monotonic()))

    def _schedule(self) -> None:
        """One scheduler round; an unexpected error is logged and the next round tries again.

        Letting it escape would stop scheduling while the receiver kept acknowledging images.
        """
        try:
            self.tracker.tick()
            self.supervisor.check()
            self.housekeeper.tick()
            self._heartbeat()
        except Exception:
            log.exception("event=scheduler_round_failed")

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + SERVE_HEARTBEAT_S
        self.state.register_serve(ServeRecord(self.state.serve, socket.gethostname(), self._dicomweb_url()))

    def _dicomweb_url(self) -> str:
        """Where remote workers fetch this serve's series and return results; empty: no DICOMweb listener."""
        return self.config.dicomweb.url if self.dicomweb is not None else ""

    def start(self) -> None:
        web = self._make_web() if self.config.web.enabled else None  # a bad secret file refuses the start here
        removed = self.spool.remove_partial_files()
        self.tracker.recover()
        if self.config.dicomweb.enabled:  # first: a bad token, certificate or port refuses the start at once
            self.dicomweb = self._start_dicomweb()
        if self.watcher is not None:  # a folder it cannot use refuses the start before the receiver listens
            self.watcher.start()
        try:
            self._check_client_tls()
            self.receiver.start()
        except (OSError, TlsError) as exc:
            if self.watcher is not None:
                self.watcher.stop()
            if self.dicomweb is not None:
                self.dicomweb.stop()
            if isinstance(exc, TlsError):
                raise StartError(str(exc)) from None
            receiver = self.config.receiver
            ports = f"{receiver.port}" + (f" or {receiver.tls.port}" if receiver.tls is not None else "")
            raise StartError(f"cannot listen on {receiver.bind_address} port {ports} ({exc.strerror or exc}): stop what "
                             "uses the port or change receiver.port / receiver.tls.port / receiver.bind_address") from None
        self._heartbeat()
        if (warning := exposure_warning(self.config.receiver)) is not None:
            log.warning("event=receiver_open_to_all reason=%s", warning)
        self.supervisor.check()
        self._delivery_thread.start()
        self._backfill_thread.start()
        if web is not None:
            web.start()
            self.web = web
        log.info("event=node_started ae_title=%s port=%d tls_port=%d workers=%d partial_files_removed=%d",
                 self.config.receiver.ae_title, self.config.receiver.port if self.config.receiver.tls is None
                 or self.config.receiver.tls.plain_listener else 0,
                 self.config.receiver.tls.port if self.config.receiver.tls else 0, self.config.worker.count, removed)

    def _check_client_tls(self) -> None:
        """Every outgoing TLS setting usable now (a readable key, a missing CA), not at the first send."""
        from node.tls import client_context

        peers = [(f"destinations[{i}].tls", d) for i, d in enumerate(self.config.destinations)]
        if self.config.backfill.pacs is not None:
            peers.append(("backfill.pacs.tls", self.config.backfill.pacs))
        if self.config.priors.pacs:
            peers.append(("priors.tls", self.config.priors.peer))
        for key, peer in peers:
            if peer.tls is not None:
                client_context(peer.tls, key)

    def reload_tls(self) -> None:
        """SIGHUP: the receiver's certificate, key and CAs again."""
        if not self.receiver.reload_tls():
            log.warning("event=signal_ignored signal=SIGHUP reason=%s", "no [receiver.tls] to reload")

    def _make_web(self):
        """The web server over this node's state and live parts (imported only when enabled)."""
        from node.web.auth import SecretError
        from node.web.server import WebServer
        from node.web.status import Live

        live = Live(receiver_listening=self._receiver_listening, free_disk_mb=self.spool.free_disk_mb,
                    receiver_totals=self.receiver.counter.totals)
        try:
            web = WebServer(self.config, self.state, live)
        except SecretError as exc:
            raise StartError(str(exc)) from None
        return web

    def _start_dicomweb(self):
        """The DICOMweb listener for remote workers, started (imported only when enabled)."""
        from node.service.dicomweb_client import TokenError
        from node.web.dicomweb_server import DicomwebServer, ListenerError

        try:
            server = DicomwebServer(self.config, self.state)
            server.start()
        except (TokenError, ListenerError) as exc:
            raise StartError(str(exc)) from None
        return server

    def _receiver_listening(self) -> bool:
        try:
            return self.receiver.listening
        except RuntimeError:  # not started, or stopped
            return False

    def shutdown(self) -> None:
        self._delivery_stop.set()  # the send in progress finishes; no new one starts
        self.supervisor.terminate()  # running jobs go back to the queue now, not after the receiver
        self.receiver.stop(SHUTDOWN_GRACE_S)
        if self.watcher is not None:
            self.watcher.stop()
        self.tracker.tick()
        self.tracker.record_pending(force=True)  # what was cut off by this stop waits for its resend
        self.supervisor.stop(SHUTDOWN_GRACE_S)
        if self._delivery_thread.is_alive():
            self._delivery_thread.join(self.config.delivery.timeout_s + SHUTDOWN_GRACE_S)
        if self._backfill_thread.is_alive():  # a retrieve in flight ends at its timeout at the latest
            self._backfill_thread.join(self.config.backfill.timeout_s + SHUTDOWN_GRACE_S)
        if self.web is not None:  # up until here, so /readyz says "not listening" while the node drains
            self.web.stop()
        if self.dicomweb is not None:  # remote workers store results until the database closes
            self.dicomweb.stop()
        self.state.close()
        self.owner.release()
        log.info("event=node_stopped pending_series=%d", self.tracker.pending_series())


def serve(config: Config, config_path: Path | None, init: bool = False) -> int:
    service = Service(config, config_path, init)
    stop = stop_on_signals(on_hangup=service.reload_tls)
    service.run(stop)
    return 0
