"""The `listenloop` command: run a file, listen to the microphone, list devices, show info, export."""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading
import time

from . import __version__
from .errors import Error, ExportError
from .profiles import profile_help

EMOTION_MARKS = {"HAPPY": "😊", "SAD": "😢", "ANGRY": "😠", "SURPRISE": "😲", "NORMAL": "😐", "URGENT": "⚠️"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="listenloop", description="Always-on audio language model runtime.")
    parser.add_argument("--version", action="version", version=f"listenloop {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def runtime_options(p):
        p.add_argument("--package", metavar="DIR", help="model package folder (default: the embedded model)")
        p.add_argument("--profile", default="cpu", help=profile_help())
        p.add_argument("--json", action="store_true", help="print one JSON event per line")
        p.add_argument("--speak-bias", type=float, default=None, help="added to the TEXT_BEGIN logit")
        p.add_argument("--max-context", type=int, default=None,
                       help="KV cache capacity in tokens (default: the package's; above the context the model "
                            "was trained for it warns)")

    run = sub.add_parser("run", help="stream an audio file through the model")
    run.add_argument("file", help="audio file (wav, flac, ogg, mp3; any rate and channel count)")
    run.add_argument("--realtime", action="store_true", help="feed at real-time pace instead of as fast as possible")
    runtime_options(run)

    listen = sub.add_parser("listen", help="listen to a microphone until Ctrl-C")
    listen.add_argument("--device", default=None, help="input device index or name (see `listenloop devices`)")
    listen.add_argument("--speak", action="store_true",
                        help="speak each reply through espeak-ng; what the speaker plays is cancelled from the "
                             "microphone (microphone and speaker share one duplex stream)")
    listen.add_argument("--output-device", default=None, help="with --speak: output device index or name")
    listen.add_argument("--voice", default=None, help="with --speak: espeak-ng voice, e.g. en-us (espeak-ng --voices)")
    runtime_options(listen)

    sub.add_parser("devices", help="list audio input devices")

    info = sub.add_parser("info", help="show the model, profile, providers and build")
    info.add_argument("--package", metavar="DIR", help="model package folder (default: the embedded model)")
    info.add_argument("--profile", default="cpu", help=profile_help())

    verify = sub.add_parser("verify", help="check the sha256 of every file of a model package (however big)")
    verify.add_argument("package", metavar="PACKAGE", help="model package folder")

    sub.add_parser("export", help="export a checkpoint to a model package (needs listenloop[export])", add_help=False)

    serve = sub.add_parser("serve", help="serve the model over WebSocket: OpenAI Realtime and raw PCM "
                                         "(needs listenloop[serve])")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1; any other address needs --api-key-env)")
    serve.add_argument("--port", type=int, default=8765, help="TCP port (default: 8765)")
    serve.add_argument("--package", metavar="DIR", help="model package folder (default: the embedded model)")
    serve.add_argument("--profile", default="cpu", help=profile_help())
    serve.add_argument("--max-sessions", type=int, default=8, metavar="N",
                       help="open connections at most, one session each; more are refused (default: 8)")
    serve.add_argument("--api-key-env", metavar="VAR",
                       help="environment variable holding the API key that clients must send "
                            "(Authorization: Bearer KEY or ?key=KEY)")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="browser origin allowed besides the server's own, e.g. https://app.example (repeatable)")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="Host header name served besides loopback names and --host when there is no API key, "
                            "e.g. a reverse proxy's (repeatable)")
    serve.add_argument("--drain-timeout", type=float, metavar="S",
                       help="on SIGTERM or Ctrl-C, seconds that open sessions get to end before they are closed "
                            "(default: 10; 0 closes them at once; a second signal closes them at once)")
    serve.add_argument("--replicas", type=int, metavar="N",
                       help="serve through Ray Serve: N replicas, one model each, behind the one address; "
                            "--max-sessions is then per replica (needs listenloop[cluster])")
    serve.add_argument("--ray-address", metavar="ADDR",
                       help="with --replicas: the Ray cluster to run on (default: start Ray on this machine)")
    serve.add_argument("--min-replicas", type=int, metavar="A",
                       help="with --replicas and --max-replicas: autoscale between A and B replicas on open sessions")
    serve.add_argument("--max-replicas", type=int, metavar="B", help="see --min-replicas")

    from .benchmarks import command as bench_command

    bench_command.add_arguments(sub.add_parser("bench", help="measure latency, throughput and memory of a model package"))
    return parser


# --- output --------------------------------------------------------------------------------

class Printer:
    """Readable live transcript on stdout, plus a status line on stderr when it is a terminal.

    Notices (dropped audio or events, faults, verbose context resets, warnings) go to stderr,
    but never into the middle of a reply line: while a reply is being printed they are held
    and printed once its line ends. Clipped input is summed over the run and reported as one
    warning line by `summary()`. Context resets are routine (with the demo
    model's 768 tokens, every few seconds of quiet audio): shown with --verbose."""

    def __init__(self, as_json: bool, verbose: bool = False, source: str | None = None):
        self.as_json = as_json
        self.verbose = verbose
        self.source = source  # the input's name, for warnings
        self.status = sys.stderr.isatty() and not as_json
        self.in_reply = False
        self._status_len = 0
        self._held: list[str] = []
        self._clipped = 0
        self._clip_peak = 0.0
        self._clip_reason = ""
        self._clip_int_pcm = False

    def __call__(self, event) -> None:
        kind = event.kind
        if kind == "AudioClipped":
            self._note_clipping(event)
        if self.as_json:
            print(json.dumps(event.to_dict(), ensure_ascii=False), flush=True)
            return
        if kind == "Decision":
            self._status(f"[{event.stream_time:7.1f}s] listening  p(speak)={event.p_speak:.2f}")
        elif kind == "ReplyStarted":
            self._clear_status()
            mark = EMOTION_MARKS.get(event.emotion or "", "")
            print(f"[{event.stream_time:7.1f}s] {mark + ' ' if mark else ''}", end="", flush=True)
            self.in_reply = True
        elif kind == "TextDelta":
            print(event.text, end="", flush=True)
        elif kind == "ReplyEnded":
            print(" [cut]" if event.truncated else "", flush=True)
            self.in_reply = False
            self._release()
        elif kind == "ContextReset" and not self.verbose:
            return
        elif kind in ("AudioDropped", "ContextReset", "Fault", "EventsDropped"):
            detail = {"AudioDropped": lambda e: f"dropped {e.samples} samples: {e.reason}",
                      "ContextReset": lambda e: f"context reset: {e.reason}",
                      "Fault": lambda e: f"{e.where} fault: {e.message}",
                      "EventsDropped": lambda e: f"{e.count} events dropped: the reader fell behind"}[kind](event)
            self.notice(f"[{event.stream_time:7.1f}s] ({detail})")
        elif kind == "Stats":
            self._status(f"[{event.stream_time:7.1f}s] {event.chunks} chunks  step {event.step_ms:.1f} ms  "
                         f"RTF {event.real_time_factor:.2f}  dropped {event.dropped_chunks} chunks")

    def keep_logs_off_the_status_line(self) -> None:
        """Log lines (-v) start at the beginning of a line, not glued to the status line."""
        if self.status:
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._before_log_line)

    def _before_log_line(self, record) -> bool:
        self._clear_status()
        return True

    def notice(self, line: str) -> None:
        """One line on stderr, after the reply line if a reply is being printed."""
        if self.in_reply:
            self._held.append(line)
            return
        self._clear_status()
        print(line, file=sys.stderr, flush=True)

    def warning(self, message: str) -> None:
        self.notice(f"listenloop: warning: {message}")

    def _release(self) -> None:
        held, self._held = self._held, []
        for line in held:
            self.notice(line)

    def _note_clipping(self, event) -> None:
        self._clipped += event.samples
        self._clip_peak = max(self._clip_peak, event.peak)
        if not self._clip_reason or (event.int_pcm_as_float and not self._clip_int_pcm):
            self._clip_reason, self._clip_int_pcm = event.reason, event.int_pcm_as_float

    def clipping_warning(self) -> str | None:
        """The run's one line about clipped input, or None if nothing was clipped."""
        if not self._clipped:
            return None
        peak = f"{self._clip_peak:.1f}" if self._clip_peak < 1e7 else f"{self._clip_peak:.3g}"
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self._clipped:,} samples clipped (peak {peak}): {self._clip_reason}"

    def _status(self, text: str) -> None:
        if self.status and not self.in_reply:
            sys.stderr.write("\r" + text.ljust(self._status_len))
            sys.stderr.flush()
            self._status_len = len(text)

    def _clear_status(self) -> None:
        if self.status and self._status_len:
            sys.stderr.write("\r" + " " * self._status_len + "\r")
            sys.stderr.flush()
            self._status_len = 0

    def summary(self, stats) -> None:
        """End of the run: finish an interrupted reply line, print held notices, the clipping
        warning and (in transcript mode) the statistics line."""
        from .protocol import CHUNK_SECONDS

        if self.in_reply:
            print(flush=True)
            self.in_reply = False
        self._release()
        clipping = self.clipping_warning()
        if clipping:
            self.warning(clipping)
        if not self.as_json:
            self._clear_status()
            print(f"{stats.chunks} chunks ({stats.chunks * CHUNK_SECONDS:.1f} s), step {stats.step_ms:.2f} ms median, "
                  f"RTF {stats.real_time_factor:.3f}, dropped {stats.dropped_chunks} chunks", file=sys.stderr)


# --- commands ------------------------------------------------------------------------------

def _runtime(args):
    from .session import Runtime

    options = {}
    if args.speak_bias is not None:
        options["speak_bias"] = args.speak_bias
    return Runtime(args.package, args.profile, max_context=args.max_context, **options)


def cmd_run(args) -> int:
    from .audio import AudioFile

    printer = Printer(args.json, args.verbose, source=args.file)
    printer.keep_logs_off_the_status_line()
    # Opened first: a bad file fails before the model loads. Read 0.1 s at a time, so memory
    # does not depend on the file's length and events are printed as they come.
    with AudioFile(args.file, block_seconds=0.1, on_warning=printer.warning) as audio:
        runtime = _runtime(args)
        with runtime.session() as session:
            start = time.monotonic()
            fed = 0
            for block in audio:
                if STOP.requested:
                    break
                while args.realtime and not STOP.requested:
                    delay = start + fed / audio.sample_rate - time.monotonic()
                    if delay <= 0:
                        break
                    time.sleep(min(delay, STOP_POLL_S))
                session.accept_waveform(block, audio.sample_rate)
                fed += len(block)
                for event in session.drain():
                    printer(event)
            if not STOP.requested:
                session.finish()
            last, ended = None, False
            while not (ended or STOP.requested):  # everything, up to Finished
                for event in session.events(timeout=STOP_POLL_S):
                    ended = event.kind == "Finished"
                    if not ended:
                        printer(event)
                    last = event if event.kind == "Stats" else last
            printer.summary(last or session.stats())
    return 128 + STOP.signum if STOP.requested else 0


ESPEAK = "espeak-ng"


class Espeak:
    """Text to speech through the espeak-ng command (`--stdout` writes a WAV). Opening it
    renders one word, so that a missing program or an unknown voice fails at once, in one line."""

    def __init__(self, voice: str | None = None):
        import shutil

        self.program = shutil.which(ESPEAK)
        if self.program is None:
            raise Error(f"--speak needs {ESPEAK}, which is not installed (apt install {ESPEAK}; "
                        f"macOS: brew install {ESPEAK})")
        self.voice = voice
        self.render("ready")

    def render(self, text: str):
        """(mono float32 samples, sample rate) of `text` spoken."""
        import io
        import subprocess

        import soundfile as sf

        command = [self.program, "--stdout"] + (["-v", self.voice] if self.voice else [])
        try:  # the text goes in on stdin: never taken for an option
            done = subprocess.run(command, input=text.encode("utf-8"), capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Error(f"{ESPEAK} failed: {exc}") from None
        if done.returncode or not done.stdout:
            detail = (done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no audio"])[0]
            raise Error(f"{ESPEAK} failed{f' with voice {self.voice!r}' if self.voice else ''}: {detail}")
        try:
            pcm, rate = sf.read(io.BytesIO(done.stdout), dtype="float32", always_2d=True)
        except (RuntimeError, ValueError) as exc:  # soundfile's LibsndfileError is a RuntimeError
            raise Error(f"{ESPEAK} wrote audio that cannot be read: {exc}") from None
        return pcm.mean(axis=1, dtype="float32"), int(rate)


class Speaker:
    """Speaks replies off the audio thread: a worker renders the newest text waiting and hands it
    to the duplex stream, which stops whatever is still playing and plays it."""

    def __init__(self, voice: Espeak, duplex, on_error):
        import queue
        import threading

        self.voice, self.duplex, self._on_error = voice, duplex, on_error
        self._texts: queue.Queue = queue.Queue()
        self._waiting = 0  # texts said and not yet handed to the stream (or skipped)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="listenloop-speaker", daemon=True)
        self._thread.start()

    def say(self, text: str) -> None:
        with self._lock:
            self._waiting += 1
        self._texts.put(text)

    @property
    def idle(self) -> bool:
        """Every text said so far is playing, played or replaced."""
        with self._lock:
            return self._waiting == 0

    def _done(self, texts: int) -> None:
        with self._lock:
            self._waiting -= texts

    def _run(self) -> None:
        from .audio import resample

        while True:
            text, texts = self._texts.get(), 1
            while text is not None and not self._texts.empty():  # replies that came meanwhile: the newest
                text, texts = self._texts.get(), texts + 1
            if text is None:
                return
            try:
                pcm, rate = self.voice.render(text)
                self.duplex.play(resample(pcm, rate, self.duplex.rate))
            except Error as exc:
                self._on_error(str(exc))
            finally:
                self._done(texts)

    def close(self) -> None:
        self._texts.put(None)
        self._thread.join(timeout=60)


def _device(value):
    return int(value) if value is not None and str(value).isdigit() else value


def cmd_listen(args) -> int:
    if not args.speak and (args.voice is not None or args.output_device is not None):
        raise Error("--voice and --output-device need --speak")
    voice = Espeak(args.voice) if args.speak else None  # before the model loads: fails at once
    runtime = _runtime(args)
    printer = Printer(args.json, args.verbose)
    printer.keep_logs_off_the_status_line()
    with runtime.session() as session:
        speaker = None
        if args.speak:
            from .audio import Duplex

            source = Duplex(session, _device(args.device), _device(args.output_device)).start()
            speaker = Speaker(voice, source, printer.warning)
            where = f"listening on {source.device_name!r}, speaking on {source.output_name!r}"
        else:
            source = session.listen(_device(args.device))
            where = f"listening on {source.device_name!r}"
        print(f"{where} ({source.rate} Hz); Ctrl-C to stop", file=sys.stderr)
        try:
            while not STOP.requested:
                for event in session.events(timeout=STOP_POLL_S):
                    printer(event)
                    if speaker is not None and event.kind == "ReplyEnded" and event.text.strip():
                        speaker.say(event.text)
        except KeyboardInterrupt:
            pass
        finally:
            if speaker is not None:
                speaker.close()
            source.stop()
        printer.summary(session.stats())
    return 128 + STOP.signum if STOP.requested else 0


def cmd_devices(args) -> int:
    from .audio import list_input_devices

    devices = list_input_devices()
    if not devices:
        print("no audio input devices found")
    for d in devices:
        print(f"{'*' if d['default'] else ' '} {d['index']:3d}  {d['name']}  ({d['channels']} ch, {d['sample_rate']:.0f} Hz)")
    return 0


def _build_info() -> dict:
    import onnxruntime as ort

    info = {"listenloop": __version__, "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers(),
            "cuda": "CUDAExecutionProvider" in ort.get_available_providers()}
    try:
        from . import _core

        info["core_build"] = _core.build_info() if hasattr(_core, "build_info") else "built (no build_info)"
    except ImportError as exc:
        info["core_build"] = f"not available ({exc})"
    return info


def cmd_info(args) -> int:
    from .profiles import load_profile
    from .session import Runtime

    load_profile(args.profile)  # a profile that does not exist is an error; a missing model is shown below
    info = _build_info()
    try:
        runtime = Runtime(args.package, args.profile)
        info.update(runtime.info())
    except Error as exc:
        info["model"] = f"none ({exc})"
    for key, value in info.items():
        print(f"{key:24s} {value if not isinstance(value, (list, dict)) else json.dumps(value)}")
    return 0


def cmd_verify(args) -> int:
    from .package import verify_package

    for name, size, status in verify_package(args.package):  # a mismatch raises: one error line
        print(f"{name:32s} {size:>15,d} bytes  {status}")
    return 0


def cmd_export(argv: list[str]) -> int:
    try:
        import torch  # noqa: F401 - only to give a clear message when the extra is missing
    except ImportError:
        raise ExportError("export needs PyTorch: pip install 'listenloop[export]'") from None
    from listenloop.export.__main__ import main as export_main

    return export_main(argv, prog="listenloop export") or 0


def cmd_bench(args) -> int:
    from .benchmarks import command as bench_command

    return bench_command.main(args)


def cmd_serve(args) -> int:
    for module in ("aiohttp", "prometheus_client"):
        try:
            __import__(module)  # only to give a clear message when the extra is missing
        except ImportError:
            raise Error(f"serve needs {module}: pip install 'listenloop[serve]'") from None
    from .server import serve
    from .server.drain import DRAIN_TIMEOUT_S, check_drain_timeout
    from .server.state import check_port

    check_port(args.port)
    drain_timeout = DRAIN_TIMEOUT_S if args.drain_timeout is None else args.drain_timeout
    check_drain_timeout(drain_timeout)
    if args.max_sessions < 1:
        raise Error(f"--max-sessions must be at least 1, got {args.max_sessions}")
    stop, stop_now = threading.Event(), threading.Event()
    # The first signal drains (sessions get --drain-timeout to end), a second one closes them now;
    # either way the connections are closed properly before the process ends.
    stop_s = SERVE_STOP_S if args.replicas is None else SERVE_REPLICAS_STOP_S
    STOP.grace_s = drain_timeout + stop_s
    STOP.hurry_s = stop_s
    STOP.on_request(lambda: (stop_now if stop.is_set() else stop).set())
    options = dict(package=args.package, profile=args.profile, max_sessions=args.max_sessions,
                   api_key_env=args.api_key_env, allowed_origins=tuple(args.allow_origin),
                   allowed_hosts=tuple(args.allow_host), stop=stop)
    if args.replicas is None:
        for name in ("ray_address", "min_replicas", "max_replicas"):
            if getattr(args, name) is not None:
                raise Error(f"--{name.replace('_', '-')} needs --replicas N")
        serve(host=args.host, port=args.port, stop_now=stop_now, drain_timeout_s=drain_timeout, **options)
    else:
        _serve_replicas(args, dict(options, stop_now=stop_now, drain_timeout_s=drain_timeout))
    return 128 + STOP.signum if STOP.requested else 0


def _serve_replicas(args, options: dict) -> None:
    # The command stops on SIGTERM itself (a drain, then exit 143). Ray's C++ handler for it in
    # the driver would print a stack trace and abort the process in the middle of the drain;
    # read when Ray is imported, and passed on to the processes of a Ray started here.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        import ray.serve  # noqa: F401 - only to give a clear message when the extra is missing
    except ImportError:
        raise Error("serve --replicas needs Ray Serve: pip install 'listenloop[cluster]'") from None
    from .server.cluster import check_replicas, serve_replicas

    check_replicas(args.replicas, args.min_replicas, args.max_replicas)
    serve_replicas(args.host, args.port, args.replicas, args.min_replicas, args.max_replicas, args.ray_address,
                   **options)


COMMANDS = {"serve": cmd_serve, "run": cmd_run, "listen": cmd_listen, "devices": cmd_devices, "info": cmd_info, "bench": cmd_bench,
            "verify": cmd_verify}


# --- stopping on signals ---------------------------------------------------------------------
#
# SIGINT and SIGTERM never raise inside the command: a KeyboardInterrupt that lands in a C
# extension being imported or initialized (soxr, onnxruntime) aborts the process or breaks the
# import for good. So the command runs in a worker thread with both signals blocked (as is
# every thread it starts: ONNX Runtime's, the model thread, the server's); the main thread only
# waits. A signal wakes it: it sets STOP (commands with a loop leave it at their next step and
# the server drains), gives the worker STOP.grace_s to end (STOP_GRACE_S; serve sets its drain
# time, and a second signal closes its sessions now), flushes the output and exits with
# 128 + the signal's number. The process needs no other clean-up: the OS closes its sockets
# and files, and the partial folder of an interrupted export is removed by the next export
# to the same place.

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_POLL_S = 0.1  # how often a command's waits look at STOP
STOP_GRACE_S = 0.3  # the worker's time to leave its loop (it looks every STOP_POLL_S); then the process exits anyway
# serve: after its drain, the time to close every connection and stop (server.drain.CLOSE_TIMEOUT_S
# for the clients, then the runtime's threads); then the process exits anyway
SERVE_STOP_S = 5.0
# serve --replicas: after the replicas' drain, the time for Ray to delete the application (its
# replicas close their connections within 2 * CLOSE_TIMEOUT_S) and to stop a Ray it started
SERVE_REPLICAS_STOP_S = 30.0
FLUSH_WAIT_S = 0.2  # output to a reader that does not read is given up on


class Stop:
    """The signal that asked the command to stop (0: none), and callbacks that wake its waits."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.signum = 0
        self.requests = 0
        self.grace_s = STOP_GRACE_S  # the command's time to end after the first request
        self.hurry_s = 0.0  # its time to end after a second request (0: the process exits then)
        self._wakers: list = []

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def on_request(self, waker) -> None:
        """Call `waker()` (from the main thread) when a stop is requested."""
        self._wakers.append(waker)
        if self.requested:
            waker()

    def request(self, signum: int) -> None:
        self.signum = self.signum or signum
        self.requests += 1
        for waker in list(self._wakers):
            try:
                waker()
            except Exception:  # noqa: BLE001 - a waker of a command that already ended
                logging.getLogger("listenloop").debug("stop waker failed", exc_info=True)


STOP = Stop()


def main(argv: list[str] | None = None) -> int:
    """The command line. Without `argv` it is the process's entry point, which it also ends:
    once the command is over the process exits at once, without the interpreter's shutdown,
    during which a signal would kill it (Python restores the default handlers there). The
    command has closed what it opened; the output is flushed first."""
    entry_point = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)  # called from a library user's thread: signals are theirs
    if not entry_point:
        return _run_stoppable(argv, keep_handlers=False)
    try:
        code = _run_stoppable(argv, keep_handlers=True)
    except SystemExit as exc:  # argparse: --help, --version, a usage error (already printed)
        code = exc.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    _exit_now(0 if code is None else code)


def _run_stoppable(argv: list[str], keep_handlers: bool) -> int:
    STOP.reset()
    mailbox: queue.SimpleQueue = queue.SimpleQueue()  # put() is safe inside a signal handler
    ended = []  # not empty once the command returned

    def on_signal(signum, frame):
        if ended:
            _exit_now(128 + signum)
        mailbox.put(("signal", signum))

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        def work():
            try:
                mailbox.put(("done", _main(argv)))
            except BaseException as exc:  # noqa: BLE001 - e.g. SystemExit from --help, raised again below
                mailbox.put(("raised", exc))

        worker = threading.Thread(target=work, name="listenloop-command", daemon=True)
        worker.start()  # inherits the blocked mask, as do the threads it starts
        # Unblocked here even if the parent started us with them blocked: from now on they are handled.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        kind, value = mailbox.get()
        if kind == "signal":
            _stop_and_exit(value, mailbox)
        worker.join()
        if kind == "raised":
            raise value
        return value
    finally:
        ended.append(True)
        if not keep_handlers:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _stop_and_exit(signum: int, mailbox: queue.SimpleQueue) -> None:
    """Ask the command to stop, wait STOP.grace_s at most for it to end (a second signal asks
    again and shortens the wait to STOP.hurry_s; a third ends it), then leave the process at
    once with 128 + signum."""
    STOP.request(signum)
    deadline = time.monotonic() + STOP.grace_s
    while True:
        try:
            kind, value = mailbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if kind != "signal" or STOP.requests > 1 or STOP.hurry_s <= 0:
            break  # the command ended, or a signal after which nothing is waited for
        STOP.request(value)
        deadline = min(deadline, time.monotonic() + STOP.hurry_s)
    _exit_now(128 + signum)


def _exit_now(code: int) -> None:
    flusher = threading.Thread(target=_flush_output, daemon=True)
    flusher.start()
    flusher.join(FLUSH_WAIT_S)
    os._exit(code)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _main(argv: list[str]) -> int:
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="listenloop: %(message)s")
    try:
        if argv and argv[0] == "export":
            return cmd_export(argv[1:])
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except Error as exc:
        print(f"listenloop: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - users get one line; --verbose shows the traceback
        if verbose:
            logging.exception("unexpected failure")
        print(f"listenloop: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
