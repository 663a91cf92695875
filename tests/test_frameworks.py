"""Voice-agent frameworks against `listenloop serve`'s /v1/realtime, through the snippets of
docs/SERVE.md: a Pipecat pipeline whose LLM is Pipecat's OpenAI Realtime service, and LiveKit
Agents' OpenAI realtime model and its session (no LiveKit room, no AgentSession). Each is fed a
recording and must get the replies the Python API gives for it. Loopback only; each test skips
when its framework is not installed (`pip install 'listenloop[frameworks]'`)."""
from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("aiohttp")

from test_server import EXAMPLES, pcm16_24k, run, runtime, server, wait_idle, wav  # noqa: E402, F401
from test_server_playback import _docs_snippet  # noqa: E402

RECORDING = "front_door.wav"
BLOCK = 2400  # samples: the snippets' 0.1 s frames at 24 kHz
pytestmark = pytest.mark.timeout(180)


def needs(module: str):
    """Skip unless `module` is installed, before the server and the recording are set up."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        found = False
    return pytest.mark.skipif(not found, reason=f"{module} is not installed (pip install 'listenloop[frameworks]')")


@pytest.fixture(scope="module")
def recording(runtime):
    """The recording as 24 kHz pcm16 bytes, and the replies the Python API gives for it fed in the
    snippets' blocks; those are the replies examples/expected_events.json lists."""
    pcm = pcm16_24k(wav(RECORDING))
    with runtime.session() as session:
        for start in range(0, len(pcm), BLOCK):
            session.accept_waveform(pcm[start:start + BLOCK], 24000)
        session.finish(timeout=60)
        replies = [event.text for event in session.events(timeout=5) if event.kind == "ReplyEnded"]
    listed = json.loads((EXAMPLES / "expected_events.json").read_text())[RECORDING]["events"]
    assert replies == [event["reply"] for event in listed if event["expected"] == "reply"]
    return pcm.tobytes(), replies


@needs("pipecat")
@pytest.mark.filterwarnings("ignore:'audioop' is deprecated:DeprecationWarning")  # Pipecat's own import
def test_pipecat_pipeline_gets_the_replies(server, recording):
    pcm, expected = recording
    pipecat_replies = _docs_snippet("pipecat_replies")
    # each reply is collected from LLMFullResponseStartFrame (conversation.item.added) to
    # LLMFullResponseEndFrame (response.done): both must reach the end of the pipeline
    replies = run(pipecat_replies(pcm, len(expected), url=f"ws://127.0.0.1:{server.port}/v1/realtime",
                                  api_key="unused"), timeout=120)
    assert replies == expected
    run(wait_idle(server, timeout=30))  # the service closed its connection when the pipeline was cancelled


@needs("livekit.plugins.openai")
def test_livekit_realtime_session_gets_the_replies(server, recording):
    pcm, expected = recording
    livekit_replies = _docs_snippet("livekit_replies")
    replies = run(livekit_replies(pcm, len(expected), base_url=f"http://127.0.0.1:{server.port}/v1",
                                  api_key="unused"), timeout=120)
    assert replies == expected
    run(wait_idle(server, timeout=30))  # the session closed its connection
